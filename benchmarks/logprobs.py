"""Benchmark of the per-token log-prob kernels in `grpo.logprobs`.

    python benchmarks/logprobs.py --quick                 # one small shape, a few seconds
    python benchmarks/logprobs.py                         # the CPU sweep (or GPU sweep on CUDA)
    python benchmarks/logprobs.py --write                 # ... and update benchmarks/RESULTS.md
    python benchmarks/logprobs.py --shapes 151936,1024,4096 --methods floor,fused --modes fwd+bwd

Each (shape, mode, method) runs in a fresh subprocess of this script, so that the CPU peak
memory is that method's alone: after allocating the inputs (and one warm-up call, for
`compiled` only on CPU: it compiles) the child resets the kernel's peak-RSS mark
(/proc/self/clear_refs; falls back to getrusage(RUSAGE_SELF).ru_maxrss where that is not
allowed), reads the RSS, runs the timed calls and reports peak RSS minus that RSS. On CUDA: torch.cuda.max_memory_allocated minus the
memory allocated before the calls. glibc is told to return large blocks to the OS at once
(MALLOC_MMAP_THRESHOLD_), so freed chunks are not silently reused across calls.

The default CPU sweep (no --shapes) is every V in {32000, 49152, 151936} x H in {576, 1024}
at N = 1024 plus the goal shape V=151936, H=1024, N=4096; to stay near 10 minutes on 2
cores it runs `compiled` at one shape only and skips `chunked`/`trl` at the goal shape (the
skip reason is printed in the row). Full-logits methods are skipped above --max-gb.

Modes: `fwd` = no-grad forward (old/reference log-probs); `fwd+bwd` = forward and backward
with the lm_head frozen (LoRA: only grad_hidden); `fwd+bwd+W` = lm_head trainable too.
The floor is the bare lm_head matmul(s) of the same shape, in the input dtype: fwd 1 matmul
(logits), fwd+bwd 2 (logits, grad_hidden), fwd+bwd+W 3 (+ grad_weight). ratio = time / floor.

Anchor: TRL's `selective_log_softmax` (method `trl`), only when trl is importable, e.g. after
`pip install --no-deps --target /tmp/trl_pkg trl` and `--trl-path /tmp/trl_pkg` (or env
TRL_PATH). trl is never a dependency of this project.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from common import machine, write_section  # benchmarks/common.py (the script's folder)

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Log-prob kernels (CPU)"

ALL_METHODS = ["floor", "naive", "selective", "chunked", "fused", "fused-recompute", "compiled", "triton", "trl"]
CPU_SHAPES = [(v, h, 1024) for v in (32000, 49152, 151936) for h in (576, 1024)] + [(151936, 1024, 4096)]  # + goal
GPU_SHAPES = [(v, h, n) for v in (32000, 49152, 151936) for h in (576, 1024) for n in (1024, 4096, 16384, 65536)]
QUICK_SHAPE = [(8192, 256, 512)]
GOAL_SHAPE = (151936, 1024, 4096)  # the target: fused fwd+bwd within 1.2x of the floor
COMPILED_SHAPE = (32000, 1024, 1024)
MODES = ["fwd", "fwd+bwd", "fwd+bwd+W"]
FLOOR_MATMULS = {"fwd": 1, "fwd+bwd": 2, "fwd+bwd+W": 3}


# ---------------------------------------------------------------- child: one measurement


def _rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def _peak_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux >= 4.0: reset VmHWM to VmRSS
        return True
    except OSError:
        return False


def _make_call(method: str, mode: str, hidden, weight, targets, grad_out, trl_path: str | None, token_chunk=None):
    """A closure running one forward (and backward) of `method` in `mode`."""
    from grpo.logprobs import token_logprobs

    if method == "floor":

        def call():
            z = hidden @ weight.T  # [N, V]
            if mode != "fwd":
                z @ weight  # grad_hidden = grad_z @ W  [N, H]
            if mode == "fwd+bwd+W":
                z.T @ hidden  # grad_weight = grad_z.T @ hidden  [V, H]

        return call

    if method == "trl":
        if trl_path:
            sys.path.insert(0, trl_path)
        from trl.trainer.utils import selective_log_softmax

        def fn(h, w, t):
            return selective_log_softmax((h @ w.T).float(), t)

    else:
        name, kw = (("fused", {"grad_in_forward": False}) if method == "fused-recompute" else (method, {}))
        if token_chunk and name in ("chunked", "fused", "compiled", "triton"):
            kw["token_chunk"] = token_chunk

        def fn(h, w, t):
            return token_logprobs(h, w, t, method=name, **kw)

    def call():
        if mode == "fwd":
            with torch.no_grad():
                fn(hidden, weight, targets)
            return
        h = hidden.detach().requires_grad_(True)
        weight.requires_grad_(mode == "fwd+bwd+W")
        weight.grad = None
        fn(h, weight, targets).backward(grad_out)

    return call


def child(args) -> dict:
    torch.manual_seed(0)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    vocab, hid, n_tok = args.shape
    hidden = torch.randn(n_tok, hid, device=device, dtype=dtype)
    weight = (torch.randn(vocab, hid, device=device) / hid**0.5).to(dtype)
    targets = torch.randint(0, vocab, (n_tok,), device=device)
    grad_out = torch.rand(n_tok, device=device)  # non-uniform upstream gradient
    call = _make_call(args.method, args.mode, hidden, weight, targets, grad_out, args.trl_path, args.token_chunk)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    if args.method == "compiled" or device.type == "cuda":
        call()  # warm-up: compiles `compiled`; on CUDA, loads kernels and cuBLAS handles
        sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        reset = _reset_peak()
        base = _rss_kb() * 1024
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        call()
        sync()
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _peak_kb() * 1024 - base if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"median_s": statistics.median(times), "times": times, "peak_mb": max(peak, 0) / 2**20}


# ---------------------------------------------------------------- parent: the sweep


def unavailable(method: str, device: str, trl_path: str | None) -> str | None:
    """Why `method` cannot run here (None when it can)."""
    from grpo.logprobs import compile_status, triton_status

    if method == "compiled":
        return compile_status()
    if method == "triton":
        return triton_status(torch.device(device).type)
    if method == "trl":
        code = "import sys; sys.path[:0] = sys.argv[1:]; from trl.trainer.utils import selective_log_softmax"
        paths = [trl_path] if trl_path else []
        res = subprocess.run([sys.executable, "-c", code, *paths], capture_output=True, text=True)
        if res.returncode:
            return "trl not importable (" + (res.stderr.strip().splitlines() or ["?"])[-1][:120] + ")"
    return None


def cpu_sweep_skip(method: str, shape) -> str | None:
    """Keep the default CPU sweep near 10 minutes on 2 cores (name shapes to run the rest)."""
    if method == "compiled" and shape != COMPILED_SHAPE:
        return f"default CPU sweep: only at {COMPILED_SHAPE} (compiles per shape, ~1 min on 2 cores)"
    if method in ("chunked", "trl") and shape == GOAL_SHAPE:
        return "default CPU sweep: skipped at the goal shape (>4x the floor at N=1024, minutes here)"
    return None


def too_big(method: str, mode: str, shape, max_gb: float) -> str | None:
    """Skip full-logits methods whose [N, V] copies would not fit in `max_gb`."""
    vocab, _, n_tok = shape
    copies = {"naive": 4, "selective": 3, "trl": 3, "floor": 1}.get(method)
    if copies is None:
        return None
    copies = copies if mode != "fwd" else min(copies, 2)
    need = copies * n_tok * vocab * 4 / 2**30
    return f"needs ~{need:.0f} GB (> --max-gb {max_gb:g})" if need > max_gb else None


def run_child(args, shape, method, mode) -> dict:
    cmd = [
        sys.executable, __file__, "--child", "--device", args.device, "--dtype", args.dtype,
        "--shape", ",".join(map(str, shape)), "--method", method, "--mode", mode, "--repeats", str(args.repeats),
    ]
    if args.trl_path:
        cmd += ["--trl-path", args.trl_path]
    if args.token_chunk:
        cmd += ["--token-chunk", str(args.token_chunk)]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode:
        tail = (res.stderr.strip().splitlines() or ["(no stderr)"])[-1]
        return {"error": f"rc={res.returncode}: {tail[:160]}"}
    return json.loads(res.stdout.strip().splitlines()[-1])


def sweep(args) -> list[dict]:
    rows = []
    skip = {m: unavailable(m, args.device, args.trl_path) for m in args.methods}
    for shape in args.shapes:
        for mode in args.modes:
            floor = None
            for method in args.methods:
                row = {"shape": shape, "mode": mode, "method": method}
                reason = skip[method] or too_big(method, mode, shape, args.max_gb)
                if not reason and args.default_cpu_sweep:
                    reason = cpu_sweep_skip(method, shape)
                if reason:
                    row["skip"] = reason
                else:
                    row.update(run_child(args, shape, method, mode))
                    if method == "floor" and "median_s" in row:
                        floor = row["median_s"]
                    if floor and "median_s" in row:
                        row["ratio"] = row["median_s"] / floor
                rows.append(row)
                print(format_row(row), flush=True)
    return rows


def format_row(row) -> str:
    v, h, n = row["shape"]
    head = f"| {v} | {h} | {n} | {row['mode']} | {row['method']} |"
    if "skip" in row or "error" in row:
        return f"{head} - | - | - | {row.get('skip') or row.get('error')} |"
    ratio = f"{row['ratio']:.2f}" if "ratio" in row else "-"
    return f"{head} {row['median_s']:.3f} | {ratio} | {row['peak_mb']:.0f} | |"


TABLE_HEAD = (
    "| V | H | N | mode | method | median s | x floor | peak extra MB | note |\n"
    "|---:|---:|---:|---|---|---:|---:|---:|---|"
)


def write_results(args, rows) -> None:
    cmd = "python benchmarks/logprobs.py " + " ".join(sys.argv[1:])
    body = "\n".join(
        [
            f"Measured {datetime.date.today().isoformat()} on {machine()}, {args.dtype}, "
            f"median of {args.repeats} timed call(s), each (shape, mode, method) in a fresh process "
            "(warm-up call only for `compiled`, which compiles).",
            f"Command: `{cmd}` (1-minute load average when written: {os.getloadavg()[0]:.1f})",
            "",
            "Modes: fwd = no-grad forward; fwd+bwd = forward + backward with the lm_head frozen "
            "(the LoRA case: floor = 2 matmuls); fwd+bwd+W = lm_head trainable (floor = 3 matmuls). "
            "x floor = time / bare matmul time of the same shape and mode. Peak extra MB = "
            "peak RSS minus RSS before the timed calls (inputs excluded). `fused-recompute` is "
            "`fused` with grad_in_forward=False.",
            "",
            TABLE_HEAD,
            *[format_row(r) for r in rows],
            "",
        ]
    )
    write_section(SECTION, body)


def parse_shapes(text: str):
    return [tuple(int(x) for x in s.split(",")) for s in text.split(";") if s.strip()]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one small shape, fwd+bwd only")
    p.add_argument("--shapes", type=parse_shapes, help='"V,H,N;V,H,N" (default: the sweep for the device)')
    p.add_argument("--methods", type=lambda s: s.split(","), default=None, help=f"comma list of {ALL_METHODS}")
    p.add_argument("--modes", type=lambda s: s.split(","), default=["fwd", "fwd+bwd"], help=f"comma list of {MODES}")
    p.add_argument("--repeats", type=int, default=1, help="timed calls per measurement (1: a CPU sweep is long)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="float32 on CPU, bfloat16 on CUDA by default")
    p.add_argument("--token-chunk", type=int, default=None, help="token_chunk for the chunked methods (default: theirs)")
    p.add_argument("--max-gb", type=float, default=6.0, help="skip full-logits methods needing more memory")
    p.add_argument("--trl-path", default=os.environ.get("TRL_PATH"), help="a --target dir holding trl (optional)")
    p.add_argument("--write", action="store_true", help=f"replace the '{SECTION}' section of RESULTS.md")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--shape", type=lambda s: tuple(int(x) for x in s.split(",")), help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    if args.child:
        print(json.dumps(child(args)))
        return
    for m in args.methods or []:
        if m not in ALL_METHODS:
            p.error(f"unknown method {m!r}; choose from {ALL_METHODS}")
    for m in args.modes:
        if m not in MODES:
            p.error(f"unknown mode {m!r}; choose from {MODES}")
    on_gpu = args.device.startswith("cuda")
    args.methods = args.methods or [m for m in ALL_METHODS if on_gpu or m != "triton"]
    if "floor" in args.methods:  # the floor first: ratios need it
        args.methods = ["floor"] + [m for m in args.methods if m != "floor"]
    if args.quick:
        args.shapes, args.modes = args.shapes or QUICK_SHAPE, ["fwd+bwd"]
    args.default_cpu_sweep = not on_gpu and not args.shapes
    args.shapes = args.shapes or (GPU_SHAPES if on_gpu else CPU_SHAPES)
    if args.write and on_gpu:
        p.error("--write records the CPU table only; paste GPU figures by hand with their command")
    print(f"# {machine()}, {args.dtype}\n{TABLE_HEAD}")
    rows = sweep(args)
    if args.write:
        write_results(args, rows)


if __name__ == "__main__":
    main()
