"""Synthetic GSM8K-style word problems from our own templates (offline data for demos and tests).

Each problem is a short story (savings, shopping, sharing, rates, ages) whose solution takes
`steps` arithmetic operations. The solution is written in GSM8K's exact answer format, one
line per step with a calculator annotation, then the gold line:

    Mia earns 12+5 = $<<12+5=17>>17 in total.
    #### 17

so synthetic rows go through the same `parse_gold` as real data. Every intermediate value and
the answer are non-negative integers below about 1000 (divisions are exact), small enough for
a small model to compute. Generation uses one `random.Random(seed)`, never the global RNG:
the same seed gives the same problems, and `generate_problems(n, seed=s)[:k]` equals
`generate_problems(k, seed=s)` for the same step range.
"""

from __future__ import annotations

import random
from collections.abc import Callable

MAX_STEPS = 5
MAX_VALUE = 1000  # cap on every intermediate value, to keep the arithmetic small
_MAX_TRIES = 100

PEOPLE = [
    ("Mia", "she"), ("Liam", "he"), ("Ava", "she"), ("Noah", "he"), ("Emma", "she"),
    ("Omar", "he"), ("Sofia", "she"), ("Lucas", "he"), ("Chloe", "she"), ("Ethan", "he"),
    ("Priya", "she"), ("Mateo", "he"), ("Hana", "she"), ("Kofi", "he"), ("Lena", "she"),
]
ITEMS = [("notebooks", 2, 6), ("pens", 1, 3), ("apples", 1, 2), ("toy cars", 3, 9),
         ("books", 5, 15), ("candles", 2, 8)]
EXTRAS = [("a backpack", 15, 40), ("a lunch box", 5, 12), ("a poster", 3, 10),
          ("a water bottle", 4, 11), ("a scarf", 6, 20)]
GIVERS = ["friend", "cousin", "neighbor", "teacher", "brother", "sister"]
THINGS = ["stickers", "marbles", "cards", "beads", "shells", "stamps"]
RATES = [("reads", "pages", "read"), ("bakes", "cookies", "bake"),
         ("folds", "paper cranes", "fold"), ("paints", "tiles", "paint")]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"]


def generate_problems(
    n: int, *, seed: int = 0, min_steps: int = 1, max_steps: int = 3
) -> list[dict]:
    """`n` problems, rows `{"question", "answer": GSM8K solution text, "steps": int}`.

    The number of steps (solution lines with a calculator annotation) of each problem is
    drawn uniformly from `[min_steps, max_steps]`, within 1..5.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 1 <= min_steps <= max_steps <= MAX_STEPS:
        raise ValueError(
            f"need 1 <= min_steps <= max_steps <= {MAX_STEPS}, got {min_steps=}, {max_steps=}"
        )
    rng = random.Random(seed)
    return [_problem(rng, rng.randint(min_steps, max_steps)) for _ in range(n)]


class _Story:
    """A problem under construction: question sentences, solution lines, the running value."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.name, self.he = rng.choice(PEOPLE)
        self.his, self.him = ("her", "her") if self.he == "she" else ("his", "him")
        self.sentences: list[str] = []
        self.lines: list[str] = []

    def say(self, sentence: str) -> None:
        self.sentences.append(sentence[0].upper() + sentence[1:])

    def step(self, a: int, op: str, b: int, line: str, money: bool = False) -> int:
        """Append one solution line; `line` has a `{calc}` slot for `a op b = <<a op b=r>>r`."""
        r = _apply(a, op, b)
        expr = f"{a}{op}{b}"
        calc = f"{expr} = {'$' if money else ''}<<{expr}={r}>>{r}"
        line = line.format(calc=calc)
        self.lines.append(line[0].upper() + line[1:])
        return r


def _apply(a: int, op: str, b: int) -> int:
    if op == "+":
        r = a + b
    elif op == "-":
        r = a - b
    elif op == "*":
        r = a * b
    elif op == "/":
        if b == 0 or a % b:
            raise _Reject
        r = a // b
    else:
        raise ValueError(f"unknown operator {op!r}")
    if not 0 <= r <= MAX_VALUE:
        raise _Reject
    return r


class _Reject(Exception):
    """This draw of numbers does not give a valid problem; draw again."""


def _problem(rng: random.Random, steps: int) -> dict:
    # The template is drawn once, then redrawn numbers until they fit, so that every
    # template is equally likely whatever its rejection rate.
    template = rng.choice(TEMPLATES)
    for _ in range(_MAX_TRIES):
        story = _Story(rng)
        try:
            answer = template(story, steps)
        except _Reject:
            continue
        assert len(story.lines) == steps, (template.__name__, story.lines)
        solution = "\n".join([*story.lines, f"#### {answer}"])
        return {"question": " ".join(story.sentences), "answer": solution, "steps": steps}
    raise RuntimeError(f"{template.__name__}: no valid {steps}-step problem in {_MAX_TRIES} tries")


# Templates: `template(story, steps) -> answer`; each emits exactly `steps` solution lines
# and ends the question with its question sentence. A middle event may take two steps;
# `_events` picks events that fit the steps left.


def _events(story: _Story, steps: int, events: list[tuple[int, Callable[[], None]]]) -> None:
    """Run randomly chosen `(cost, event)` pairs until exactly `steps` steps are used."""
    left = steps
    while left > 0:
        cost, event = story.rng.choice([e for e in events if e[0] <= left])
        event()
        left -= cost


def _savings(s: _Story, steps: int) -> int:
    rng = s.rng
    x = rng.randint(10, 60)
    s.say(f"{s.name} has ${x} in a piggy bank.")

    def earn():
        nonlocal x
        b = rng.randint(3, 30)
        s.say(f"{s.he} earns ${b} walking dogs.")
        x = s.step(x, "+", b, f"After walking dogs {s.name} has {{calc}}.", money=True)

    def spend():
        nonlocal x
        b = rng.randint(1, max(1, x - 1))
        s.say(f"{s.he} spends ${b} on a gift.")
        x = s.step(x, "-", b, f"After buying the gift {s.he} has {{calc}}.", money=True)

    def double():
        nonlocal x
        s.say(f"{s.his} grandmother doubles the money in the piggy bank.")
        x = s.step(x, "*", 2, f"After the gift from {s.his} grandmother {s.he} has {{calc}}.",
                   money=True)

    def half():
        nonlocal x
        if x % 2:
            raise _Reject
        s.say(f"{s.he} puts half of {s.his} money into a bank account.")
        x = s.step(x, "/", 2, f"{s.he} keeps {{calc}} in the piggy bank.",
                   money=True)

    def weekly():
        nonlocal x
        b, k = rng.randint(2, 12), rng.randint(2, 6)
        s.say(f"{s.he} saves ${b} a week for {k} weeks.")
        w = s.step(b, "*", k, f"In {k} weeks {s.he} saves {{calc}}.", money=True)
        x = s.step(x, "+", w, f"Then {s.he} has {{calc}}.", money=True)

    _events(s, steps, [(1, earn), (1, spend), (1, double), (1, half), (2, weekly)])
    s.say(f"how much money is in {s.name}'s piggy bank now?")
    return x


def _shopping(s: _Story, steps: int) -> int:
    rng = s.rng
    items = rng.sample(ITEMS, 3)
    name, lo, hi = items.pop()
    a, p = rng.randint(2, 9), rng.randint(lo, hi)
    s.say(f"{s.name} buys {a} {name} that cost ${p} each.")
    x = s.step(a, "*", p, f"The {name} cost {{calc}}.", money=True)
    extras = rng.sample(EXTRAS, len(EXTRAS))  # each extra bought at most once
    coupon_used = False

    def extra():
        nonlocal x
        what, lo, hi = extras.pop()
        b = rng.randint(lo, hi)
        s.say(f"{s.he} also buys {what} for ${b}.")
        x = s.step(x, "+", b, f"With {what} the total is {{calc}}.", money=True)

    def coupon():
        nonlocal x, coupon_used
        if coupon_used or x < 4:
            raise _Reject
        coupon_used = True
        b = rng.randint(1, min(10, x // 2))
        s.say(f"{s.he} uses a coupon for ${b} off.")
        x = s.step(x, "-", b, "With the coupon the total is {calc}.", money=True)

    def more_items():
        nonlocal x
        if not items:
            raise _Reject
        name, lo, hi = items.pop()
        k, q = rng.randint(2, 6), rng.randint(lo, hi)
        s.say(f"{s.he} also buys {k} {name} for ${q} each.")
        c = s.step(k, "*", q, f"The {name} cost {{calc}}.", money=True)
        x = s.step(x, "+", c, "Together that is {calc}.", money=True)

    _events(s, steps - 1, [(1, extra), (1, coupon), (2, more_items)])
    s.say(f"how much does {s.name} pay in total?")
    return x


def _sharing(s: _Story, steps: int) -> int:
    rng = s.rng
    things = rng.choice(THINGS)
    x = rng.randint(12, 60)
    s.say(f"{s.name} has {x} {things}.")

    def gets():
        nonlocal x
        b = rng.randint(2, 25)
        giver = rng.choice(GIVERS)
        s.say(f"{s.his} {giver} gives {s.him} {b} more {things}.")
        x = s.step(x, "+", b, f"{s.name} then has {{calc}} {things}.")

    def loses():
        nonlocal x
        b = rng.randint(1, max(1, x // 3))
        s.say(f"{s.he} loses {b} of them.")
        x = s.step(x, "-", b, f"{s.he} has {{calc}} {things} left.")

    def packs():
        nonlocal x
        k, m = rng.randint(2, 5), rng.randint(3, 12)
        s.say(f"{s.he} buys {k} packs with {m} {things} in each pack.")
        c = s.step(k, "*", m, f"The packs hold {{calc}} {things}.")
        x = s.step(x, "+", c, f"Now {s.he} has {{calc}} {things}.")

    _events(s, steps - 1, [(1, gets), (1, loses), (2, packs)])
    divisors = [k for k in range(2, 10) if x % k == 0]
    if not divisors:
        raise _Reject
    k = rng.choice(divisors)
    s.say(f"{s.he} shares all the {things} equally among {k} friends.")
    x = s.step(x, "/", k, f"Each friend gets {{calc}} {things}.")
    s.say(f"how many {things} does each friend get?")
    return x


def _rates(s: _Story, steps: int) -> int:
    rng = s.rng
    verb, unit, base = rng.choice(RATES)
    r, h = rng.randint(3, 20), rng.randint(2, 6)
    days = iter(DAYS)
    day = next(days)
    s.say(f"{s.name} {verb} {r} {unit} an hour. On {day}, {s.he} {verb} for {h} hours.")
    x = s.step(r, "*", h, f"On {day} {s.name} {verb} {{calc}} {unit}.")

    def hours():
        nonlocal x
        day, k = next(days), rng.randint(1, 5)
        s.say(f"On {day}, {s.he} {verb} for {k} hours.")
        c = s.step(r, "*", k, f"On {day} {s.he} {verb} {{calc}} {unit}.")
        x = s.step(x, "+", c, f"So far that is {{calc}} {unit}.")

    def amount():
        nonlocal x
        day, b = next(days), rng.randint(2, 30)
        s.say(f"On {day}, {s.he} {verb} {b} {unit}.")
        x = s.step(x, "+", b, f"After {day} the total is {{calc}} {unit}.")

    _events(s, steps - 1, [(1, amount), (2, hours)])
    s.say(f"how many {unit} does {s.name} {base} in total?")
    return x


def _ages(s: _Story, steps: int) -> int:
    rng = s.rng
    names = [name for name, _ in rng.sample(PEOPLE, steps + 1)]
    age = rng.randint(4, 30)
    s.say(f"{names[0]} is {age} years old.")
    for prev, name in zip(names, names[1:]):
        kind = rng.choice(["older", "younger", "twice", "half"])
        if kind == "older":
            b = rng.randint(2, 15)
            s.say(f"{name} is {b} years older than {prev}.")
            age = s.step(age, "+", b, f"{name} is {{calc}} years old.")
        elif kind == "younger":
            if age < 4:
                raise _Reject
            b = rng.randint(1, age // 2)
            s.say(f"{name} is {b} years younger than {prev}.")
            age = s.step(age, "-", b, f"{name} is {{calc}} years old.")
        elif kind == "twice":
            if age > 45:
                raise _Reject
            s.say(f"{name} is twice as old as {prev}.")
            age = s.step(age, "*", 2, f"{name} is {{calc}} years old.")
        else:
            if age % 2 or age < 4:
                raise _Reject
            s.say(f"{name} is half as old as {prev}.")
            age = s.step(age, "/", 2, f"{name} is {{calc}} years old.")
    s.say(f"how old is {names[-1]}?")
    return age


TEMPLATES: list[Callable[[_Story, int], int]] = [_savings, _shopping, _sharing, _rates, _ages]
