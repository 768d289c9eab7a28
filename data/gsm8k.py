"""GSM8K loading: a hub id, a local file or folder, or the offline synthetic generator.

A GSM8K answer text is a reasoning chain with calculator annotations, then a final line
with the gold number (Cobbe et al. 2021, "Training Verifiers to Solve Math Word Problems"):

    Natalia sold 48/2 = <<48/2=24>>24 clips in May.
    Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.
    #### 72

`load_gsm8k` turns each row into
`{"question", "answer": canonical gold ("72"), "reasoning": chain, "solution": original}`
plus any extra columns of the input, so that every source looks the same downstream.

Sources (`load_gsm8k(source, split)`):
- `"synthetic"`, `"synthetic:N"`, `"synthetic:N:SEED"`: `N` problems (default 1000) from
  `data.synthetic.generate_problems` with seed `SEED` (default 0) for the train split and
  `SEED + 1` for the test split, so that the two splits differ; 1 to 3 steps each.
- a local `.jsonl`, `.json` (an array of objects, or JSON lines as `datasets` writes them)
  or `.parquet` file with `question` and `answer` columns; `split` is then ignored;
- a local folder holding `{split}.jsonl|json|parquet`, or the Hugging Face repo layout
  `{split}-*.parquet` (directly or under `main/`, e.g. `main/test-00000-of-00001.parquet`);
- anything else is a hub id, loaded with `datasets.load_dataset(source, "main", split=split)`.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

from data.answers import canonical_number, parse_number

SYNTHETIC_SIZE = 1000
SYNTHETIC_SPLIT_SEED_OFFSET = {"train": 0, "test": 1}
FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
REQUIRED_COLUMNS = ("question", "answer")

_CALCULATOR = re.compile(r"<<[^<>]*>>")


class DataError(ValueError):
    """Bad data: the message names the file (or hub id), the 1-based row and the problem."""


def strip_calculator(text: str) -> str:
    """Remove GSM8K calculator annotations: `"48/2 = <<48/2=24>>24"` -> `"48/2 = 24"`."""
    return _CALCULATOR.sub("", text)


def parse_gold(solution: str, *, where: str = "") -> tuple[str, str]:
    """Split a GSM8K answer text into (reasoning chain, canonical gold number).

    `"Half is 48/2 = <<48/2=24>>24.\\n#### 24"` -> `("Half is 48/2 = <<48/2=24>>24.", "24")`.
    The chain keeps its calculator annotations (see `strip_calculator`). The gold is
    normalized by `canonical_number` (`"#### 1,000"` -> `"1000"`). `where` (e.g.
    `"train.jsonl, row 3"`) prefixes the DataError raised when there is no `####` line or
    the text after it is not a number.
    """
    prefix = f"{where}: " if where else ""
    if not isinstance(solution, str):
        raise DataError(f"{prefix}answer must be a string, got {type(solution).__name__}")
    if "####" not in solution:
        raise DataError(
            f"{prefix}answer has no '#### N' line: {_clip(solution)!r}; end each answer with a "
            "line '#### N', N the final number (the GSM8K layout)"
        )
    reasoning, _, gold_text = solution.rpartition("####")
    gold = parse_number(gold_text)
    if gold is None:
        raise DataError(
            f"{prefix}gold answer after '####' is not a number: {gold_text.strip()!r}; write the "
            "final answer as a number after '####', e.g. '#### 72'"
        )
    return reasoning.strip(), canonical_number(gold)


def load_gsm8k(
    source: str = "openai/gsm8k",
    split: str = "train",
    *,
    limit: int | None = None,
    keep_calculator: bool = False,
    on_error: str = "raise",
) -> list[dict]:
    """Load GSM8K-style rows from `source` (see the module docstring for the forms).

    Returns the first `limit` valid rows (all when None), each
    `{"question", "answer", "reasoning", "solution", **extra columns}`. `reasoning` has its
    calculator annotations stripped unless `keep_calculator`. `on_error="raise"` raises a
    DataError naming the file and row of the first bad row; `on_error="skip"` drops bad rows
    and warns once with their count and the first error. A source with no valid row at
    all, and a file that cannot be read as a whole (bad JSON line, corrupt parquet),
    raise in both modes.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    records = load_rows(source, split)
    rows: list[dict] = []
    errors: list[str] = []
    for where, raw in records:
        if limit is not None and len(rows) >= limit:
            break
        try:
            rows.append(_gsm8k_row(raw, where, keep_calculator))
        except DataError as err:
            if on_error == "raise":
                raise
            errors.append(str(err))
    if not rows:
        first = f"; first error: {errors[0]}" if errors else ""
        raise DataError(f"{source}: no valid rows (split {split!r}){first}")
    if errors:
        warnings.warn(
            f"load_gsm8k: skipped {len(errors)} bad row(s) of {source}; first: {errors[0]}",
            stacklevel=2,
        )
    return rows


def load_rows(source: str, split: str = "train") -> list[tuple[str, dict]]:
    """Raw rows of `source` as `(where, row)` pairs; `where` names the source and 1-based row.

    Raises DataError for an unreadable or nonexistent path, a malformed file, no rows,
    or a hub id that cannot be loaded.
    """
    if source == "synthetic" or source.startswith("synthetic:"):
        return _synthetic_rows(source, split)
    path = Path(source).expanduser()
    if path.is_dir():
        return _read_files(_split_files(path, split))
    if path.exists():
        return _read_files([path])
    if path.suffix in FILE_SUFFIXES or source.startswith((".", "/", "~")):
        raise DataError(
            f"{source}: no such file or folder; check the path, or pass a .jsonl/.json/.parquet file, "
            "a folder of them, a hub id (openai/gsm8k) or 'synthetic'"
        )
    return _hub_rows(source, split)


def _gsm8k_row(raw: dict, where: str, keep_calculator: bool) -> dict:
    missing = [c for c in REQUIRED_COLUMNS if c not in raw]
    if missing:
        raise DataError(
            f"{where}: missing column {missing[0]!r} (columns found: {sorted(raw)}); every row needs "
            "'question' and 'answer' (GSM8K's names): rename the columns to these"
        )
    question = raw["question"]
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"{where}: question must be a non-empty string, got {question!r}")
    reasoning, gold = parse_gold(raw["answer"], where=where)
    if not keep_calculator:
        reasoning = strip_calculator(reasoning)
    return {
        **raw,
        "question": question,
        "answer": gold,
        "reasoning": reasoning,
        "solution": raw["answer"],
    }


def _synthetic_rows(source: str, split: str) -> list[tuple[str, dict]]:
    from data.synthetic import generate_problems

    parts = source.split(":")[1:]
    try:
        size = int(parts[0]) if parts else SYNTHETIC_SIZE
        seed = int(parts[1]) if len(parts) > 1 else 0
        if len(parts) > 2 or size < 1:
            raise ValueError
    except ValueError:
        raise DataError(
            f"{source}: expected 'synthetic', 'synthetic:N' or 'synthetic:N:SEED' with N >= 1"
        ) from None
    if split not in SYNTHETIC_SPLIT_SEED_OFFSET:
        raise DataError(
            f"{source}: unknown split {split!r} (synthetic splits: "
            f"{sorted(SYNTHETIC_SPLIT_SEED_OFFSET)})"
        )
    problems = generate_problems(size, seed=seed + SYNTHETIC_SPLIT_SEED_OFFSET[split])
    return [(f"{source} ({split}), row {i}", row) for i, row in enumerate(problems, 1)]


def _split_files(folder: Path, split: str) -> list[Path]:
    """The files of `split` in `folder`: `{split}.jsonl|json|parquet` or `{split}-*.parquet`."""
    for base in (folder, folder / "main"):
        for suffix in FILE_SUFFIXES:
            if (base / f"{split}{suffix}").is_file():
                return [base / f"{split}{suffix}"]
        shards = sorted(base.glob(f"{split}-*.parquet"))
        if shards:
            return shards
    found = sorted({p.name.split(".")[0].split("-")[0] for base in (folder, folder / "main") if base.is_dir()
                    for p in base.iterdir() if p.suffix in FILE_SUFFIXES})
    raise DataError(
        f"{folder}: no file for split {split!r} (looked for {split}.jsonl, {split}.json, "
        f"{split}.parquet and {split}-*.parquet, also under main/); "
        + (f"the splits there are {', '.join(found)}: choose one (train.py --dataset_split, test.py --split)"
           if found else "the folder holds no .jsonl/.json/.parquet file")
    )


def _read_files(paths: list[Path]) -> list[tuple[str, dict]]:
    records = [rec for path in paths for rec in _read_file(path)]
    if not records:
        raise DataError(
            f"{', '.join(map(str, paths))}: no rows (empty file); write one JSON object per line, "
            'e.g. {"question": "...", "answer": "... #### 72"}'
        )
    return records


def _read_file(path: Path) -> list[tuple[str, dict]]:
    if path.suffix not in FILE_SUFFIXES:
        raise DataError(f"{path}: unsupported file type (expected one of {FILE_SUFFIXES})")
    try:
        if path.suffix == ".parquet":
            return _read_parquet(path)
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark (some editors write one) is not data
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read file ({err})") from err
    if path.suffix == ".json" and text.lstrip().startswith("["):
        return _read_json_array(path, text)
    # `.jsonl`, and `.json` written as JSON lines (what `Dataset.to_json` writes).
    return _read_json_lines(path, text)


def _read_json_lines(path: Path, text: str) -> list[tuple[str, dict]]:
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(
                f"{path}, line {lineno}: malformed JSON ({err.msg} at column {err.colno})"
            ) from None
        where = f"{path}, row {len(records) + 1} (line {lineno})"
        records.append((where, _as_dict(row, where)))
    return records


def _read_json_array(path: Path, text: str) -> list[tuple[str, dict]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(
            f"{path}, line {err.lineno}: malformed JSON ({err.msg} at column {err.colno})"
        ) from None
    wheres = [f"{path}, row {i}" for i in range(1, len(data) + 1)]
    return [(where, _as_dict(row, where)) for where, row in zip(wheres, data)]


def _read_parquet(path: Path) -> list[tuple[str, dict]]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow raises several types for a corrupt file
        raise DataError(f"{path}: cannot read parquet file ({err})") from err
    return [(f"{path}, row {i}", row) for i, row in enumerate(rows, 1)]


def _as_dict(row: object, where: str) -> dict:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    return row


def _hub_rows(source: str, split: str) -> list[tuple[str, dict]]:
    try:
        import datasets

        ds = datasets.load_dataset(source, "main", split=split)
    except Exception as err:  # offline, unknown id, unknown split, ... all end the same way
        raise DataError(
            f"{source}: could not load hub dataset (config 'main', split {split!r}): "
            f"{type(err).__name__}: {_clip(str(err))}. Without network access, point "
            f"`source` at a local copy instead: a .jsonl/.json/.parquet file, or a folder "
            f"with {split}.jsonl or the repo layout main/{split}-*.parquet; or use 'synthetic'."
        ) from err
    return [(f"{source} ({split}), row {i}", dict(row)) for i, row in enumerate(ds, 1)]


def _clip(text: str, n: int = 200) -> str:
    return text if len(text) <= n else text[:n] + "..."
