"""The PPO value model: its own LoRA adapter `critic` on the shared base, plus a scalar head.

V(s_t) for completion token t is `head(h)` of the critic's last hidden state h at the
position that predicts token t (the same positions `model.completion_logprobs` reads), so
V(s_t) values the state before token t is chosen, as GAE expects.

Why a separate adapter and not a head on the policy's hidden states (shared trunk)?
Measured on CPU (`benchmarks/algorithms.py --part critic`, RESULTS.md "Critic designs for
PPO"; 4-layer H = 256 model, B = 8, 32 + 64 tokens, one micro-batch update, median of 3 on
an idle machine): no critic 146 ms, shared trunk 151 ms (1.03x), separate adapter 299 ms
(2.05x: one more forward/backward of the base); saved activations 62 MB in all three (the
critic's graph is freed before the next one is built); the adapter adds 262k trainable
parameters against 257 for the shared head. The shared trunk is the cheaper one; we still
take the separate adapter (`shared` is the switch to add if the cost matters) because
- the value loss cannot pull the policy's features around (no vf_coef balancing of two
  losses on one trunk; early value errors are large and would dominate the policy
  gradient), which is why InstructGPT-style PPO keeps a separate value model;
- the policy path (`completion_logprobs`, the reference pass, rollouts) stays untouched;
- both still share the one (4-bit) base in memory: the critic adds only LoRA weights,
  a H -> 1 head and, during its own pass, its activations.

PEFT's `set_adapter` switches `requires_grad` to the active adapter only, and gradients
reach a leaf only while it requires grad, so the critic's forward *and backward* run
inside `with critic.active():`.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import Tensor, nn

from grpo.model import POLICY, decoder_and_head, lora_config

CRITIC = "critic"
HEAD_PREFIX = "v_head."


class Critic:
    """Value model on `model` (a PeftModel whose policy adapter is `default`).

    model: the PeftModel; a LoRA adapter `critic` (same rank and targets as the policy's)
        is added to it.
    cfg: the GRPOConfig (lora_r, lora_alpha, lora_dropout, lora_target_modules).
    """

    def __init__(self, model, cfg):
        if CRITIC in model.peft_config:
            raise ValueError(f"the model already has an adapter named {CRITIC!r}")
        self.model = model
        model.add_adapter(CRITIC, lora_config(cfg))
        model.set_adapter(POLICY)  # the policy stays the active (sampling, trained) adapter
        base = model.get_base_model()
        device = next(model.parameters()).device
        # Zero init: V = 0 at step 0, so the first advantages are the (whitened) returns.
        self.head = nn.Linear(base.config.hidden_size, 1, device=device, dtype=torch.float32)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @contextlib.contextmanager
    def active(self) -> Iterator["Critic"]:
        """Within this context the critic adapter is on (trainable); the policy after it."""
        self.model.set_adapter(CRITIC)
        try:
            yield self
        finally:
            self.model.set_adapter(POLICY)

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.model.named_parameters() if f".{CRITIC}." in name]

    def parameters(self) -> list[nn.Parameter]:
        """The critic's trainable parameters: its LoRA weights and the head."""
        return self.adapter_parameters() + list(self.head.parameters())

    def values(self, prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor,
               completion_mask: Tensor) -> Tensor:
        """V(s_t) for every completion token, [B, T] float32 (0 on padding).

        prompt_ids, prompt_mask: [B, Tp] left-padded; completion_ids, completion_mask: [B, T].
        Call inside `active()`.
        """
        if self.model.active_adapter != CRITIC:
            raise RuntimeError("Critic.values runs inside `with critic.active():` (the critic adapter must be on)")
        decoder, _ = decoder_and_head(self.model)
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)  # [B, Tp+T]
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)  # [B, Tp+T]
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=False).last_hidden_state  # [B, Tp+T, H]
        hidden = hidden[:, prompt_ids.shape[1] - 1 : -1]  # [B, T, H]: the states before each token
        with torch.autocast(hidden.device.type, enabled=False):  # the head in float32 even under autocast
            values = self.head(hidden.float()).squeeze(-1)  # [B, T]
        return values * completion_mask.to(values.dtype)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Tensor]:
        """The critic adapter (PEFT key names) and the head (`v_head.*`), for safetensors."""
        from peft.utils import get_peft_model_state_dict

        adapter = get_peft_model_state_dict(self.model, adapter_name=CRITIC)
        head = {HEAD_PREFIX + k: v for k, v in self.head.state_dict().items()}
        return {k: v.detach().contiguous().cpu() for k, v in {**adapter, **head}.items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        from peft.utils import set_peft_model_state_dict

        head = {k[len(HEAD_PREFIX):]: v for k, v in state.items() if k.startswith(HEAD_PREFIX)}
        adapter = {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIX)}
        if set(head) != {"weight", "bias"}:
            raise ValueError(f"critic state has no complete value head (found {sorted(head)})")
        result = set_peft_model_state_dict(self.model, adapter, adapter_name=CRITIC)
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"critic state holds weights this model does not have, e.g. {result.unexpected_keys[0]}")
        self.head.load_state_dict(head)
        self.model.set_adapter(POLICY)
