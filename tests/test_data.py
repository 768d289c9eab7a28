"""GSM8K loading: real files, local file formats and folders, and every error path."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from data import DataError, canonical_number, load_gsm8k, parse_gold, strip_calculator

GSM8K_DIR = Path(__file__).resolve().parents[2] / "shared/data/gsm8k"
needs_gsm8k = pytest.mark.skipif(
    not (GSM8K_DIR / "train.jsonl").is_file(),
    reason=f"real GSM8K files not found at {GSM8K_DIR}",
)

# First train row of GSM8K: 48/2 = 24 clips in May, 48+24 = 72 altogether.
NATALIA = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n"
    "#### 72"
)
GOOD = {"question": "What is 2+3?", "answer": "2+3 = <<2+3=5>>5\n#### 5"}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --- parse_gold / strip_calculator ---------------------------------------------------------


def test_strip_calculator():
    assert strip_calculator("48/2 = <<48/2=24>>24 clips") == "48/2 = 24 clips"
    assert strip_calculator("$<<0.2*50=10>>10 and <<1+1=2>>2") == "$10 and 2"
    assert strip_calculator("no annotation 3 < 4 > 2") == "no annotation 3 < 4 > 2"


def test_parse_gold_hand_worked():
    reasoning, gold = parse_gold(NATALIA)
    assert gold == "72"
    assert reasoning == NATALIA.rsplit("\n", 1)[0]  # the chain, annotations kept
    assert parse_gold("Total 1000+234 = 1,234\n#### 1,234") == ("Total 1000+234 = 1,234", "1234")
    assert parse_gold("Loss of 3.\n#### -3") == ("Loss of 3.", "-3")
    assert parse_gold("Half.\n#### 0.50") == ("Half.", "0.5")
    assert parse_gold("#### $18") == ("", "18")


@pytest.mark.parametrize(
    "solution, message",
    [
        ("no gold line 72", "no '#### N' line"),
        ("chain\n#### seventy-two", "not a number: 'seventy-two'"),
        ("chain\n####", "not a number: ''"),
    ],
)
def test_parse_gold_errors_name_where(solution, message):
    with pytest.raises(DataError, match="^train.jsonl, row 7: ") as err:
        parse_gold(solution, where="train.jsonl, row 7")
    assert message in str(err.value)


# --- the real GSM8K files ------------------------------------------------------------------


@needs_gsm8k
@pytest.mark.parametrize("split, size", [("train", 7473), ("test", 1319)])
def test_every_real_row_parses(split, size):
    rows = load_gsm8k(str(GSM8K_DIR), split)  # on_error="raise": any bad row fails here
    assert len(rows) == size
    for row in rows:
        # Independent of parse_number: the gold text with thousands commas removed.
        gold_text = row["solution"].rsplit("####", 1)[1].strip().replace(",", "")
        assert float(gold_text) == float(row["answer"]), row["solution"]
        assert row["answer"] == canonical_number(float(row["answer"]))
        assert "<<" not in row["reasoning"] and "####" not in row["reasoning"]


@needs_gsm8k
def test_real_rows_hand_checked():
    train = load_gsm8k(str(GSM8K_DIR / "train.jsonl"), limit=2)
    assert len(train) == 2
    assert train[0]["answer"] == "72"
    assert train[0]["reasoning"] == (
        "Natalia sold 48/2 = 24 clips in May.\n"
        "Natalia sold 48+24 = 72 clips altogether in April and May."
    )
    assert train[0]["solution"] == NATALIA
    # Weng: 12/60 = $0.2 per minute, 0.2 x 50 = $10.
    assert train[1]["answer"] == "10"
    kept = load_gsm8k(str(GSM8K_DIR / "train.jsonl"), limit=1, keep_calculator=True)
    assert kept[0]["reasoning"] == NATALIA.rsplit("\n", 1)[0]
    # Janet: 16 - 3 - 4 = 9 eggs, 9 * 2 = $18.
    assert load_gsm8k(str(GSM8K_DIR), "test", limit=1)[0]["answer"] == "18"


# --- local files and folders ---------------------------------------------------------------


def test_jsonl_keeps_extra_columns_and_limit(tmp_path):
    rows = [dict(GOOD, id=i) for i in range(5)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    out = load_gsm8k(str(path), limit=3)
    assert [r["id"] for r in out] == [0, 1, 2]
    assert out[0] == {
        "question": "What is 2+3?",
        "answer": "5",
        "reasoning": "2+3 = 5",
        "solution": GOOD["answer"],
        "id": 0,
    }


def test_a_byte_order_mark_is_not_data(tmp_path):
    # Some editors (Notepad, Excel exports) start a UTF-8 file with U+FEFF; json.loads refuses it.
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (json.dumps(GOOD) + "\n").encode())
    assert load_gsm8k(str(path))[0]["answer"] == "5"


def test_json_array_and_json_lines(tmp_path):
    array = tmp_path / "a.json"
    array.write_text(json.dumps([GOOD, GOOD]))
    assert [r["answer"] for r in load_gsm8k(str(array))] == ["5", "5"]
    lines = write_jsonl(tmp_path / "l.json", [GOOD])  # what Dataset.to_json writes
    assert load_gsm8k(str(lines))[0]["answer"] == "5"


def test_parquet_file_and_hub_folder_layout(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist([GOOD, dict(GOOD, answer="x\n#### 7")])
    pq.write_table(table, tmp_path / "one.parquet")
    assert [r["answer"] for r in load_gsm8k(str(tmp_path / "one.parquet"))] == ["5", "7"]
    # The HF dataset repo layout: main/{split}-0000i-of-0000n.parquet, shards in order.
    (tmp_path / "repo/main").mkdir(parents=True)
    pq.write_table(table, tmp_path / "repo/main/test-00000-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist([dict(GOOD, answer="#### 9")]),
                   tmp_path / "repo/main/test-00001-of-00002.parquet")
    out = load_gsm8k(str(tmp_path / "repo"), "test")
    assert [r["answer"] for r in out] == ["5", "7", "9"]


def test_folder_picks_the_split_file(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [GOOD])
    write_jsonl(tmp_path / "test.jsonl", [dict(GOOD, answer="#### 11")])
    assert load_gsm8k(str(tmp_path), "train")[0]["answer"] == "5"
    assert load_gsm8k(str(tmp_path), "test")[0]["answer"] == "11"
    with pytest.raises(DataError, match=r"no file for split 'validation'.*validation\.jsonl"):
        load_gsm8k(str(tmp_path), "validation")


def test_synthetic_source():
    rows = load_gsm8k("synthetic:20:3")
    assert len(rows) == 20 and all(r["answer"].isdigit() for r in rows)
    assert rows == load_gsm8k("synthetic:20:3", "train")  # same seed, same rows
    test = load_gsm8k("synthetic:20:3", "test")  # the test split uses seed 3+1
    assert [r["question"] for r in test] != [r["question"] for r in rows]
    assert len(load_gsm8k("synthetic")) == 1000
    assert all("<<" not in r["reasoning"] and r["steps"] >= 1 for r in rows)
    for bad in ("synthetic:0", "synthetic:x", "synthetic:1:2:3"):
        with pytest.raises(DataError, match="synthetic:N:SEED"):
            load_gsm8k(bad)
    with pytest.raises(DataError, match="unknown split 'validation'"):
        load_gsm8k("synthetic", "validation")


# --- errors: each names the file and the row -----------------------------------------------


@pytest.mark.parametrize(
    "bad_row, message",
    [
        ({"question": "q?"}, r"missing column 'answer' \(columns found: \['question'\]\)"),
        (
            {"prompt": "q?", "answer": "#### 1"},
            r"missing column 'question' \(columns found: \['answer', 'prompt'\]\)",
        ),
        ({"question": "q?", "answer": "just 5"}, r"answer has no '#### N' line: 'just 5'"),
        ({"question": "q?", "answer": "#### five"}, r"gold .* is not a number: 'five'"),
        ({"question": "", "answer": "#### 5"}, r"question must be a non-empty string"),
    ],
)
def test_bad_row_raises_naming_file_and_row(tmp_path, bad_row, message):
    # rows: 1 good, then a blank line, then the bad row -> row 2, line 3
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + json.dumps(bad_row) + "\n")
    with pytest.raises(DataError, match=rf"bad\.jsonl, row 2 \(line 3\): {message}"):
        load_gsm8k(str(path))


def test_bad_row_in_json_and_parquet_names_row(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([GOOD, GOOD, {"question": "q"}]))
    with pytest.raises(DataError, match=r"bad\.json, row 3: missing column 'answer'"):
        load_gsm8k(str(path))
    path.write_text(json.dumps([GOOD, 5]))
    with pytest.raises(DataError, match=r"bad\.json, row 2: expected a JSON object, got int"):
        load_gsm8k(str(path))


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + '{"question": "q", "answer": \n')
    with pytest.raises(DataError, match=r"broken\.jsonl, line 2: malformed JSON"):
        load_gsm8k(str(path), on_error="skip")  # a broken file raises even when skipping


@pytest.mark.parametrize("content", ["", "\n\n", "[]"])
def test_empty_file(tmp_path, content):
    path = tmp_path / ("empty.json" if content == "[]" else "empty.jsonl")
    path.write_text(content)
    with pytest.raises(DataError, match=r"empty\.jsonl?: no rows"):
        load_gsm8k(str(path))


def test_nonexistent_and_unreadable_paths(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: no such file or folder"):
        load_gsm8k(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match=r"no such file or folder"):
        load_gsm8k("./relative/missing_dir")
    odd = tmp_path / "data.csv"
    odd.write_text("question,answer\n")
    with pytest.raises(DataError, match=r"data\.csv: unsupported file type"):
        load_gsm8k(str(odd))
    binary = tmp_path / "bin.jsonl"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(DataError, match=r"bin\.jsonl: cannot read file"):
        load_gsm8k(str(binary))


def test_on_error_skip_counts_and_warns_once(tmp_path):
    rows = [GOOD, {"question": "q"}, dict(GOOD, answer="#### ?"), GOOD, {"x": 1}]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = load_gsm8k(str(path), on_error="skip")
    assert len(out) == 2
    assert len(caught) == 1
    assert "skipped 3 bad row(s)" in str(caught[0].message)
    assert "mixed.jsonl, row 2 (line 2): missing column 'answer'" in str(caught[0].message)
    # Nothing valid at all still raises, with the first error.
    bad = write_jsonl(tmp_path / "allbad.jsonl", [{"q": 1}])
    with pytest.raises(DataError, match=r"no valid rows.*row 1 \(line 1\): missing column"):
        load_gsm8k(str(bad), on_error="skip")


def test_argument_validation(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD])
    with pytest.raises(ValueError, match="on_error must be 'raise' or 'skip'"):
        load_gsm8k(str(path), on_error="ignore")
    with pytest.raises(ValueError, match="limit must be a positive integer"):
        load_gsm8k(str(path), limit=0)


def test_unreachable_hub_id_says_how_to_use_a_local_copy(monkeypatch):
    import datasets

    def offline(*args, **kwargs):  # what load_dataset raises without a network (fast here)
        raise ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as err:
        load_gsm8k("openai/gsm8k", "test")
    msg = str(err.value)
    assert msg.startswith("openai/gsm8k: could not load hub dataset")
    assert "ConnectionError" in msg and "local copy" in msg and "main/test-*.parquet" in msg


def test_hub_rows_are_parsed(monkeypatch):
    import datasets

    calls = []

    def fake(source, config, split):
        calls.append((source, config, split))
        return [GOOD, dict(GOOD, answer="#### 8")]

    monkeypatch.setattr(datasets, "load_dataset", fake)
    out = load_gsm8k("openai/gsm8k", "test")
    assert calls == [("openai/gsm8k", "main", "test")]
    assert [r["answer"] for r in out] == ["5", "8"]
