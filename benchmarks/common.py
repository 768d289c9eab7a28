"""What every benchmark script shares: the machine line and the RESULTS.md section writer."""

from __future__ import annotations

import os
import platform
import re
import subprocess
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
HEADER = "# Benchmark results\n\nMeasured tables; each section is written by its benchmark script.\n"


def machine() -> str:
    """GPU name, or CPU model, cores, torch version and threads."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    name = platform.processor() or "cpu"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = re.search(r"Model name:\s*(.+)", out).group(1).strip()
    except (OSError, AttributeError):
        pass
    from grpo.precision import cpu_bf16_instructions

    isa = cpu_bf16_instructions()  # bf16 matmuls are fast only with these (grpo/precision.py)
    return (f"{name}{f' with {isa}' if isa else ' (no AVX512-BF16 / AMX)'}, {os.cpu_count()} cores, "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads)")


def load_average() -> str:
    try:
        return "load average " + ", ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "load average unknown"


def write_section(section: str, body: str) -> None:
    """Replace `section` (its heading line up to the next `## ` heading) in RESULTS.md, or
    append it; the other sections stay as they are."""
    text = RESULTS.read_text() if RESULTS.exists() else HEADER
    block = section + "\n\n" + body.strip("\n") + "\n"
    pattern = re.compile(re.escape(section) + r"\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: block + "\n", text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + block
    RESULTS.write_text(text.rstrip("\n") + "\n")
    print(f"wrote {section!r} to {RESULTS}")
