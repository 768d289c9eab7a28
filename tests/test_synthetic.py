"""Synthetic GSM8K-style problems: reproducible, well-formed, and arithmetically right."""

from __future__ import annotations

import random
import re

import pytest

from data import generate_problems, parse_gold

# One calculator annotation `<<a op b=r>>` followed by its result, as the generator writes it.
ANNOTATION = re.compile(r"<<(\d+)([-+*/])(\d+)=(\d+)>>(\d+)")


def calc(a: int, op: str, b: int) -> int:
    """The obvious reference for one annotation (no eval); division must be exact."""
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    assert b != 0 and a % b == 0, f"{a}/{b} is not an exact division"
    return a // b


def test_calc_reference():
    # The reference itself: 48/2 = 24, 48+24 = 72, 7-9 = -2, 6*7 = 42; 7/2 is not exact.
    assert calc(48, "/", 2) == 24 and calc(48, "+", 24) == 72
    assert calc(7, "-", 9) == -2 and calc(6, "*", 7) == 42
    with pytest.raises(AssertionError):
        calc(7, "/", 2)


def test_reproducible_by_seed_and_prefix_stable():
    a = generate_problems(50, seed=7, max_steps=5)
    assert a == generate_problems(50, seed=7, max_steps=5)
    assert generate_problems(10, seed=7, max_steps=5) == a[:10]
    assert [p["question"] for p in generate_problems(50, seed=8, max_steps=5)] != [
        p["question"] for p in a
    ]


def test_global_rng_is_untouched():
    random.seed(123)
    expected = random.random()
    random.seed(123)
    generate_problems(20, seed=1)
    assert random.random() == expected


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_problem_is_well_formed_and_right(seed):
    problems = generate_problems(300, seed=seed, min_steps=1, max_steps=5)
    for p in problems:
        assert set(p) == {"question", "answer", "steps"}
        assert p["question"].endswith("?") and p["question"][0].isupper()
        reasoning, gold = parse_gold(p["answer"])
        lines = reasoning.split("\n")
        assert len(lines) == p["steps"]  # one line per step
        results = []
        for line in lines:
            found = ANNOTATION.findall(line)
            assert len(found) == 1, line  # exactly one annotation per line
            a, op, b, r, shown = found[0]
            assert calc(int(a), op, int(b)) == int(r) == int(shown), line
            assert f"{a}{op}{b} = " in line  # the prose states the same expression
            assert 0 <= int(r) <= 1000
            results.append(int(r))
        # The gold is the last step's result, a non-negative integer.
        assert gold == str(results[-1])
        assert p["answer"].endswith(f"\n#### {gold}")


def test_steps_respected_and_all_used():
    problems = generate_problems(400, seed=3, min_steps=2, max_steps=4)
    steps = [p["steps"] for p in problems]
    assert set(steps) == {2, 3, 4}
    assert all(len(ANNOTATION.findall(p["answer"])) == p["steps"] for p in problems)
    assert {p["steps"] for p in generate_problems(30, seed=0, min_steps=5, max_steps=5)} == {5}
    assert {p["steps"] for p in generate_problems(30, seed=0, min_steps=1, max_steps=1)} == {1}


def test_templates_vary():
    # All five story templates appear in 200 problems (each has a distinctive question).
    questions = [p["question"] for p in generate_problems(200, seed=0)]
    for marker in ("piggy bank", "pay in total", "each friend get", "an hour", "How old is"):
        assert any(marker in q for q in questions), marker
    assert len(set(questions)) > 190


def test_argument_validation():
    assert generate_problems(0) == []
    with pytest.raises(ValueError, match="n must be >= 0"):
        generate_problems(-1)
    for lo, hi in [(0, 3), (3, 2), (1, 6)]:
        with pytest.raises(ValueError, match="1 <= min_steps <= max_steps <= 5"):
            generate_problems(5, min_steps=lo, max_steps=hi)
