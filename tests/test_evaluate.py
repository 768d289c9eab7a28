"""Tests of grpo.evaluate (pass@k, scoring, the evaluation loop, results on disk) and of
the test.py CLI on bad input."""

from __future__ import annotations

import importlib.util
import io
import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from grpo.evaluate import evaluate, pass_at_k, score_completion, split_reasoning, summarize, write_results
from grpo.testing import tiny_model, tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------
# pass@k


@pytest.mark.parametrize(
    "n, c, k, expected",
    [
        (5, 2, 1, 0.4),  # pass@1 = c / n = 2/5
        (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
        (5, 2, 3, 0.9),  # 1 - C(3,3)/C(5,3) = 1 - 1/10
        (5, 2, 4, 1.0),  # n - c = 3 < k = 4: every 4-subset holds a correct one
        (5, 0, 3, 0.0),  # c = 0: never
        (10, 1, 5, 0.5),  # 1 - C(9,5)/C(10,5) = 1 - 126/252
        (8, 8, 8, 1.0),
    ],
)
def test_pass_at_k_hand_worked(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_matches_subset_enumeration():
    """The fraction of k-subsets of n samples (c of them correct) that hold a correct one."""
    for n in range(1, 8):
        for c in range(n + 1):
            samples = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(samples, k))
                brute = sum(any(s) for s in subsets) / len(subsets)
                assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12), (n, c, k)


def test_pass_at_k_is_stable_for_large_n():
    # 1 - C(n-c, k)/C(n, k) with n = 1000, c = 10, k = 100, via exact integer binomials.
    exact = 1 - math.comb(990, 100) / math.comb(1000, 100)
    assert pass_at_k(1000, 10, 100) == pytest.approx(exact, rel=1e-12)


def test_pass_at_k_rejects_bad_input():
    with pytest.raises(ValueError, match=r"k=6.*n=5"):
        pass_at_k(5, 2, 6)
    with pytest.raises(ValueError, match="c=6"):
        pass_at_k(5, 6, 1)
    with pytest.raises(ValueError, match="k must be >= 1"):
        pass_at_k(5, 2, 0)


# ---------------------------------------------------------------------------------------
# Scoring hand-written completions

XML_OK = "<reasoning>\n6 * 12 = 72\n</reasoning>\n<answer>\n72\n</answer>"


@pytest.mark.parametrize(
    "text, fmt, gold, expected",
    [
        # follows xml, right answer: every flag on
        (XML_OK, "xml", "72", dict(answer="72", correct=True, strict_correct=True, follows_format=True)),
        # right answer as a `#### ` line under the xml prompt: the auto extractor finds it,
        # the xml parser does not
        ("6 * 12 = 72\n#### 72", "xml", "72",
         dict(answer="72", correct=True, strict_correct=False, follows_format=False)),
        # ... and under the hash prompt it is the format
        ("6 * 12 = 72\n#### 72", "hash", "72",
         dict(answer="72", correct=True, strict_correct=True, follows_format=True)),
        # no marker: the last number counts for pass@1 (71 is wrong)
        ("I think 72, no, 71.", "xml", "72",
         dict(answer="71", correct=False, strict_correct=False, follows_format=False)),
        # an <answer> block wins over a later bare number; commas and $ are normalized
        ("<answer>$1,234.50</answer> or 7", "xml", "1234.5",
         dict(answer="$1,234.50", correct=True, strict_correct=True, follows_format=False)),
        # no number at all
        ("I do not know.", "xml3", "3",
         dict(answer=None, correct=False, strict_correct=False, follows_format=False)),
    ],
)
def test_score_completion(text, fmt, gold, expected):
    assert score_completion(text, gold, fmt) == expected


def test_split_reasoning():
    assert split_reasoning(XML_OK, "xml") == ("6 * 12 = 72", "72")
    assert split_reasoning("Half of 8 is 4.\n#### 4", "hash") == ("Half of 8 is 4.", "4")
    assert split_reasoning("just 5", "xml") == ("just 5", "5")


def test_summarize_counts_greedy_and_samples():
    def comp(correct, strict=False, follows=False, tokens=10, truncated=False):
        return dict(completion="", answer=None, correct=correct, strict_correct=strict,
                    follows_format=follows, tokens=tokens, truncated=truncated)

    # question 0: greedy right and well formatted; samples 2 of 4 right
    # question 1: greedy wrong, truncated at 30 tokens; samples 0 of 4 right
    records = [
        {"greedy": comp(True, True, True, tokens=10), "samples": [comp(True), comp(True), comp(False), comp(False)],
         "pass@k": {"1": pass_at_k(4, 2, 1), "2": pass_at_k(4, 2, 2)}},
        {"greedy": comp(False, tokens=30, truncated=True), "samples": [comp(False)] * 4,
         "pass@k": {"1": 0.0, "2": 0.0}},
    ]
    s = summarize(records, [1, 2], 4)
    assert s["pass@1"] == 0.5 and s["strict_pass@1"] == 0.5 and s["format_rate"] == 0.5
    assert s["mean_completion_tokens"] == 20.0 and s["truncated_rate"] == 0.5
    assert s["sampled_pass@1"] == pytest.approx((0.5 + 0) / 2)
    assert s["pass@2"] == pytest.approx((1 - 1 / 6 + 0) / 2)  # 1 - C(2,2)/C(4,2) = 5/6
    assert s["n_questions"] == 2


# ---------------------------------------------------------------------------------------
# The loop on the tiny model: structure and reproducibility

ROWS = [
    {"question": "Ann has 3 pens and buys 4. How many?", "answer": "7"},
    {"question": "Bo has 9 cards and gives 2 away. How many?", "answer": "7"},
    {"question": "5 bags of 2 apples. How many apples?", "answer": "10"},
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread for this module: on a small shared CPU two spinning OpenMP threads
    made the tiny decode loop ~10x slower (8.4 s vs 0.9 s measured); restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(), tiny_tokenizer()


def run_tiny(tiny, **kw):
    model, tok = tiny
    args = dict(fmt="xml", k_list=(1, 2), n_samples=3, max_new_tokens=8, batch_size=4, seed=0, progress=False)
    return evaluate(model, tok, ROWS, **(args | kw))


def test_evaluate_records_and_summary(tiny):
    summary, records = run_tiny(tiny)
    assert [r["index"] for r in records] == [0, 1, 2]
    assert [r["gold"] for r in records] == ["7", "7", "10"]
    keys = {"completion", "answer", "correct", "strict_correct", "follows_format", "tokens", "truncated"}
    for r in records:
        assert set(r["greedy"]) == keys
        assert len(r["samples"]) == 3 and all(set(s) == keys for s in r["samples"])
        assert 1 <= r["greedy"]["tokens"] <= 8
        assert r["n_correct"] == sum(s["correct"] for s in r["samples"])
        assert set(r["pass@k"]) == {"1", "2"}
        # the record's flags agree with scoring its own text
        flags = score_completion(r["greedy"]["completion"], r["gold"], "xml")
        assert {k: r["greedy"][k] for k in flags} == flags
    assert summary["n_questions"] == 3 and summary["n_samples"] == 3
    assert summary["pass@1"] == sum(r["greedy"]["correct"] for r in records) / 3
    assert {"pass@2", "sampled_pass@1", "format_rate", "truncated_rate", "mean_completion_tokens"} <= set(summary)


def test_evaluate_is_reproducible_and_seeded(tiny):
    a = run_tiny(tiny, seed=1)
    assert run_tiny(tiny, seed=1) == a
    b = run_tiny(tiny, seed=2)
    texts = lambda res: [s["completion"] for r in res[1] for s in r["samples"]]  # noqa: E731
    assert texts(b) != texts(a)  # 9 random completions of up to 8 characters
    greedy = lambda res: [r["greedy"]["completion"] for r in res[1]]  # noqa: E731
    assert greedy(b) == greedy(a)  # greedy does not depend on the seed


def test_evaluate_greedy_only_and_batching(tiny):
    one = run_tiny(tiny, k_list=(1,), n_samples=0, batch_size=1)
    three = run_tiny(tiny, k_list=(1,), n_samples=0, batch_size=3)
    assert [r["greedy"] for r in one[1]] == [r["greedy"] for r in three[1]]
    assert all(r["samples"] == [] and r["pass@k"] == {} for r in one[1])
    assert "pass@2" not in one[0] and "sampled_pass@1" not in one[0]


def test_evaluate_rejects_bad_input(tiny):
    with pytest.raises(ValueError, match=r"pass@4 needs at least 4 samples.*n_samples=3"):
        run_tiny(tiny, k_list=(1, 4))
    with pytest.raises(ValueError, match=r"pass@2.*n_samples=0"):
        run_tiny(tiny, k_list=(2,), n_samples=0)
    model, tok = tiny
    with pytest.raises(ValueError, match="row 0 has no 'answer'"):
        evaluate(model, tok, [{"question": "q?"}], progress=False)
    with pytest.raises(ValueError, match="unknown prompt format"):
        evaluate(model, tok, ROWS, fmt="json", progress=False)


def test_write_results(tmp_path, tiny):
    summary, records = run_tiny(tiny)
    samples_path, summary_path = write_results(tmp_path / "out", summary, records,
                                               {"model": "tiny", "adapter": None, "dataset": "rows"})
    lines = samples_path.read_text().splitlines()
    assert [json.loads(line) for line in lines] == records
    written = json.loads(summary_path.read_text())
    assert written == {**summary, "model": "tiny", "adapter": None, "dataset": "rows"}
    assert {"pass@1", "pass@2", "format_rate", "n_questions", "mean_completion_tokens", "truncated_rate"} <= set(written)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["samples.jsonl", "summary.json"]


# ---------------------------------------------------------------------------------------
# test.py on bad input: one `error:` line, exit status 2, before any model is loaded


def load_cli():
    # `import test` would find the standard library's test package: load the file itself.
    spec = importlib.util.spec_from_file_location("grpo_test_cli", REPO / "test.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_missing_checkpoint_subprocess(tmp_path):
    missing = tmp_path / "no-such-run"
    proc = subprocess.run(
        [sys.executable, str(REPO / "test.py"), "--checkpoint", str(missing), "--limit", "2"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: --checkpoint") and "no such folder" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--k", "1,5", "--samples", "3"], "pass@5 needs at least 5 samples"),
        (["--k", "1,x"], "expected comma-separated integers"),
        (["--checkpoint", "{tmp}"], "neither an adapter"),
        (["--adapter", "{tmp}/nope"], "no such folder"),
        (["--dataset", "{tmp}/bad.jsonl"], "missing column 'answer'"),
        (["--dataset", "{tmp}/none.jsonl"], "no such file"),
    ],
)
def test_cli_bad_input(tmp_path, capsys, argv, message):
    (tmp_path / "bad.jsonl").write_text(json.dumps({"question": "q?", "solution": "#### 1"}) + "\n")
    cli = load_cli()
    code = cli.main([a.format(tmp=tmp_path) for a in argv] + ["--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_cli_adapter_of_another_base(tmp_path, capsys):
    """A LoRA trained on a 32-wide model, loaded onto a 64-wide base: named error, exit 2."""
    from peft import LoraConfig, get_peft_model

    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    tiny_model(hidden_size=64).save_pretrained(base_dir)
    tiny_tokenizer().save_pretrained(base_dir)
    other = get_peft_model(tiny_model(hidden_size=32), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    other.save_pretrained(adapter_dir)
    code = load_cli().main(["--model", str(base_dir), "--adapter", str(adapter_dir), "--question", "1+1?"])
    last = capsys.readouterr().err.splitlines()[-1]  # after the progress bars of save_pretrained
    assert code == 2
    assert last.startswith("error: adapter") and "trained on another base" in last


def test_cli_evaluates_and_answers_on_a_local_tiny_model(tmp_path, capsys, monkeypatch):
    base_dir = tmp_path / "base"
    tiny_model().save_pretrained(base_dir)
    tiny_tokenizer().save_pretrained(base_dir)
    cli = load_cli()
    out, traces = tmp_path / "eval", tmp_path / "traces.jsonl"
    code = cli.main(["--model", str(base_dir), "--dataset", "synthetic:4", "--k", "1,2", "--samples", "2",
                     "--max_new_tokens", "6", "--output", str(out), "--save_traces", str(traces),
                     "--no_progress"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_questions"] == 4 and summary["model"] == str(base_dir) and "pass@2" in summary
    assert len((out / "samples.jsonl").read_text().splitlines()) == 4
    assert len(traces.read_text().splitlines()) == 4 * (1 + 2)  # greedy + 2 samples per question

    code = cli.main(["--model", str(base_dir), "--question", "What is 2+2?", "--max_new_tokens", "6",
                     "--save_traces", str(traces)])
    assert code == 0
    assert "--- reasoning ---" in capsys.readouterr().out
    last = json.loads(traces.read_text().splitlines()[-1])
    assert last["question"] == "What is 2+2?" and set(last) >= {"completion", "reasoning", "answer"}

    # interactive: blank lines are skipped, `exit` ends the loop before "never asked"
    monkeypatch.setattr(sys, "stdin", io.StringIO("first?\n\nsecond?\nexit\nnever asked\n"))
    code = cli.main(["--model", str(base_dir), "--interactive", "--max_new_tokens", "4",
                     "--save_traces", str(traces)])
    assert code == 0
    assert capsys.readouterr().out.count("--- answer ---") == 2
    asked = [json.loads(line)["question"] for line in traces.read_text().splitlines()[-2:]]
    assert asked == ["first?", "second?"]
