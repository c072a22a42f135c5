"""What every benchmark script ends with: the machine it ran on, and its results as JSON plus a markdown table."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path


def machine(threads: int) -> str:
    import torch

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {threads} threads"


def write_results(results: dict, markdown: str, output: str | Path) -> None:
    """Print the table and write everything (the table included) to `output`."""
    results["markdown"] = markdown
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=1))
    print(markdown)
    print(f"written to {output}")
