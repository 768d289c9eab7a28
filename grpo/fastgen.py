"""A fast copy of the policy for sampling: plain linear layers with the LoRA merged in.

Sampling through the PEFT model pays, at every decoded token and in every targeted layer,
for the LoRA branch run apart (dropout, A, B, scaling, add: five small kernels) and, on a
4-bit base, for dequantizing the weight again (bitsandbytes keeps only the NF4 codes).
TRL without vLLM samples that way (`model.generate` on the PEFT model). `FastPolicy`
samples from an ordinary transformers model of the same architecture whose targeted
weights are the merged ones,

    W = W_base + scaling * B @ A        (LoRA, Hu et al. 2021, eq. 3: h = W0 x + B A x)

with W_base dequantized from 4-bit (`bitsandbytes.functional.dequantize_4bit`, the same
call the 4-bit forward makes) or read as is from a full-precision base. After an optimizer
step, `refresh()` recomputes W for the LoRA-targeted layers only, in place: W_base is read
again from the base (a 4-bit base is dequantized again, one layer at a time), so the copy
holds one dense weight per layer, never a second dense W_base. The other weights never change (they
are shared with the PEFT base when dtype and layout allow, so they cost no memory, or
copied once otherwise).

Exactness: in float32 the merged layer computes (W0 + BA s) x where PEFT computes
W0 x + s B(A x): the same sum in another order, so logits agree to float32 rounding
(tests/test_fastgen.py). In bfloat16 (the CUDA default) the merged weight is rounded to
bfloat16 once, which PEFT's separate branch does not do; the trainer's log-probs always
come from the PEFT model, so that rounding only changes which tokens get sampled, never
the probabilities the loss uses.

Limits: plain LoRA only (no DoRA, no 8-bit base); the model must be a PeftModel whose
active adapter(s) are LoRA and not merged.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn


class FastPolicyError(ValueError):
    """A PEFT model that FastPolicy cannot copy; the message says what is unsupported."""


def default_fast_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on a CUDA device that supports it, else float32. On CPU the trainer passes the
    dtype `grpo.precision` chose (bfloat16 where the CPU has fast bf16 matmuls)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def dense_weight(param: Tensor) -> Tensor:
    """The full-precision values of a weight: dequantized if it is a bitsandbytes 4-bit
    parameter (returned in its quant_state dtype), the tensor itself otherwise."""
    quant_state = getattr(param, "quant_state", None)
    if quant_state is not None:
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(param.data, quant_state)
    _reject_8bit(param)
    return param.detach()


def _reject_8bit(param: Tensor) -> None:
    if type(param).__name__ == "Int8Params":
        raise FastPolicyError("FastPolicy does not support 8-bit (LLM.int8) base weights; load the base in 4-bit or full precision.")


def _lora_factors(layer) -> list[tuple[Tensor, Tensor, float]]:
    """(B [out, r], A [r, in], scaling) of each active LoRA adapter of a PEFT LoRA layer."""
    if getattr(layer, "merged", False):
        raise FastPolicyError(f"{type(layer).__name__} has merged adapters; unmerge them before building a FastPolicy.")
    if getattr(layer, "fan_in_fan_out", False):
        raise FastPolicyError("LoRA on fan_in_fan_out layers (GPT-2 Conv1D) is not supported by FastPolicy.")
    if getattr(layer, "disable_adapters", False):
        return []
    factors = []
    for name in layer.active_adapters:
        if name not in layer.lora_A:
            continue
        if getattr(layer, "use_dora", {}).get(name, False):
            raise FastPolicyError(f"adapter {name!r} uses DoRA; FastPolicy merges plain LoRA only.")
        factors.append((layer.lora_B[name].weight.detach(), layer.lora_A[name].weight.detach(), layer.scaling[name]))
    return factors


@torch.no_grad()
def merge_into(weight: Tensor, base_param: Tensor, layer) -> None:
    """weight <- W_base + sum over active adapters of scaling * B @ A, in place, where W_base
    is the (dequantized) value of the base layer's weight `base_param`.

    The LoRA delta is added straight into the copy's weight (no temporary [out, in] delta:
    on CPU, allocating ~100 M fresh floats per refresh cost more than the matmuls). In
    float32 this is exactly PEFT's `get_delta_weight` merge.
    """
    weight.copy_(dense_weight(base_param))  # a 4-bit base: one layer's dequantized temporary
    for B, A, scaling in _lora_factors(layer):
        weight.addmm_(B.to(weight.dtype), A.to(weight.dtype), alpha=scaling)  # [out, r] @ [r, in]


def _unwrap_modules_to_save(module):
    """The module whose weights a `modules_to_save` wrapper currently uses."""
    from peft.utils import ModulesToSaveWrapper

    if not isinstance(module, ModulesToSaveWrapper):
        return module, False
    active = [a for a in module.active_adapters if a in module.modules_to_save]
    if module.disable_adapters or not active:
        return module.original_module, False
    return module.modules_to_save[active[0]], True  # trainable: re-copied on refresh


class FastPolicy:
    """A plain (non-PEFT, non-quantized) copy of a PeftModel's active policy, for sampling.

    peft_model: a PeftModel with LoRA adapters (base in full precision or bitsandbytes 4-bit).
    dtype: of the copy's weights; default bfloat16 on CUDA, float32 on CPU.
    keep: True keeps the copy between rollouts (speed); False frees it in `release()` and
        rebuilds it on the next `refresh()` (memory: the copy lives only while sampling).

    Use: `policy = fast.refresh()` before each rollout (cheap: only the merged LoRA weights
    are recomputed), then `grpo.rollout.generate_rollout(policy, ...)`.
    """

    def __init__(self, peft_model, dtype: torch.dtype | None = None, keep: bool = True):
        if not hasattr(peft_model, "get_base_model"):
            raise FastPolicyError(f"FastPolicy needs a peft.PeftModel, got {type(peft_model).__name__}.")
        self.peft_model = peft_model
        self.device = next(peft_model.parameters()).device
        self.dtype = dtype or default_fast_dtype(self.device)
        self.keep = keep
        self._model: nn.Module | None = None
        # name -> (weight of the copy, LoRA layer of the PEFT model, its base layer's weight)
        self._lora: dict[str, tuple[nn.Parameter, nn.Module, Tensor]] = {}
        # (parameter of the copy, trainable source tensor) for copied modules_to_save weights
        self._trainable_copies: list[tuple[nn.Parameter, Tensor]] = []

    @property
    def model(self) -> nn.Module:
        """The copy (built on first use). Call `refresh()` after the adapter changed."""
        if self._model is None:
            self._model = self._build()
        return self._model

    @property
    def lora_layer_names(self) -> list[str]:
        """Names of the copy's modules whose weight `refresh()` recomputes."""
        self.model
        return list(self._lora)

    @torch.no_grad()
    def refresh(self) -> nn.Module:
        """Recompute W = W_base + scaling * B @ A in place for every LoRA-targeted layer (and
        re-copy trainable modules_to_save weights that are not shared); returns the model."""
        if self._model is None:
            self._model = self._build()  # freshly built = already current
            return self._model
        for weight, layer, base_param in self._lora.values():
            merge_into(weight, base_param, layer)
        for dst, src in self._trainable_copies:
            dst.copy_(src)
        return self._model

    def release(self) -> None:
        """Free the copy unless `keep`; the next `refresh()` rebuilds it."""
        if not self.keep:
            self._model, self._lora, self._trainable_copies = None, {}, []

    # ------------------------------------------------------------------ construction
    @torch.no_grad()
    def _build(self) -> nn.Module:
        from transformers import AutoModelForCausalLM

        base = self.peft_model.get_base_model()
        config = copy.deepcopy(base.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        attn = getattr(base.config, "_attn_implementation", None)
        with torch.device("meta"):  # no random init, no allocation: every tensor is assigned below
            fast = AutoModelForCausalLM.from_config(config, dtype=self.dtype, attn_implementation=attn)
        fast.generation_config = copy.deepcopy(base.generation_config)

        state: dict[str, Tensor] = {}
        converted: dict[int, Tensor] = {}  # id(source tensor) -> its copy, so tied weights stay one tensor
        self._lora, self._trainable_copies = {}, []
        trainable_sources: dict[str, Tensor] = {}
        for name, module in fast.named_modules():
            own = dict(module.named_parameters(recurse=False))
            if not own:
                continue
            try:
                src = base.get_submodule(name)
            except AttributeError as err:
                raise FastPolicyError(f"the PEFT model has no module {name!r} to copy into the fast policy: {err}") from err
            src, trainable = _unwrap_modules_to_save(src)
            if hasattr(src, "lora_A"):  # a LoRA layer: merged weight, recomputed on refresh
                base_layer = src.get_base_layer()
                quant_state = getattr(base_layer.weight, "quant_state", None)
                shape = quant_state.shape if quant_state is not None else base_layer.weight.shape  # [out, in]
                _reject_8bit(base_layer.weight)
                # Always a fresh tensor: refresh() writes into it, never into the base's weight.
                state[f"{name}.weight"] = torch.empty(shape, dtype=self.dtype, device=self.device)
                self._lora[name] = (None, src, base_layer.weight)
                if "bias" in own:
                    state[f"{name}.bias"] = self._shared_or_copy(base_layer.bias, converted)
                continue
            for pname in own:
                key = f"{name}.{pname}"
                state[key] = self._shared_or_copy(getattr(src, pname), converted)
                if trainable:
                    trainable_sources[key] = getattr(src, pname)
        fast.load_state_dict(state, strict=False, assign=True)
        missing = [k for k, v in fast.state_dict().items() if v.is_meta]
        if missing:
            raise FastPolicyError(f"fast policy weights left uncopied: {missing[:5]}")
        # Non-persistent buffers (rotary inv_freq) are not in a state dict, and some modules
        # keep plain tensor attributes (original_inv_freq): take the base's, still on meta.
        for mod_name, module in fast.named_modules():
            for attr, value in list(vars(module).items()) + list(module._buffers.items()):
                if isinstance(value, Tensor) and value.is_meta:
                    src = getattr(base.get_submodule(mod_name), attr)
                    if attr in module._buffers:
                        module._buffers[attr] = src.detach()
                    else:
                        setattr(module, attr, src.detach())
        if fast.config.get_text_config().tie_word_embeddings and fast.get_output_embeddings() is not None:
            out, inp = fast.get_output_embeddings().weight, fast.get_input_embeddings().weight
            if out.data_ptr() != inp.data_ptr():
                raise FastPolicyError("the config ties the input and output embeddings, but the PEFT model's differ "
                                      "(e.g. lm_head in modules_to_save); untie them in the config first.")
        params = dict(fast.named_parameters(remove_duplicate=False))
        for p in params.values():
            p.requires_grad_(False)
        self._lora = {n: (params[f"{n}.weight"], layer, base) for n, (_, layer, base) in self._lora.items()}
        for weight, layer, base_param in self._lora.values():
            merge_into(weight, base_param, layer)
        self._trainable_copies = [(params[k], src) for k, src in trainable_sources.items()
                                  if params[k].data_ptr() != src.data_ptr()]
        fast.eval()
        return fast

    def _shared_or_copy(self, param: Tensor, converted: dict[int, Tensor]) -> Tensor:
        """The dense values of a base parameter: the tensor itself when its dtype and device
        already fit (no memory), else one copy per parameter. Keyed by the id of the
        parameter, which lives as long as the base: tied weights get one copy, and no two
        parameters share a key (the id of a temporary, such as `param.detach()`, is reused
        once it is freed)."""
        tensor = dense_weight(param)
        if tensor.dtype == self.dtype and tensor.device == self.device:
            return tensor
        if id(param) not in converted:
            converted[id(param)] = tensor.to(self.device, self.dtype)
        return converted[id(param)]
