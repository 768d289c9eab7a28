"""What the project loads must not run code it was not asked to run.

- weights and adapters are written as safetensors; the only pickles (optimizer.pt,
  scheduler.pt, rng.pt) are state dicts read with `torch.load(weights_only=True)`, so a
  checkpoint file holding a pickled object that would run code is refused, and nothing runs;
- a pickled adapter (adapter_model.bin only) is refused by both CLIs;
- trust_remote_code is off by default everywhere, and passed through when asked;
- config values are data: never evaluated (YAML is read with safe_load; no Python tags);
- reward functions are imported only from an explicit `module:function` path;
- the sources hold no eval/exec, no unsafe pickle or YAML loading, no shell.

Each "nothing ran" check uses a payload that does run when loaded the unsafe way (shown in
the test), so that the check can fail.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import inspect
import shutil
import sys
from pathlib import Path

import pytest
import torch

import grpo
import train
from grpo.config import ConfigError, parse_config
from grpo.model import load_base_model, load_tokenizer
from tests.cli_run import run_main

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("evaluation_cli", REPO / "test.py")
evaluation_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(evaluation_cli)

pytestmark = pytest.mark.filterwarnings("ignore:.*longer than max_prompt_length:UserWarning")

PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}
STATE_FILES = ("optimizer.pt", "scheduler.pt", "rng.pt")  # checkpoint state, never weights


class WritesFile:
    """Unpickling this creates `path`: what a malicious checkpoint file would do."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def save_payload(file: Path, marker: Path) -> None:
    """A torch.save file shaped like a state dict, with the payload inside."""
    torch.save({"state": {}, "param_groups": [], "extra": WritesFile(marker)}, file)


def error_line(printed: str) -> str:
    """The one `error:` line, which must be the last line and come without a traceback."""
    assert "Traceback" not in printed
    last = printed.rstrip().splitlines()[-1]
    assert last.startswith("error: ") and printed.count("error:") == 1, printed
    return last


def test_the_payload_runs_when_unpickled_unsafely(tmp_path):
    """The control for every "nothing ran" assertion below."""
    marker = tmp_path / "ran"
    save_payload(tmp_path / "x.pt", marker)
    torch.load(tmp_path / "x.pt", weights_only=False)
    assert marker.exists()


# ---------------------------------------------------------------------------- what a run writes
def test_a_run_writes_weights_and_adapters_as_safetensors_only(tiny_run):
    """tiny_run is `train.py --mode both`: sft/adapter/ and checkpoint-1/. Every adapter folder
    holds adapter_model.safetensors and no pickle; the only pickles are the checkpoint state
    files, plain state that loads with weights_only=True."""
    files = [p for p in tiny_run.rglob("*") if p.is_file()]
    adapters = {p.parent for p in files if p.name == "adapter_config.json"}
    assert {tiny_run / "sft" / "adapter", tiny_run / "checkpoint-1"} <= adapters
    for folder in adapters:
        assert (folder / "adapter_model.safetensors").is_file()
    pickles = [p for p in files if p.suffix in PICKLE_SUFFIXES]
    assert pickles and all(p.name in STATE_FILES and p.parent.name.startswith("checkpoint-") for p in pickles), pickles
    for p in pickles:
        torch.load(p, weights_only=True)  # raises if anything but tensors and plain containers


@pytest.fixture
def run_copy(tiny_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(tiny_run, copy)
    return copy


@pytest.mark.parametrize("name", STATE_FILES)
def test_pickled_code_in_checkpoint_state_does_not_run_on_resume(name, run_copy, tiny_train_argv, capsys):
    marker = run_copy.parent / "ran"
    save_payload(run_copy / "checkpoint-1" / name, marker)
    code, printed = run_main(train.main, tiny_train_argv + [
        "--output_dir", str(run_copy), "--max_steps", "2", "--resume_from_checkpoint", "latest"], capsys)
    assert code == 2 and name in printed, printed  # refused as a CheckpointError naming the file
    assert "weights_only=False" not in printed  # torch's own advice would run the code: not ours
    assert not marker.exists()


@pytest.mark.parametrize("entry", ["train.main", "Trainer"])
def test_pickled_code_in_checkpoint_state_is_a_checkpoint_error(entry, run_copy, tiny_train_argv, capsys):
    marker = run_copy.parent / "ran"
    save_payload(run_copy / "checkpoint-1" / "optimizer.pt", marker)
    if entry == "train.main":
        code, printed = run_main(train.main, tiny_train_argv + [
            "--output_dir", str(run_copy), "--max_steps", "2", "--resume_from_checkpoint", "latest"], capsys)
        assert code == 2 and "optimizer.pt" in error_line(printed)
    else:
        from grpo.checkpoint import CheckpointError
        from grpo.testing import tiny_model, tiny_tokenizer

        config = grpo.GRPOConfig(output_dir=str(run_copy), num_generations=2, batch_size=4, micro_batch_size=4,
                                 max_completion_length=4, max_steps=2, beta=0.0, lora_r=2, progress_bar=False,
                                 resume_from_checkpoint="latest", reward_funcs=["xmlcount"])
        trainer = grpo.Trainer(tiny_model(), tiny_tokenizer(), None, [{"prompt": "q"}], config)
        with pytest.raises(CheckpointError, match="optimizer.pt"):
            trainer.train()
    assert not marker.exists()


# ---------------------------------------------------------------------------- pickled adapters
@pytest.mark.parametrize("cli", ["train --adapter_path", "test.py --adapter"])
def test_pickled_adapter_is_refused_and_not_loaded(cli, tiny_run, tiny_train_argv, tiny_model_dir, tmp_path, capsys):
    adapter, marker = tmp_path / "adapter", tmp_path / "ran"
    adapter.mkdir()
    shutil.copy(tiny_run / "sft" / "adapter" / "adapter_config.json", adapter)
    save_payload(adapter / "adapter_model.bin", marker)  # the pre-safetensors PEFT format: a pickle
    if cli.startswith("train"):
        code, printed = run_main(train.main, tiny_train_argv + [
            "--output_dir", str(tmp_path / "out"), "--adapter_path", str(adapter)], capsys)
    else:
        code, printed = run_main(evaluation_cli.main, [
            "--model", str(tiny_model_dir), "--adapter", str(adapter), "--question", "1+1?"], capsys)
    line = error_line(printed)
    assert code == 2
    assert str(adapter) in line and "adapter_model.bin" in line and "refused" in line
    assert "only safetensors adapters load" in line
    assert not marker.exists()


# ---------------------------------------------------------------------------- trust_remote_code
def test_trust_remote_code_is_off_by_default_everywhere():
    assert grpo.GRPOConfig().trust_remote_code is False
    assert {f.name: f.default for f in dataclasses.fields(grpo.GRPOConfig)}["trust_remote_code"] is False
    for fn in (load_tokenizer, load_base_model):
        assert inspect.signature(fn).parameters["trust_remote_code"].default is False
    assert evaluation_cli.parse_args([]).trust_remote_code is False
    assert inspect.signature(evaluation_cli.load_model).parameters["trust_remote_code"].default is False
    for recipe in (REPO / "configs").glob("*.yaml"):  # no shipped recipe turns it on
        assert parse_config(["--config", str(recipe)]).trust_remote_code is False, recipe


def custom_code_model(folder: Path) -> Path:
    """A model folder whose config maps the Auto classes to its own module, which writes
    `ran` next to itself when imported: what transformers runs under trust_remote_code."""
    folder.mkdir()
    (folder / "config.json").write_text(
        '{"model_type": "custom", "architectures": ["CustomModel"], "auto_map": {"AutoConfig": '
        '"custom.CustomConfig", "AutoModelForCausalLM": "custom.CustomModel"}}'
    )
    (folder / "tokenizer_config.json").write_text('{"auto_map": {"AutoTokenizer": ["custom.CustomTokenizer", null]}}')
    (folder / "custom.py").write_text("import pathlib\npathlib.Path(__file__).with_name('ran').write_text('x')\n")
    return folder


@pytest.mark.parametrize("cli", ["train", "test.py"])
def test_model_with_its_own_code_is_refused_by_default(cli, tmp_path, tiny_train_argv, capsys):
    model = custom_code_model(tmp_path / "custom")
    if cli == "train":
        code, printed = run_main(train.main, tiny_train_argv + [
            "--output_dir", str(tmp_path / "out"), "--model", str(model)], capsys)
    else:
        code, printed = run_main(evaluation_cli.main, ["--model", str(model), "--question", "1+1?"], capsys)
    line = error_line(printed)
    assert code == 2 and str(model) in line and "custom code" in line and "--trust_remote_code" in line
    assert not (model / "ran").exists()


@pytest.mark.parametrize("cli, flag", [("train", []), ("train", ["--trust_remote_code", "true"]),
                                       ("test.py", []), ("test.py", ["--trust_remote_code"])])
def test_trust_remote_code_is_passed_through_when_asked(cli, flag, tmp_path, tiny_train_argv, tiny_model_dir,
                                                        capsys, monkeypatch):
    """The loaders are replaced by recorders (the tokenizer loads, the model stops the run)."""
    import transformers

    from grpo.testing import tiny_tokenizer

    seen = {}

    def tokenizer_loader(path, **kwargs):
        seen["tokenizer"] = kwargs.get("trust_remote_code")
        return tiny_tokenizer()

    def model_loader(path, **kwargs):
        seen["model"] = kwargs.get("trust_remote_code")
        raise OSError("recorded; stop here")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", tokenizer_loader)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", model_loader)
    if cli == "train":
        code, _ = run_main(train.main, tiny_train_argv + ["--output_dir", str(tmp_path / "out")] + flag, capsys)
    else:
        code, _ = run_main(evaluation_cli.main, ["--model", str(tiny_model_dir), "--question", "1+1?"] + flag, capsys)
    assert code == 2
    assert seen == {"tokenizer": bool(flag), "model": bool(flag)}


# ---------------------------------------------------------------------------- config values are data
def payload(marker: Path) -> str:
    return f"__import__('os').system('touch {marker}')"


def test_the_config_payload_runs_when_evaluated(tmp_path):
    """The control: evaluating the payload string would create its marker."""
    eval(payload(tmp_path / "ran"))  # noqa: S307 -- deliberately, in the test only
    assert (tmp_path / "ran").exists()


def test_config_strings_stay_strings(tmp_path):
    marker = tmp_path / "ran"
    cfg = parse_config(["--output_dir", payload(marker), "--model", payload(marker), "--dataset", payload(marker)])
    assert cfg.output_dir == cfg.model == cfg.dataset == payload(marker)
    with pytest.raises(ConfigError, match="reward_weights=.*give numbers"):
        parse_config(["--reward_weights", payload(marker)])
    with pytest.raises(ConfigError, match="lora_r=.*is not a valid int"):
        grpo.GRPOConfig(lora_r=payload(marker))
    assert not marker.exists()


@pytest.mark.parametrize("where", ["cli-number", "yaml-number", "yaml-python-tag"])
def test_config_values_are_never_evaluated(where, tmp_path, tiny_train_argv, capsys):
    marker = tmp_path / "ran"
    argv = tiny_train_argv + ["--output_dir", str(tmp_path / "out")]
    if where == "cli-number":
        argv += ["--learning_rate", payload(marker)]
        expect = "is not a valid float"
    else:
        value = (f'"{payload(marker)}"' if where == "yaml-number"
                 else f"!!python/object/apply:os.system ['touch {marker}']")
        (tmp_path / "x.yaml").write_text(f"learning_rate: {value}\n")
        argv = ["--config", str(tmp_path / "x.yaml")] + argv
        expect = "is not a valid float" if where == "yaml-number" else "is not valid YAML"
    code, printed = run_main(train.main, argv, capsys)
    assert code == 2 and expect in error_line(printed)
    assert not marker.exists()


# ---------------------------------------------------------------------------- reward functions
def test_rewards_are_imported_only_from_an_explicit_path(tmp_path, tiny_train_argv, capsys, monkeypatch):
    """A bare name that is not registered is an error, never an import; a registered name wins
    over a module of the same name; `module:function` imports that module (and only then)."""
    from rewards import REGISTRY, get_reward

    name = f"user_module_{tmp_path.name.replace('-', '_')}"
    for module in (name, "correctness"):
        (tmp_path / f"{module}.py").write_text(
            f"import pathlib\npathlib.Path({str(tmp_path / (module + '.ran'))!r}).write_text('x')\n"
            "def score(prompts, completions, **columns):\n    return [0.0] * len(completions)\n"
        )
    monkeypatch.syspath_prepend(str(tmp_path))

    code, printed = run_main(train.main, tiny_train_argv + ["--output_dir", str(tmp_path / "out"),
                                                            "--reward_funcs", name], capsys)
    assert code == 2 and f"unknown reward {name!r}" in error_line(printed)
    assert get_reward("correctness") is REGISTRY["correctness"]
    assert not (tmp_path / f"{name}.ran").exists() and not (tmp_path / "correctness.ran").exists()
    assert name not in sys.modules

    assert get_reward(f"{name}:score")(None, ["a"]) == [0.0]
    assert (tmp_path / f"{name}.ran").exists()


# ---------------------------------------------------------------------------- the sources
SOURCES = sorted([*REPO.glob("grpo/*.py"), *REPO.glob("data/*.py"), *REPO.glob("rewards/*.py"),
                  REPO / "train.py", REPO / "test.py"])


def dangerous_calls(tree: ast.AST) -> list[str]:
    """Calls that run code from data: eval/exec/compile/__import__, pickle-family loads, torch.load
    without weights_only=True, yaml.load/unsafe_load/full_load, os.system, shell=True,
    trust_remote_code=True written as a constant."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        name = f.id if isinstance(f, ast.Name) else None
        owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else None
        attr = f.attr if isinstance(f, ast.Attribute) else None
        kwargs = {k.arg: k.value for k in node.keywords}
        if name in ("eval", "exec", "compile", "__import__"):
            found.append(f"{name}() at line {node.lineno}")
        if owner in ("pickle", "dill", "marshal", "shelve", "cloudpickle") and attr in ("load", "loads", "open"):
            found.append(f"{owner}.{attr}() at line {node.lineno}")
        if owner == "torch" and attr == "load":
            weights_only = kwargs.get("weights_only")
            if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                found.append(f"torch.load without weights_only=True at line {node.lineno}")
        if owner == "yaml" and attr in ("load", "unsafe_load", "full_load", "load_all", "unsafe_load_all"):
            found.append(f"yaml.{attr}() at line {node.lineno}")
        if owner == "os" and attr in ("system", "popen"):
            found.append(f"os.{attr}() at line {node.lineno}")
        shell = kwargs.get("shell")
        if isinstance(shell, ast.Constant) and shell.value is True:
            found.append(f"shell=True at line {node.lineno}")
        trust = kwargs.get("trust_remote_code")
        if isinstance(trust, ast.Constant) and trust.value is True:
            found.append(f"trust_remote_code=True at line {node.lineno}")
    return found


def test_the_scan_finds_what_it_looks_for():
    bad = ("eval(x)\nexec(y)\npickle.loads(b)\ntorch.load(f)\ntorch.load(f, weights_only=False)\n"
           "yaml.load(s)\nos.system(c)\nsubprocess.run(c, shell=True)\n"
           "AutoModel.from_pretrained(p, trust_remote_code=True)\n")
    assert len(dangerous_calls(ast.parse(bad))) == 9
    good = ("model.eval()\ntorch.load(f, weights_only=True)\nyaml.safe_load(s)\nre.compile(p)\n"
            "load(p, trust_remote_code=t)\n")
    assert dangerous_calls(ast.parse(good)) == []


def test_sources_hold_no_dangerous_calls():
    assert len(SOURCES) > 20
    found = {str(p.relative_to(REPO)): calls for p in SOURCES if (calls := dangerous_calls(ast.parse(p.read_text())))}
    assert found == {}
