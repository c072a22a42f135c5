"""lm-evaluation-harness task definitions: `lowrank_spin_math` over the embedded math task's test split."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

TASK = "lowrank_spin_math"
_HERE = Path(__file__).parent
_PLACEHOLDER = "__TEST_JSONL__"


def task_dir(test_jsonl: str, out_dir: str) -> str:
    """Write `lowrank_spin_math.yaml` reading `test_jsonl` (and its utils.py) into `out_dir`; returns out_dir.

    Pass the result as `--include_path` (CLI) or `TaskManager(include_path=...)`. The data path is made
    absolute, since `datasets` resolves a relative one against the working directory at load time.
    """
    data = Path(test_jsonl).expanduser().resolve()
    if not data.is_file():
        raise FileNotFoundError(f"task_dir: test_jsonl {str(data)!r} is not a file (e.g. runs/x/data/test.jsonl)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = (_HERE / f"{TASK}.yaml").read_text(encoding="utf-8")
    # json.dumps gives a double-quoted scalar that YAML reads back verbatim, whatever the path holds.
    (out / f"{TASK}.yaml").write_text(text.replace(_PLACEHOLDER, json.dumps(str(data))), encoding="utf-8")
    shutil.copyfile(_HERE / "utils.py", out / "utils.py")
    return str(out_dir)
