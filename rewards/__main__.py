"""Self-check: `python -m rewards` runs the worked examples of every registered reward.

The examples live in one place, the `>>>` lines of each reward's docstring, so the
documentation and this check cannot disagree. Prints, per example, the registry name,
the input, the expected and the obtained value; exits 1 on any mismatch, or when a
registered reward has no worked example. The factories' examples are run too.
"""

from __future__ import annotations

import doctest
import sys
from collections.abc import Callable

from rewards.functions import make_length_reward, make_repetition_reward
from rewards.registry import REGISTRY

# Documented callables outside the registry whose examples are checked too.
EXTRAS: dict[str, Callable] = {"make_length_reward": make_length_reward, "make_repetition_reward": make_repetition_reward}


class _Reporter(doctest.DocTestRunner):
    """A doctest runner that prints one line per example, passed or not."""

    def report_start(self, out, test, example):  # silence doctest's own verbose output
        pass

    @staticmethod
    def _line(out, status: str, test, example, got: str) -> None:
        # `out`, not print: doctest captures sys.stdout while it runs the examples
        source = " ".join(line.strip() for line in example.source.strip().splitlines())
        out(f"{status} {test.name}\n    input:    {source}\n    expected: {example.want.strip()}\n    got:      {got}\n")

    def report_success(self, out, test, example, got):
        self._line(out, "ok  ", test, example, got.strip())

    def report_failure(self, out, test, example, got):
        self._line(out, "FAIL", test, example, got.strip())

    def report_unexpected_exception(self, out, test, example, exc_info):
        self._line(out, "FAIL", test, example, f"raised {exc_info[0].__name__}: {exc_info[1]}")


def check(registry: dict[str, Callable] | None = None) -> int:
    """Run the docstring examples of each reward (default: REGISTRY and EXTRAS); return
    the number of problems (failed examples, rewards without an example)."""
    registry = {**REGISTRY, **EXTRAS} if registry is None else registry
    parser, runner = doctest.DocTestParser(), _Reporter(optionflags=doctest.NORMALIZE_WHITESPACE)
    problems = attempted = 0
    for name, fn in registry.items():
        examples = parser.get_examples(fn.__doc__ or "")
        if not examples:
            print(f"FAIL {name}: its docstring has no worked example (a '>>>' line)")
            problems += 1
            continue
        globs = {**getattr(fn, "__globals__", {}), getattr(fn, "__name__", name): fn}
        test = doctest.DocTest(examples, globs, name, filename=None, lineno=None, docstring=fn.__doc__)
        result = runner.run(test, clear_globs=True)
        problems += result.failed
        attempted += result.attempted
    print(f"{attempted - problems}/{attempted} examples ok" if not problems else f"{problems} problem(s)")
    return problems


def main() -> int:
    return 1 if check() else 0


if __name__ == "__main__":
    sys.exit(main())
