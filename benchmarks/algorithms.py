"""Algorithms on the toy task (CPU): reward against step for every `config.algorithm`, one budget,
and the cost of PPO's critic designs.

    python benchmarks/algorithms.py                    # both parts, writes RESULTS.md + algorithms.png
    python benchmarks/algorithms.py --part critic      # only the critic cost
    python benchmarks/algorithms.py --steps 12 --seeds 0 1

Learning part: the toy task of tests/test_trainer.py (reward = fraction of digits in an
8-token completion, ~0.04 for the random model) on the tiny 2-layer model, every algorithm
with the same budget (steps, 4 prompts x 8 completions a step, lr 2e-2, beta 0) and its own
defaults from `config.ALGORITHM_DEFAULTS`. The embedded SmolLM2 on the synthetic GSM8K task is
too slow on a 2-core CPU for 7 algorithms x several seeds x enough steps to see learning.

Critic part: one update of one micro-batch (forward + backward) with
  none    the policy loss only (GRPO-style, no critic);
  adapter a separate LoRA adapter `critic` + a scalar head, its own forward/backward (grpo/critic.py);
  shared  a scalar head on the policy's own last hidden state, one forward, one backward;
timed (median of repeats) and with the bytes autograd saves for the backward (activation
memory: the separate critic's graph is freed before the next, so its peak is the larger one).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
SECTION = "## Algorithms on the toy task (CPU)"


# ---------------------------------------------------------------------------- learning curves
def learning_curve(algorithm: str, seed: int, steps: int) -> list[float]:
    import grpo
    from grpo.testing import tiny_model, tiny_tokenizer
    from tests.test_trainer import PROMPTS, digit_fraction

    with tempfile.TemporaryDirectory() as tmp:
        config = grpo.GRPOConfig(
            output_dir=tmp, algorithm=algorithm, seed=seed, num_generations=8, batch_size=32, micro_batch_size=8,
            max_completion_length=8, max_steps=steps, learning_rate=2e-2, lr_scheduler="constant", beta=0.0,
            lora_r=8, save_steps=0, progress_bar=False, log_completions_steps=0,
        )
        trainer = grpo.Trainer(tiny_model(), tiny_tokenizer(), [digit_fraction], PROMPTS, config)
        curve = []
        for _ in range(steps):
            metrics = trainer.step()
            # dapo's `reward` is over the filtered batch; `reward_sampled` over every draw (unbiased)
            curve.append(metrics.get("reward_sampled", metrics["reward"]))
        return curve


def run_learning(steps: int, seeds: list[int]) -> dict[str, list[list[float]]]:
    from grpo.algorithms import ALGORITHMS

    curves = {}
    for name in ALGORITHMS:
        t0 = time.perf_counter()
        curves[name] = [learning_curve(name, s, steps) for s in seeds]
        print(f"{name:13s} {time.perf_counter() - t0:6.1f}s  " +
              " ".join(f"{statistics.mean(c[i] for c in curves[name]):.2f}" for i in range(steps)), flush=True)
    return curves


def first_step_at(curve: list[float], level: float) -> int | None:
    return next((i + 1 for i, r in enumerate(curve) if r >= level), None)


def learning_table(curves: dict[str, list[list[float]]], steps: int) -> str:
    lines = ["| algorithm | reward step 1 | reward step %d | last 2 steps | first step >= 0.9 (per seed) |" % steps,
             "|---|---|---|---|---|"]
    for name, runs in curves.items():
        mean = [statistics.mean(r[i] for r in runs) for i in range(steps)]
        firsts = ", ".join(str(first_step_at(r, 0.9) or "-") for r in runs)
        lines.append(f"| {name} | {mean[0]:.2f} | {mean[-1]:.2f} | {statistics.mean(mean[-2:]):.2f} | {firsts} |")
    return "\n".join(lines)


def plot(curves: dict[str, list[list[float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, runs in curves.items():
        steps = range(1, len(runs[0]) + 1)
        ax.plot(steps, [statistics.mean(r[i] for r in runs) for i in range(len(runs[0]))], marker="o", ms=3, label=name)
    ax.axhline(0.9, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("mean reward (digit fraction)")
    ax.set_title(f"Toy task, tiny model, mean of {len(next(iter(curves.values())))} seed(s)")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ---------------------------------------------------------------------------- critic cost
def saved_bytes():
    """Context that sums the bytes of the (distinct) tensors autograd saves for backward."""
    seen, total = set(), [0]

    def pack(t):
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total[0] += key[1]
        return t

    return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), total


def critic_cost(model_name: str, batch: int, prompt_len: int, completion_len: int, repeats: int) -> list[dict]:
    from grpo.config import GRPOConfig
    from grpo.critic import Critic
    from grpo.logprobs import token_logprobs
    from grpo.model import attach_adapters, completion_logprobs, decoder_and_head, load_base_model
    from grpo.testing import tiny_model

    cfg = GRPOConfig(algorithm="ppo", lora_r=16, num_generations=1, batch_size=batch, micro_batch_size=batch)
    torch.manual_seed(0)
    base = tiny_model(hidden_size=256, num_layers=4) if model_name == "tiny" else load_base_model(model_name, load_in_4bit=False)
    model = attach_adapters(base, cfg)
    critic = Critic(model, cfg)
    shared_head = torch.nn.Linear(base.config.hidden_size, 1)
    V = base.config.vocab_size
    g = torch.Generator().manual_seed(0)
    p_ids, c_ids = torch.randint(4, V, (batch, prompt_len), generator=g), torch.randint(4, V, (batch, completion_len), generator=g)
    p_mask, c_mask = torch.ones_like(p_ids), torch.ones_like(c_ids)
    adv, returns = torch.randn(batch, completion_len, generator=g), torch.randn(batch, completion_len, generator=g)
    model.train()

    def policy_loss(logp):
        return -(logp * adv).mean()

    def none():
        policy_loss(completion_logprobs(model, p_ids, p_mask, c_ids, c_mask)).backward()

    def adapter():
        none()
        with critic.active():
            (critic.values(p_ids, p_mask, c_ids, c_mask) - returns).pow(2).mean().backward()

    def shared():
        decoder, weight = decoder_and_head(model)
        ids, mask = torch.cat([p_ids, c_ids], 1), torch.cat([p_mask, c_mask], 1)
        hidden = decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state[:, prompt_len - 1 : -1]
        logp = token_logprobs(hidden.reshape(-1, hidden.shape[-1]), weight, c_ids.reshape(-1)).view(batch, -1)
        values = shared_head(hidden).squeeze(-1)
        (policy_loss(logp) + cfg.vf_coef * (values - returns).pow(2).mean()).backward()

    rows = []
    for name, fn in (("none", none), ("adapter", adapter), ("shared", shared)):
        fn()  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        # activation memory: each backward frees its graph, so measure graph by graph
        peaks = []
        for part in ("policy", "critic") if name == "adapter" else ("all",):
            hooks, total = saved_bytes()
            with hooks:
                if part == "critic":
                    with critic.active():
                        loss = critic.values(p_ids, p_mask, c_ids, c_mask).sum()
                else:
                    loss = None
                    (none if name == "none" or part == "policy" else shared)()
            if loss is not None:
                loss.backward()
            peaks.append(total[0])
        model.zero_grad(set_to_none=True)
        critic.head.zero_grad(set_to_none=True)
        extra = sum(p.numel() for p in critic.parameters()) if name == "adapter" else (
            sum(p.numel() for p in shared_head.parameters()) if name == "shared" else 0)
        rows.append({"model": model_name, "design": name, "ms": 1000 * statistics.median(times),
                     "activation_mb": max(peaks) / 2**20, "extra_params": extra})
        print(rows[-1], flush=True)
    return rows


def critic_table(rows: list[dict]) -> str:
    lines = ["| model | design | update ms (median) | x none | saved activations, peak MB | extra trainable params |",
             "|---|---|---|---|---|---|"]
    base = {r["model"]: r["ms"] for r in rows if r["design"] == "none"}
    for r in rows:
        lines.append(f"| {r['model']} | {r['design']} | {r['ms']:.0f} | {r['ms'] / base[r['model']]:.2f} | "
                     f"{r['activation_mb']:.1f} | {r['extra_params']:,} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- RESULTS.md
def write_subsection(title: str, body: str) -> None:
    """Replace (or add) `### title` inside our section of RESULTS.md; other sections stay as they are."""
    text = RESULTS.read_text() if RESULTS.is_file() else "# Measured results\n"
    if SECTION not in text:
        text = text.rstrip("\n") + "\n\n" + SECTION + "\n\nMeasured with `python benchmarks/algorithms.py`.\n"
    start = text.index(SECTION)
    nxt = text.find("\n## ", start + len(SECTION))
    end = len(text) if nxt == -1 else nxt + 1
    section, block = text[start:end].rstrip("\n") + "\n", f"### {title}\n\n{body.strip()}\n"
    head = f"### {title}\n"
    if head in section:
        a = section.index(head)
        b = section.find("\n### ", a + len(head))
        section = section[:a] + block + ("" if b == -1 else "\n" + section[b + 1:])
    else:
        section = section + "\n" + block
    RESULTS.write_text(text[:start] + section + ("\n" + text[end:] if nxt != -1 else ""))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("all", "learning", "critic"), default="all")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--embedded", action="store_true", help="also measure the critic cost on SmolLM2-135M")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args(argv)
    date = time.strftime("%Y-%m-%d")
    if args.part in ("all", "critic"):
        rows = critic_cost("tiny", batch=8, prompt_len=32, completion_len=64, repeats=args.repeats)
        if args.embedded:
            rows += critic_cost("embedded", batch=2, prompt_len=64, completion_len=32, repeats=args.repeats)
        body = ("One micro-batch update (forward + backward); tiny = the 4-layer, H = 256 test model, B = 8, "
                "32 prompt + 64 completion tokens; embedded = SmolLM2-135M, B = 2, 64 + 32 tokens; float32, "
                f"CPU, {date}, median of {args.repeats}.\n\n" + critic_table(rows))
        print(body)
        if not args.no_write:
            write_subsection("Critic designs for PPO", body)
    if args.part in ("all", "learning"):
        curves = run_learning(args.steps, args.seeds)
        plot(curves, ROOT / "benchmarks" / "algorithms.png")
        body = (f"{args.steps} steps, 4 prompts x 8 completions a step, lr 2e-2, beta 0, seeds {args.seeds}, "
                f"{date}. Plot: `benchmarks/algorithms.png`. dapo's reward is `reward_sampled` (every group "
                "drawn, before dynamic sampling filters them).\n\n" + learning_table(curves, args.steps))
        print(body)
        if not args.no_write:
            write_subsection("Reward against step, one budget", body)


if __name__ == "__main__":
    main()
