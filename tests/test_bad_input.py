"""A catalogue of bad input, each case through a real entry point: `train.main`, `test.main`
(the evaluation CLI) or the library (`grpo.GRPOConfig`, `grpo.Trainer`).

A CLI case must end with exit status 2 and one `error: ...` line, the last line of stderr,
that names the offending input and says what to do, and no traceback. A library case must
raise a named exception whose message does the same. Cases that need to train use the tiny
model (tests/conftest.py) and fail within one step.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

import grpo
import train
from grpo.testing import tiny_model, tiny_tokenizer
from rewards import RewardLoadError
from tests.cli_run import run_main

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("evaluation_cli", REPO / "test.py")
evaluation_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(evaluation_cli)

# The synthetic prompts are longer than the 64 tokens the tiny runs keep (on purpose: fast).
pytestmark = pytest.mark.filterwarnings("ignore:.*longer than max_prompt_length:UserWarning")


# ---------------------------------------------------------------------------- inputs built in tmp
def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def jsonl(path: Path, rows: list[dict]) -> None:
    write(path, "".join(json.dumps(r) + "\n" for r in rows))


REWARDS_MODULE = '''
def explode(prompts, completions, **columns):
    return [1 / 0 for _ in completions]

def one_value(prompts, completions, **columns):
    return [1.0]

def quits(prompts, completions, **columns):
    import sys
    sys.exit()
'''


def user_rewards(tmp: Path) -> None:
    """A user's reward module on sys.path (the test adds tmp to it), named after tmp so that
    no two tests share a cached import."""
    write(tmp / "pkg" / f"user_rewards_{tmp.name.replace('-', '_')}.py", REWARDS_MODULE)


def adapter_of_other_base(tmp: Path) -> None:
    """A LoRA adapter trained on a 32-wide model (the tiny model is 64 wide) in tmp/adapter."""
    from peft import LoraConfig, get_peft_model

    get_peft_model(tiny_model(hidden_size=32), LoraConfig(r=2, target_modules=["q_proj", "v_proj"])) \
        .save_pretrained(tmp / "adapter")


def pickled_model(tmp: Path) -> None:
    """A model folder with only a pickled pytorch_model.bin (and the tokenizer)."""
    import torch

    from grpo.testing import tiny_tokenizer

    model = tiny_model()
    model.config.save_pretrained(tmp / "pickled")
    tiny_tokenizer().save_pretrained(tmp / "pickled")
    torch.save(model.state_dict(), tmp / "pickled" / "pytorch_model.bin")


def garbage_adapter(tmp: Path) -> None:
    """tmp/ck: an adapter folder whose adapter_config.json is not JSON."""
    write(tmp / "ck" / "adapter_config.json", "{oops")
    write(tmp / "ck" / "adapter_model.safetensors", "")


def split_folder(tmp: Path) -> None:
    jsonl(tmp / "gsm" / "train.jsonl", [{"question": "1+1?", "answer": "1+1=2\n#### 2"}])


@dataclass
class Case:
    id: str
    cli: str  # "train" or "eval"
    argv: list[str]  # placeholders: {tmp}, {run} (the tiny finished run), {mod} (user rewards module)
    expect: list[str]  # words the error line must hold: the input's name, then the fix
    setup: Callable[[Path], None] | None = None
    argparse_exit: bool = False  # argparse rejects it itself (exit 2 via SystemExit)
    offline: bool = False  # HF_HUB_OFFLINE=1
    hide_package: str | None = None  # as if this package were not installed (importlib.util.find_spec)


CASES = [
    # ------------------------------------------------------------------ config keys, types, values
    Case("unknown-cli-option", "train", ["--lerning_rate", "1e-4"],
         ["--lerning_rate", "did you mean --learning_rate"]),
    Case("stray-cli-argument", "train", ["grpo"], ["'grpo'", "every value follows its option"]),
    Case("unknown-yaml-key", "train", ["--config", "{tmp}/typo.yaml"],
         ["typo.yaml", "unknown config key 'lerning_rate'", "did you mean 'learning_rate'"],
         setup=lambda t: write(t / "typo.yaml", "lerning_rate: 1.0e-4\n")),
    Case("wrong-type", "train", ["--learning_rate", "abc"],
         ["learning_rate='abc'", "not a valid float", "give a number", "--learning_rate 5e-05"]),
    Case("wrong-type-in-yaml", "train", ["--config", "{tmp}/types.yaml"],
         ["types.yaml", "seed=[4]", "give a whole number", "--seed 0"],
         setup=lambda t: write(t / "types.yaml", "seed: [4]\n")),
    Case("batch-not-multiple-of-generations", "train", ["--batch_size", "10", "--num_generations", "4"],
         ["batch_size=10", "num_generations=4", "set batch_size to a multiple, e.g. 8"]),
    Case("algorithm-with-incompatible-scale-rewards", "train", ["--algorithm", "rloo", "--scale_rewards", "group"],
         ["scale_rewards='group'", "algorithm=rloo", "choose one of none"]),
    Case("one-generation", "train", ["--num_generations", "1"],
         ["num_generations=1", "at least 2 completions", "use 4-16", "ppo"]),
    Case("max-completion-length-zero", "train", ["--max_completion_length", "0"],
         ["max_completion_length=0", "must be > 0"]),
    Case("max-completion-length-negative", "train", ["--max_completion_length", "-5"],
         ["max_completion_length=-5", "must be > 0"]),
    Case("temperature-zero", "train", ["--temperature", "0"], ["temperature=0", "use temperature > 0"]),
    Case("dataset-limit-zero", "train", ["--dataset_limit", "0"], ["dataset_limit=0", "must be >= 1"]),
    Case("unknown-algorithm", "train", ["--algorithm", "ppoo"], ["algorithm='ppoo'", "choose one of", "dr_grpo"]),
    Case("unknown-mode", "train", ["--mode", "rl"], ["mode='rl'", "choose one of grpo, sft, both"]),
    Case("unknown-prompt-format", "train", ["--prompt_format", "json"],
         ["prompt_format='json'", "choose one of xml, hash, xml3"]),
    Case("unknown-logprob-method", "train", ["--logprob_method", "exact"],
         ["logprob_method='exact'", "choose auto or one of", "fused"]),
    Case("unknown-rollout-decode", "train", ["--rollout_decode", "graphs"],
         ["rollout_decode='graphs'", "choose one of auto, dynamic, static, compiled"]),
    Case("rollout-bucket-zero", "train", ["--rollout_bucket", "0"], ["rollout_bucket=0", "must be >= 1"]),
    Case("compiled-decode-of-a-freed-copy", "train", ["--rollout_decode", "compiled", "--fast_rollout_keep", "false"],
         ["rollout_decode='compiled'", "fast_rollout_keep=false", "rollout_decode: static"]),
    # values that passed validation and failed later, or were taken silently (issue 20)
    Case("num-generations-zero", "train", ["--num_generations", "0"], ["num_generations=0", "must be >= 1", "use 4-16"]),
    Case("seed-beyond-64-bits", "train", ["--seed", str(2**64)], [f"seed={2**64}", "[0, 2**64)"]),
    Case("weight-decay-negative", "train", ["--weight_decay", "-0.1"], ["weight_decay=-0.1", "must be >= 0"]),
    Case("adam-beta1-one", "train", ["--adam_beta1", "1.0"], ["adam_beta1=1.0", "must be in [0, 1)"]),
    Case("learning-rate-nan", "train", ["--learning_rate", "nan"],
         ["learning_rate=nan", "not a finite number", "--learning_rate 5e-05"]),
    Case("learning-rate-inf", "train", ["--learning_rate", "inf"], ["learning_rate=inf", "not a finite number"]),
    Case("warmup-steps-negative", "train", ["--warmup_steps", "-2"], ["warmup_steps=-2", "must be >= 0"]),
    Case("lora-alpha-zero", "train", ["--lora_alpha", "0"], ["lora_alpha=0", "must be > 0"]),
    Case("output-dir-empty", "train", ["--output_dir", ""], ["output_dir is empty", "--output_dir runs/my-run"]),
    Case("logging-steps-zero", "train", ["--logging_steps", "0"], ["logging_steps=0", "must be >= 1"]),
    Case("eval-steps-negative", "train", ["--eval_steps", "-1"], ["eval_steps=-1", "must be >= 0"]),
    # found after the model load before (and on resume after config.yaml was rewritten)
    Case("report-to-wandb-not-installed", "train", ["--report_to", "wandb"],
         ["report_to=wandb needs the wandb package", "pip install 'grpo[wandb]'", "--report_to none"],
         hide_package="wandb"),
    Case("cpu-dtype-unknown", "train", ["--cpu_dtype", "fp16"], ["cpu_dtype='fp16'", "auto, float32, bfloat16"]),
    Case("sampler-correction-unknown", "train", ["--sampler_correction", "is"], ["sampler_correction='is'", "tis, none"]),
    Case("bias-corrected-kl-without-kl", "train", ["--use_bias_correction_kl", "true", "--beta", "0"],
         ["use_bias_correction_kl=true", "beta=0.0", "needs beta > 0"]),
    # ------------------------------------------------------------------ config files
    Case("config-file-missing", "train", ["--config", "{tmp}/none.yaml"],
         ["none.yaml", "does not exist", "check the path", "configs/demo.yaml"]),
    Case("config-file-malformed", "train", ["--config", "{tmp}/bad.yaml"],
         ["bad.yaml", "not valid YAML at line 2", "fix the syntax"],
         setup=lambda t: write(t / "bad.yaml", "lora_r: [1, 2\nbeta: 3\n")),
    Case("config-file-is-a-folder", "train", ["--config", "{tmp}"], ["is a folder, not a YAML file", "config.yaml"]),
    Case("config-key-not-a-string", "train", ["--config", "{tmp}/keys.yaml"],
         ["keys.yaml", "config key True is a bool, not a field name", "field_name: value"],
         setup=lambda t: write(t / "keys.yaml", "yes: 3\n")),
    Case("config-key-a-number", "train", ["--config", "{tmp}/num.yaml"],
         ["num.yaml", "config key 1 is a int, not a field name"], setup=lambda t: write(t / "num.yaml", "1: 3\n")),
    Case("config-file-not-a-mapping", "train", ["--config", "{tmp}/list.yaml"],
         ["list.yaml", "must hold a mapping of key: value, not list"],
         setup=lambda t: write(t / "list.yaml", "- lora_r\n- beta\n")),
    # ------------------------------------------------------------------ datasets
    Case("dataset-file-missing", "train", ["--dataset", "{tmp}/missing.jsonl"],
         ["missing.jsonl", "no such file or folder", "check the path", "'synthetic'"]),
    Case("dataset-file-empty", "train", ["--dataset", "{tmp}/empty.jsonl"],
         ["empty.jsonl", "no rows", "one JSON object per line"], setup=lambda t: write(t / "empty.jsonl", "")),
    Case("dataset-wrong-columns", "train", ["--dataset", "{tmp}/cols.jsonl"],
         ["cols.jsonl, row 1", "missing column 'question'", "['a', 'q']", "rename the columns"],
         setup=lambda t: jsonl(t / "cols.jsonl", [{"q": "1+1?", "a": "#### 2"}])),
    Case("dataset-gold-not-a-number", "train", ["--dataset", "{tmp}/gold.jsonl"],
         ["gold.jsonl, row 2", "not a number: 'lots'", "e.g. '#### 72'"],
         setup=lambda t: jsonl(t / "gold.jsonl", [{"question": "1+1?", "answer": "#### 2"},
                                                   {"question": "How many?", "answer": "So #### lots"}])),
    Case("dataset-gold-without-hash-line", "train", ["--dataset", "{tmp}/nohash.jsonl"],
         ["nohash.jsonl, row 1", "no '#### N' line", "end each answer with a line '#### N'"],
         setup=lambda t: jsonl(t / "nohash.jsonl", [{"question": "1+1?", "answer": "The answer is 2."}])),
    Case("dataset-folder-without-split", "train", ["--dataset", "{tmp}/gsm", "--dataset_split", "validation"],
         ["no file for split 'validation'", "the splits there are train", "--dataset_split"], setup=split_folder),
    Case("eval-dataset-folder-without-split", "eval", ["--dataset", "{tmp}/gsm", "--split", "test"],
         ["no file for split 'test'", "the splits there are train", "--split"], setup=split_folder),
    Case("eval-output-is-a-file", "eval", ["--output", "{tmp}/taken", "--limit", "1"],
         ["output", "taken", "is not writable", "Choose another --output"], setup=lambda t: write(t / "taken", "x")),
    Case("eval-traces-path-is-a-folder", "eval", ["--save_traces", "{tmp}", "--limit", "1"],
         ["--save_traces", "is a folder", "traces.jsonl"]),
    # ------------------------------------------------------------------ models and adapters
    # a pickle-only base loaded and trained with no word, though weights are read as safetensors only
    Case("model-pickle-only", "train", ["--model", "{tmp}/pickled"],
         ["pytorch_model.bin", "safetensors only", "can run code", "use_safetensors=False", "-safetensors"],
         setup=pickled_model),
    Case("eval-model-pickle-only", "eval", ["--model", "{tmp}/pickled", "--question", "1+1?"],
         ["pytorch_model.bin", "safetensors only", "convert it once"], setup=pickled_model),
    Case("lora-target-modules-not-in-model", "train", ["--lora_target_modules", "query,value"],
         ["lora_target_modules ['query', 'value']", "match no layer", "q_proj", "--lora_target_modules q_proj,v_proj"]),
    Case("adapter-config-not-json", "train", ["--adapter_path", "{tmp}/ck"],
         ["ck", "adapter_config.json is not readable JSON", "use another checkpoint"], setup=garbage_adapter),
    Case("eval-adapter-config-not-json", "eval", ["--checkpoint", "{tmp}/ck", "--question", "1+1?"],
         ["ck", "adapter_config.json is not readable JSON"], setup=garbage_adapter),
    Case("model-path-missing", "train", ["--model", "{tmp}/no-such-model"],
         ["no-such-model", "no such folder", "--model", "save_pretrained"]),
    Case("eval-model-path-missing", "eval", ["--model", "{tmp}/no-such-model", "--question", "1+1?"],
         ["no-such-model", "no such folder", "--model"]),
    Case("hub-id-offline", "train", ["--model", "nobody/no-such-model"],
         ["'nobody/no-such-model'", "offline", "--local-dir DIR", "--model DIR"], offline=True),
    Case("adapter-of-another-base", "train", ["--adapter_path", "{tmp}/adapter"],
         ["adapter", "trained on another base", "has input size 32", "--model"], setup=adapter_of_other_base),
    Case("eval-adapter-of-another-base", "eval", ["--adapter", "{tmp}/adapter", "--question", "1+1?"],
         ["adapter", "trained on another base", "--model"], setup=adapter_of_other_base),
    Case("adapter-path-missing", "train", ["--adapter_path", "{tmp}/no-adapter"],
         ["no-adapter", "no such folder", "save_pretrained"]),
    Case("eval-adapter-missing", "eval", ["--adapter", "{tmp}/no-adapter", "--question", "1+1?"],
         ["--adapter", "no-adapter", "no such folder", "--checkpoint RUN_DIR"]),
    # ------------------------------------------------------------------ checkpoints
    Case("resume-with-other-lora-r", "train",
         ["--output_dir", "{run}", "--lora_r", "4", "--max_steps", "2", "--resume_from_checkpoint", "latest"],
         ["checkpoint-1", "lora_r=2", "lora_r=4", "resume with the same values (--lora_r 2)", "another output_dir"]),
    Case("resume-latest-without-checkpoint", "train", ["--resume_from_checkpoint", "latest"],
         ["resume_from_checkpoint=latest", "no checkpoint-N folder", "start without --resume_from_checkpoint"]),
    Case("resume-from-a-folder-that-is-no-checkpoint", "train", ["--resume_from_checkpoint", "{tmp}"],
         ["is not a checkpoint folder", "no trainer_state.json", "use `latest`"]),
    Case("eval-checkpoint-missing", "eval", ["--checkpoint", "{tmp}/no-run"],
         ["--checkpoint", "no-run", "no such folder", "checkpoint-N folder or a run folder"]),
    Case("eval-checkpoint-folder-without-checkpoints", "eval", ["--checkpoint", "{tmp}"],
         ["--checkpoint", "holds neither an adapter", "--adapter RUN/sft/adapter"]),
    # ------------------------------------------------------------------ rewards
    Case("reward-path-does-not-import", "train", ["--reward_funcs", "no_such_pkg.rewards:score"],
         ["no_such_pkg.rewards:score", "cannot import module", "PYTHONPATH"]),
    Case("reward-path-to-a-non-callable", "train", ["--reward_funcs", "rewards.registry:REGISTRY"],
         ["rewards.registry:REGISTRY", "is a dict, not a callable", "fn(prompts, completions, **columns)"]),
    Case("reward-path-without-that-function", "train", ["--reward_funcs", "rewards.functions:no_such_reward"],
         ["no attribute 'no_such_reward'", "check the function's name"]),
    Case("reward-name-misspelt", "train", ["--reward_funcs", "correctnes,xmlcount"],
         ["unknown reward 'correctnes'", "did you mean 'correctness'", "mypkg.module:function"]),
    Case("reward-weights-wrong-length", "train", ["--reward_weights", "1.0"],
         ["reward_weights has 1 entries", "reward_funcs has 3", "give one weight per reward function"]),
    Case("reward-raises", "train", ["--reward_funcs", "{mod}:explode"],
         ["'explode' raised ZeroDivisionError", "on sample 0", "completion starts '", "fix the function",
          "return None"], setup=user_rewards),
    # sys.exit() inside a reward ended the run with exit 0 and no checkpoint: a run that did not finish
    Case("reward-calls-sys-exit", "train", ["--reward_funcs", "{mod}:quits"],
         ["'quits' raised SystemExit", "fix the function"], setup=user_rewards),
    Case("reward-returns-wrong-count", "train", ["--reward_funcs", "{mod}:one_value"],
         ["'one_value' returned 1 values for 4 completions", "one float (or None) per completion"],
         setup=user_rewards),
    # ------------------------------------------------------------------ the evaluation CLI's own options
    Case("eval-k-greater-than-samples", "eval", ["--k", "1,4", "--samples", "2"],
         ["pass@4", "n_samples=2", "--samples", ">= 4"]),
    Case("eval-empty-question", "eval", ["--question", "  "], ["--question is empty", "--question \"What is"]),
    Case("eval-unknown-format", "eval", ["--format", "json"], ["--format", "invalid choice: 'json'", "xml"],
         argparse_exit=True),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_cli_bad_input(case: Case, tmp_path, tiny_model_dir, tiny_train_argv, request, capsys, monkeypatch):
    if case.setup:
        case.setup(tmp_path)
    if case.offline:
        import huggingface_hub.constants

        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once, at import
    if case.hide_package:
        import importlib.util

        find_spec = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a: None if name == case.hide_package else find_spec(name, *a))
    monkeypatch.syspath_prepend(str(tmp_path / "pkg"))
    subs = {"tmp": str(tmp_path), "mod": f"user_rewards_{tmp_path.name.replace('-', '_')}"}
    if any("{run}" in a for a in case.argv):
        subs["run"] = str(request.getfixturevalue("tiny_run"))
    argv = [a.format(**subs) for a in case.argv]
    if case.cli == "train":
        main, argv = train.main, tiny_train_argv + ["--output_dir", str(tmp_path / "out")] + argv
    else:
        main, argv = evaluation_cli.main, ["--model", str(tiny_model_dir), "--output", str(tmp_path / "eval"),
                                           "--limit", "2", "--max_new_tokens", "4", "--no_progress"] + argv

    code, printed = run_main(main, argv, capsys)

    assert code == 2, printed
    assert "Traceback" not in printed
    lines = printed.rstrip().splitlines()
    last = lines[-1]  # the error is one paragraph on one line, the last one printed
    assert sum("error:" in line for line in lines) == 1, printed
    assert (": error: " in last) if case.argparse_exit else last.startswith("error: "), printed
    for words in case.expect:
        assert words in last, f"{words!r} not in {last!r}"


def test_resume_check_is_before_the_model_load(tiny_run, tiny_train_argv, capsys, monkeypatch):
    """The LoRA mismatch is found from config.yaml alone: no model is loaded."""
    import grpo.model

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(grpo.model, "load_base_model", no_load)
    monkeypatch.setattr(grpo.model, "load_tokenizer", no_load)
    code, printed = run_main(train.main, tiny_train_argv + [
        "--output_dir", str(tiny_run), "--lora_target_modules", "q_proj,v_proj", "--resume_from_checkpoint",
        str(tiny_run / "checkpoint-1")], capsys)
    assert code == 2 and "lora_target_modules=[" in printed and "--lora_target_modules q_proj,k_proj" in printed


# ---------------------------------------------------------------------------- the library
def digit_reward(prompts, completions, **columns):
    """Fraction of digits in each completion (a string, or chat messages: the last one's content)."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [sum(ch.isdigit() for ch in t) / max(len(t), 1) for t in texts]


def small_config(tmp_path: Path, **overrides) -> grpo.GRPOConfig:
    settings = dict(output_dir=str(tmp_path / "run"), num_generations=2, batch_size=4, micro_batch_size=4,
                    max_completion_length=4, max_steps=1, beta=0.0, lora_r=2, save_steps=0,
                    progress_bar=False, log_completions_steps=0)
    return grpo.GRPOConfig(**{**settings, **overrides})


PROMPTS = [{"prompt": f"<|im_start|>user\nq{i}<|im_end|>\n<|im_start|>assistant\n"} for i in range(4)]

LIBRARY_CASES = [
    # id, callable(tmp_path) that should raise, exception type, words in the message
    ("config-unknown-field", lambda t: grpo.GRPOConfig(lerning_rate=1e-4), TypeError, ["lerning_rate"]),
    ("config-string-where-a-number-goes", lambda t: grpo.GRPOConfig(learning_rate="abc"), grpo.ConfigError,
     ["learning_rate='abc'", "not a valid float", "give a number"]),
    ("config-one-generation", lambda t: grpo.GRPOConfig(num_generations=1, batch_size=4), grpo.ConfigError,
     ["num_generations=1", "at least 2"]),
    ("config-max-completion-length-negative", lambda t: grpo.GRPOConfig(max_completion_length=-1),
     grpo.ConfigError, ["max_completion_length=-1", "must be > 0"]),
    ("config-reward-weights-wrong-length",
     lambda t: grpo.GRPOConfig(reward_funcs=["correctness", "xmlcount"], reward_weights=[1.0]),
     grpo.ConfigError, ["reward_weights has 1 entries", "one weight per reward function"]),
    ("trainer-model-path-missing", lambda t: grpo.Trainer(str(t / "no-model"), None, [digit_reward], PROMPTS,
                                                           small_config(t)),
     "ModelLoadError", ["no-model", "no such folder"]),
    ("trainer-tokenizer-without-pad-and-eos", lambda t: grpo.Trainer(tiny_model(), _no_pad_no_eos(), [digit_reward],
                                                                      PROMPTS, small_config(t)),
     "ModelLoadError", ["neither a pad nor an EOS token", "tokenizer.pad_token"]),
    ("trainer-unknown-reward-name", lambda t: grpo.Trainer(tiny_model(), tiny_tokenizer(), ["nope"], PROMPTS,
                                                            small_config(t)),
     RewardLoadError, ["unknown reward 'nope'", "mypkg.module:function"]),
    ("trainer-rows-without-prompt-or-question",
     lambda t: grpo.Trainer(tiny_model(), tiny_tokenizer(), [digit_reward], [{"text": "hi"}], small_config(t)),
     ValueError, ["train_dataset rows need a `prompt` or a `question` column", "['text']"]),
    ("trainer-reward-weights-wrong-length",
     lambda t: grpo.Trainer(tiny_model(), tiny_tokenizer(), [digit_reward], PROMPTS, small_config(t),
                            reward_weights=[1.0, 2.0]),
     ValueError, ["reward_weights has 2 entries for 1 reward functions", "one weight per function"]),
]


def _no_pad_no_eos():
    tok = tiny_tokenizer(pad_token=False)
    tok.eos_token = None
    return tok


@pytest.mark.parametrize("make, error, words", [c[1:] for c in LIBRARY_CASES], ids=[c[0] for c in LIBRARY_CASES])
def test_library_bad_input(make, error, words, tmp_path):
    if isinstance(error, str):
        from grpo import model as model_module

        error = getattr(model_module, error)
    with pytest.raises(error) as caught:
        make(tmp_path)
    for w in words:
        assert w in str(caught.value), f"{w!r} not in {caught.value}"


def test_tokenizer_without_chat_template_trains_on_the_plain_prompt(tmp_path):
    """Documented fallback (data.apply_chat_template): a warning that says what is used and how to
    change it, then `System: ...\\n\\nUser: ...\\n\\nAssistant:` prompts."""
    rows = [{"question": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(2)]
    trainer = grpo.Trainer(tiny_model(), tiny_tokenizer(chat_template=False), [digit_reward], rows,
                           small_config(tmp_path))
    with pytest.warns(UserWarning, match=r"has no chat template; using the plain .*set tokenizer\.chat_template"):
        summary = trainer.train()
    assert summary["steps"] == 1
    prompt = trainer._last_samples[0]["prompt"]
    assert prompt.startswith("System: Solve the math problem.") and prompt.endswith("\n\nAssistant:")


def test_prompt_longer_than_max_prompt_length_is_left_truncated_with_a_warning(tmp_path):
    """Current behaviour: left truncation with a warning naming max_prompt_length.
    "<|im_start|>user\nq0<|im_end|>\n<|im_start|>assistant\n" is 21 tokens (special tokens are
    one each, characters one each: 1 + 5 + 2 + 1 + 1 + 1 + 10); max_prompt_length=8 keeps the
    last 8, "sistant\n", the end of the generation prompt."""
    from grpo.rollout import encode_prompts

    trainer = grpo.Trainer(tiny_model(), tiny_tokenizer(), [digit_reward], PROMPTS,
                           small_config(tmp_path, max_prompt_length=8))
    with pytest.warns(UserWarning, match=r"2 of 2 prompts are longer than max_prompt_length=8 tokens; kept their last"):
        assert trainer.train()["steps"] == 1
    ids, mask, truncated = encode_prompts(trainer.tokenizer, [PROMPTS[0]["prompt"]], 8)
    assert truncated == 1 and ids.shape == (1, 8) and trainer.tokenizer.decode(ids[0]) == "sistant\n"


def test_scale_rewards_none_is_a_value_not_unset(tmp_path):
    """`none` is one of scale_rewards' values (Dr.GRPO's); read as "unset" it became the
    algorithm's default, group scaling, without a word. `null` still means unset."""
    (tmp_path / "x.yaml").write_text("scale_rewards: none\n")
    assert grpo.parse_config(["--config", str(tmp_path / "x.yaml")]).scale_rewards == "none"
    assert grpo.parse_config(["--scale_rewards", "none"]).scale_rewards == "none"
    assert grpo.parse_config(["--scale_rewards", "null"]).scale_rewards == "group"  # grpo's default
    with pytest.raises(grpo.ConfigError, match="scale_rewards='none' does not fit algorithm=ppo: choose one of batch"):
        grpo.parse_config(["--algorithm", "ppo", "--scale_rewards", "none"])
