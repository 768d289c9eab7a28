"""Reward library (rewards/): every reward by hand, properties of correctness, the
registry and get_reward, compute_rewards (weights, None, errors), the self-check."""

import math
import re
import sys
import textwrap

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import rewards
from rewards import (
    REGISTRY,
    RewardError,
    compute_rewards,
    completion_text,
    consistency_reward,
    correctness_reward,
    get_reward,
    hash_format_reward,
    int_reward,
    length_reward,
    make_length_reward,
    make_repetition_reward,
    reasoning_reward,
    repetition_reward,
    soft_format_reward,
    strict_format_reward,
    xmlcount_reward,
)

STRICT = "<reasoning>\n3 + 4 = 7\n</reasoning>\n<answer>\n7\n</answer>"


def chat(text):
    return [{"role": "assistant", "content": text}]


# -------------------------------------------------------------------------- inputs


def test_completion_text_forms():
    assert completion_text("hi") == "hi"
    assert completion_text([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]) == "a"
    assert completion_text(chat([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}])) == "ab"
    assert completion_text(chat(None)) == ""
    with pytest.raises(ValueError, match="empty list"):
        completion_text([])
    with pytest.raises(TypeError, match="got int"):
        completion_text(7)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_reward_takes_chat_messages_and_ignores_unknown_columns(name):
    fn = REGISTRY[name]
    texts = [STRICT, "so 12\n#### 12"]
    plain = fn(["q1", "q2"], texts, answer=["7", "12"], extra_column=[1, 2])
    as_chat = fn(["q1", "q2"], [chat(t) for t in texts], answer=["7", "12"], extra_column=[1, 2])
    assert as_chat == plain and len(plain) == 2
    assert all(v is None or isinstance(v, float) for v in plain)


def test_empty_batch():
    assert all(fn([], [], answer=[]) == [] for fn in REGISTRY.values())


# -------------------------------------------------------------------- correctness


@pytest.mark.parametrize(
    "completion, gold, expected",
    [
        (STRICT, "7", 1.0),
        ("<answer>\n$1,234.50\n</answer>", "1234.5", 1.0),
        ("... so the total is\n#### 1,234", "1234", 1.0),
        ("She pays -3 dollars", "-3", 1.0),
        ("2/3", "0.6667", 1.0),  # 0.66667 vs 0.6667: within rel 1e-4
        ("The rate is 10%.", "10", 1.0),
        ("She has 18 dollars.", "18", 1.0),
        ("3 + 4 = 7, then 7 * 2 = 14.", "14", 1.0),  # several numbers: the last one
        ("I think 7, or 8.", "7", 0.0),
        ("<answer>7</answer> and later 8", "7", 1.0),  # the answer block wins over later numbers
        ("<answer>seven</answer> 7", "7", 0.0),  # the block is the answer, it holds no number
        ("I don't know", "7", 0.0),
        ("", "7", 0.0),
        (STRICT, "Janet sells 3 + 4 = <<3+4=7>>7 eggs.\n#### 7", 1.0),  # full GSM8K solution as gold
        (STRICT, 7, 1.0),  # a numeric gold
        (STRICT, "n/a", None),  # gold without a number: not applicable
    ],
)
def test_correctness(completion, gold, expected):
    assert correctness_reward(None, [completion], answer=[gold]) == [expected]


def test_correctness_needs_an_aligned_answer_column():
    with pytest.raises(ValueError, match="column 'answer'"):
        correctness_reward(None, ["7"])
    with pytest.raises(ValueError, match="column 'answer' has 1 values, expected a list of 2"):
        correctness_reward(None, ["7", "8"], answer=["7"])


SPELLINGS = [
    lambda n: str(n),
    lambda n: f"${n}" if n >= 0 else f"-${-n}",
    lambda n: f"{n:,}",
    lambda n: f"{n}.0",
    lambda n: f"<reasoning>\nwork\n</reasoning>\n<answer>\n{n}\n</answer>",
    lambda n: f"step 1\nstep 2\n#### {n}",
    lambda n: f"The answer is {n}.",
]


@given(st.integers(min_value=-(10**9), max_value=10**9), st.sampled_from(range(len(SPELLINGS))))
def test_correctness_property_right_answer(n, k):
    text = SPELLINGS[k](n)
    assert correctness_reward(None, [text], answer=[str(n)]) == [1.0], text
    assert correctness_reward(None, [chat(text)], answer=[str(n)]) == [1.0], text


@given(st.integers(-(10**9), 10**9), st.integers(-(10**9), 10**9), st.sampled_from(range(len(SPELLINGS))))
def test_correctness_property_wrong_answer(n, m, k):
    if n == m:
        m += 1
    assert correctness_reward(None, [SPELLINGS[k](n)], answer=[str(m)]) == [0.0]


# ----------------------------------------------------------------------- format


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("<answer>\n72\n</answer>", 0.5),
        ("<answer>1,234</answer>", 0.5),
        ("... \n#### -3", 0.5),
        ("<answer>72.5</answer>", 0.0),
        ("<answer>72 apples</answer>", 0.0),
        ("<answer>$72</answer>", 0.0),
        ("the answer is 72", 0.0),  # no marker: free text gets no int credit
        ("", 0.0),
    ],
)
def test_int(completion, expected):
    assert int_reward(None, [completion]) == [expected]


@pytest.mark.parametrize(
    "completion, expected",
    [
        (STRICT, 0.5),
        (STRICT + "\n\n", 0.5),  # trailing whitespace is fine
        ("\n" + STRICT, 0.0),  # nothing may come before
        (STRICT + "\nmore", 0.0),
        ("<reasoning>3 + 4 = 7</reasoning>\n<answer>7</answer>", 0.0),  # newlines required
        ("<reasoning>\n \n</reasoning>\n<answer>\n7\n</answer>", 0.0),  # blank reasoning
        (STRICT + "\n<answer>\n8\n</answer>", 0.0),  # a second answer block
        ("<reasoning>\na\n</reasoning>\n<reasoning>\nb\n</reasoning>\n<answer>\n7\n</answer>", 0.0),
        ("", 0.0),
    ],
)
def test_strict_format(completion, expected):
    assert strict_format_reward(None, [completion]) == [expected]


@pytest.mark.parametrize(
    "completion, expected",
    [
        (STRICT, 0.5),
        ("Sure. <reasoning>x</reasoning><answer>7</answer> bye", 0.5),
        ("<reasoning>x</reasoning> words <answer>7</answer>", 0.0),  # only whitespace between
        ("<answer>7</answer><reasoning>x</reasoning>", 0.0),  # wrong order
        ("<reasoning>x</reasoning><answer>7", 0.0),  # unclosed
        ("", 0.0),
    ],
)
def test_soft_format(completion, expected):
    assert soft_format_reward(None, [completion]) == [expected]


SOFT_REFERENCE = re.compile(r"<reasoning>.*?</reasoning>\s*<answer>.*?</answer>", re.DOTALL)


@given(st.lists(st.sampled_from(["<reasoning>", "</reasoning>", "<answer>", "</answer>", " ", "\n", "x"]), max_size=12))
def test_soft_format_matches_the_regex_reference(parts):
    text = "".join(parts)
    assert soft_format_reward(None, [text]) == [0.5 if SOFT_REFERENCE.search(text) else 0.0], text


@pytest.mark.parametrize(
    "completion, expected",
    [
        (STRICT, 0.5),  # 4 tags x 0.125
        (STRICT + "\n", 0.5),  # whitespace after </answer> is not penalized
        (STRICT + "\nThanks!", 0.5 - 7 / 1000),  # 7 chars after </answer>
        (STRICT + "x" * 2000, 0.0),  # penalty capped at 0.5
        ("<answer>\n7\n</answer>" + "x" * 2000, 0.125 - 0.5),  # one tag (\n</answer>), capped penalty
        ("<reasoning>\nx\n</reasoning>\n", 0.25),  # reasoning tags only, no penalty
        ("<reasoning>\n<reasoning>\nx\n</reasoning>\n<answer>\n7\n</answer>", 0.375),  # tag twice: no credit
        ("", 0.0),
    ],
)
def test_xmlcount(completion, expected):
    assert xmlcount_reward(None, [completion]) == [pytest.approx(expected, abs=1e-12)]


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("3 + 4 = 7\n#### 7", 0.5),
        ("#### 7", 0.5),
        ("3 + 4 = 7\n####7\n\n", 0.5),
        ("3 + 4 = 7\n#### $1,234.50", 0.5),
        ("#### 7\nDone.", 0.0),  # not the last line
        ("3 + 4 = 7 #### 7", 0.0),  # not at the start of a line
        ("#### seven", 0.0),
        ("####", 0.0),
        ("the answer is 7", 0.0),
    ],
)
def test_hash_format(completion, expected):
    assert hash_format_reward(None, [completion]) == [expected]


# --------------------------------------------------------------------- shaping


def test_length():
    # target 10, slack 10 (default = target): 10 -> 0; 12 -> -(2/10); 20 -> -1; 25 -> capped -1
    assert length_reward(None, ["", "x" * 10, "x" * 12, "x" * 20, "x" * 25], target_chars=10) == [
        0.0, 0.0, pytest.approx(-0.2), -1.0, -1.0]
    # slack 40: 30 chars -> -(20/40)
    assert length_reward(None, ["x" * 30], target_chars=10, slack_chars=40) == [-0.5]
    # the default target (1000 chars)
    assert length_reward(None, ["x" * 1000, "x" * 1500]) == [0.0, -0.5]
    assert length_reward(None, [chat("x" * 1500)]) == [-0.5]


def test_make_length_reward():
    fn = make_length_reward(100, slack_chars=50)
    assert fn.__name__ == "length_reward_100"
    assert fn(None, ["x" * 100, "x" * 125], answer=["1", "2"]) == [0.0, -0.5]  # -(25/50)
    with pytest.raises(ValueError, match="target_chars must be a positive number, got 0"):
        make_length_reward(0)
    with pytest.raises(ValueError, match="slack_chars"):
        make_length_reward(10, slack_chars=-1)


def test_repetition():
    # "a b c a b c": trigrams abc, bca, cab, abc -> 3 unique of 4 -> -(1 - 3/4)
    # "x x x x x": trigrams xxx x3 -> 1 unique of 3 -> -(2/3)
    # "The cat THE CAT": lower-cased bigram... trigrams the-cat-the, cat-the-cat -> 2 of 2 -> 0
    got = repetition_reward(None, ["a b c a b c", "x x x x x", "The cat THE CAT", "a b", ""])
    assert got == pytest.approx([-0.25, -2 / 3, 0.0, 0.0, 0.0])
    assert all(math.copysign(1, v) == 1 for v in got[2:])  # 0.0, not -0.0
    fn = make_repetition_reward(ngram_size=1, max_penalty=0.5)
    # unigrams of "a a b b": 2 unique of 4 -> -0.5 * (1 - 2/4)
    assert fn(None, ["a a b b"]) == [-0.25]
    assert fn.__name__ == "repetition_reward_1"
    with pytest.raises(ValueError, match="ngram_size must be a positive integer, got 0"):
        make_repetition_reward(ngram_size=0)
    with pytest.raises(ValueError, match="ngram_size must be a positive integer, got 2.5"):
        repetition_reward(None, ["a"], ngram_size=2.5)
    with pytest.raises(ValueError, match="max_penalty must be a positive number"):
        make_repetition_reward(max_penalty=-1.0)


@pytest.mark.parametrize(
    "completion, expected",
    [
        # 2 numeric sentences in the block ("Add." has no number) -> 0.5 * 2 / 5
        ("<reasoning>\nHe has 3. She has 4. Add.\n</reasoning>\n<answer>\n7\n</answer>", 0.2),
        # 7 distinct numeric lines -> capped at 5 steps -> 0.5
        ("<reasoning>\n" + "\n".join(f"step {i}" for i in range(7)) + "\n</reasoning>", 0.5),
        # the same line 6 times counts once -> 0.5 * 1 / 5
        ("<reasoning>\n" + "2 + 2 = 4\n" * 6 + "</reasoning>", 0.1),
        # no block: the text before "####" -> "3 + 4 = 7" and "7 * 2 = 14" -> 0.5 * 2 / 5
        ("3 + 4 = 7\n7 * 2 = 14\n#### 14", 0.2),
        # no block, no marker: the whole text, 1 numeric sentence
        ("The answer is 5.", 0.1),
        ("<reasoning>\nno numbers at all\n</reasoning>", 0.0),
        ("", 0.0),
    ],
)
def test_reasoning(completion, expected):
    assert reasoning_reward(None, [completion]) == [pytest.approx(expected)]


def test_reasoning_options():
    # 4 numeric steps with max_steps 2, max_reward 1.0 -> capped at 1.0; 1 step -> 1.0 * 1 / 2
    text = "<reasoning>\n1\n2\n3\n4\n</reasoning>"
    assert reasoning_reward(None, [text, "<reasoning>1</reasoning>"], max_steps=2, max_reward=1.0) == [1.0, 0.5]
    with pytest.raises(ValueError, match="max_steps must be a positive integer"):
        reasoning_reward(None, [text], max_steps=0)


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("<reasoning>r</reasoning>\n<output>\n14\n</output>\n<answer>\n14\n</answer>", 0.5),
        ("<output>print(2/3) -> 0.66667</output><answer>0.6667</answer>", 0.5),  # tolerance
        ("<output>13</output><answer>14</answer>", 0.0),
        ("<output>13</output>", 0.0),  # no answer
        ("<output>nothing</output><answer>14</answer>", 0.0),  # output holds no number
        ("<output>14", 0.0),  # unclosed output
        ("<answer>14</answer>", None),  # not the three-part format
        ("", None),
    ],
)
def test_consistency(completion, expected):
    assert consistency_reward(None, [completion]) == [expected]


# -------------------------------------------------------------------- registry


def test_registry_names():
    expected = {"correctness", "int", "strict_format", "soft_format", "xmlcount", "hash_format",
                "length", "repetition", "reasoning", "consistency"}
    assert expected <= set(REGISTRY)
    assert all(callable(fn) and fn.__doc__ and ">>>" in fn.__doc__ for fn in REGISTRY.values())


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A user's reward module on sys.path: mypkg_rw/rewards.py."""
    pkg = tmp_path / "mypkg_rw"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "rewards.py").write_text(textwrap.dedent("""
        def my_reward(prompts, completions, **kwargs):
            return [1.0 for _ in completions]
        class Group:
            @staticmethod
            def nested(prompts, completions, **kwargs):
                return [2.0 for _ in completions]
        NOT_CALLABLE = 3
    """))
    (pkg / "broken.py").write_text("raise RuntimeError('boom at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "mypkg_rw"
    for name in [m for m in sys.modules if m.startswith("mypkg_rw")]:
        del sys.modules[name]


def test_get_reward_by_name_and_path(user_module):
    assert get_reward("correctness") is correctness_reward
    assert get_reward("mypkg_rw.rewards:my_reward")(None, ["a", "b"]) == [1.0, 1.0]
    assert get_reward("mypkg_rw.rewards.my_reward")(None, ["a"]) == [1.0]
    assert get_reward("mypkg_rw.rewards:Group.nested")(None, ["a"]) == [2.0]
    assert get_reward("rewards.functions:int_reward") is int_reward


@pytest.mark.parametrize(
    "path, message",
    [
        ("nope", "unknown reward 'nope'.*correctness"),
        ("", "non-empty"),
        ("mypkg_rw.missing:f", "cannot import module 'mypkg_rw.missing'"),
        ("mypkg_rw.broken:f", "cannot import module 'mypkg_rw.broken' \\(RuntimeError: boom at import\\)"),
        ("mypkg_rw.rewards:absent", "'mypkg_rw.rewards' has no attribute 'absent'"),
        ("mypkg_rw.rewards:NOT_CALLABLE", "'mypkg_rw.rewards:NOT_CALLABLE' is a int, not a callable"),
        (":f", "must look like"),
    ],
)
def test_get_reward_errors(user_module, path, message):
    with pytest.raises(ValueError, match=message):
        get_reward(path)


# -------------------------------------------------------------- compute_rewards


def const(values, name="const"):
    def fn(prompts, completions, **kwargs):
        return list(values) if isinstance(values, list) else values

    fn.__name__ = name
    return fn


def test_compute_rewards_weights_and_none():
    funcs = [const([1.0, None, 0.0], "a"), const([0.5, 0.0, None], "b"), const([None, None, None], "c")]
    total, per_func = compute_rewards(funcs, ["p"] * 3, ["x", "y", "z"], {}, weights=[2.0, -1.0, 5.0])
    # sample 0: 2*1.0 - 1*0.5 = 1.5; sample 1: -1*0.0 = 0; sample 2: 2*0.0 = 0 ("c" is all None)
    assert total.dtype == per_func.dtype == torch.float32
    assert total.shape == (3,) and per_func.shape == (3, 3)
    torch.testing.assert_close(total, torch.tensor([1.5, 0.0, 0.0]))
    nan = math.nan
    torch.testing.assert_close(per_func, torch.tensor([[1.0, 0.5, nan], [nan, 0.0, nan], [0.0, nan, nan]]),
                               equal_nan=True)


def test_compute_rewards_real_functions_default_weights():
    completions = [STRICT, chat("the answer is 8")]
    total, per_func = compute_rewards(
        [correctness_reward, strict_format_reward, consistency_reward], None, completions, {"answer": ["7", "7"]}
    )
    # STRICT: 1.0 + 0.5 + None -> 1.5; "the answer is 8": 0.0 + 0.0 + None -> 0.0
    torch.testing.assert_close(total, torch.tensor([1.5, 0.0]))
    assert torch.isnan(per_func[:, 2]).all()


def test_compute_rewards_all_none_sample_is_zero():
    total, per_func = compute_rewards([const([None])], None, ["x"], {})
    assert total.tolist() == [0.0] and math.isnan(per_func[0, 0])


def test_compute_rewards_empty():
    total, per_func = compute_rewards([correctness_reward], [], [], {"answer": []})
    assert total.shape == (0,) and per_func.shape == (0, 1)


def test_compute_rewards_accepts_ints_bools_tensors():
    total, _ = compute_rewards([const([1, True, torch.tensor(0.25)])], None, ["a", "b", "c"], {})
    torch.testing.assert_close(total, torch.tensor([1.0, 1.0, 0.25]))


def test_compute_rewards_weight_length_mismatch():
    with pytest.raises(ValueError, match="got 1 reward weights for 2 reward functions"):
        compute_rewards([const([1.0]), const([1.0])], None, ["x"], {}, weights=[1.0])
    with pytest.raises(ValueError, match="finite"):
        compute_rewards([const([1.0])], None, ["x"], {}, weights=[math.nan])


def test_compute_rewards_column_length_mismatch():
    with pytest.raises(ValueError, match="column 'answer' has 1 values for 2 completions"):
        compute_rewards([correctness_reward], None, ["x", "y"], {"answer": ["7"]})


def test_compute_rewards_raising_function_names_sample():
    def picky(prompts, completions, answer, **kwargs):
        return [1.0 / float(a) for a in answer]  # ZeroDivisionError on gold "0"

    with pytest.raises(RewardError, match=r"'picky' raised ZeroDivisionError.*sample 1 .*'second completion'") as info:
        compute_rewards([picky], ["p1", "p2"], ["first", "second completion"], {"answer": ["2", "0"]})
    assert isinstance(info.value.__cause__, ZeroDivisionError)


def test_compute_rewards_raising_function_batch_only():
    def batch_only(prompts, completions, **kwargs):
        if len(completions) > 1:
            raise RuntimeError("needs one at a time")
        return [0.0]

    with pytest.raises(RewardError, match="'batch_only' raised RuntimeError: needs one at a time on the batch"):
        compute_rewards([batch_only], None, ["a", "b"], {})


def test_compute_rewards_long_completion_is_truncated_in_message():
    def boom(prompts, completions, **kwargs):
        raise KeyError("k")

    with pytest.raises(RewardError, match=r"sample 0 \(completion starts 'y{80}\.\.\.'\)"):
        compute_rewards([boom], None, [chat("y" * 500)], {})


@pytest.mark.parametrize(
    "values, message",
    [
        ([1.0], r"'bad' returned 1 values for 2 completions"),
        (None, r"'bad' returned NoneType, expected a list of 2"),
        ("ab", r"'bad' returned str, expected a list of 2"),
        ([1.0, "0.5"], r"'bad' returned a non-number for sample 1: str '0.5'"),
        ([1.0, [0.5]], r"'bad' returned a non-number for sample 1"),
        ([math.nan, 1.0], r"'bad' returned nan for sample 0"),
        ([1.0, -math.inf], r"'bad' returned -inf for sample 1"),
    ],
)
def test_compute_rewards_bad_outputs(values, message):
    with pytest.raises(RewardError, match=message):
        compute_rewards([const([1.0, 1.0], "good"), const(values, "bad")], None, ["x", "y"], {})


# ------------------------------------------------------------------- self-check


def test_self_check_passes_and_catches_a_wrong_example(capsys):
    from rewards.__main__ import check, main

    assert main() == 0
    out = capsys.readouterr().out
    assert all(f"ok   {name}" in out for name in REGISTRY)

    def wrong(prompts, completions, **kwargs):
        """>>> wrong(None, ["a"])
        [1.0]
        """
        return [0.0]

    def undocumented(prompts, completions, **kwargs):
        return [0.0]

    assert check({"wrong": wrong, "undocumented": undocumented}) == 2
    out = capsys.readouterr().out
    assert "FAIL wrong" in out and "expected: [1.0]" in out and "got:      [0.0]" in out
    assert "FAIL undocumented: its docstring has no worked example" in out


def test_package_exports():
    assert set(rewards.__all__) <= set(dir(rewards))
