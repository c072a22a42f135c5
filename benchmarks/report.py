"""What every benchmark script ends with: the machine it ran on, and its results as JSON plus a markdown table."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path


def machine(threads: int) -> str:
    import torch

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {threads} threads"


CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")  # what decides the dtype and kernels


def cpu_flags() -> list[str]:
    """Which of CPU_FLAGS this machine's CPU has (from /proc/cpuinfo; empty where it cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))
    return [f for f in CPU_FLAGS if f in flags]


def cpu_flags_text() -> str:
    """`cpu_flags()` for a table or a log line."""
    return " ".join(cpu_flags()) or "none of " + "/".join(CPU_FLAGS)


def write_results(results: dict, markdown: str, output: str | Path) -> None:
    """Print the table and write everything (the table included) to `output`."""
    results["markdown"] = markdown
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=1))
    print(markdown)
    print(f"written to {output}")
