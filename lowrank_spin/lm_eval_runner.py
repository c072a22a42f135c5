"""Evaluate a saved adapter (`runs/x/iter_<t>`) with EleutherAI's lm-evaluation-harness, offline.

    lowrank-spin lm-eval --base smollm2-135m-instruct --adapter runs/x/iter_1 \
        --test-jsonl runs/x/data/test.jsonl [--limit N]

The base loads through lm_eval's `hf` model with `peft=` (float32, CPU) and answers the local
`lowrank_spin_math` task, prompted through its chat template and scored with the package's own
checker. lm_eval is an optional dependency: `pip install lm_eval`.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile

from lowrank_spin import models
from lowrank_spin.lm_eval_tasks import TASK, task_dir


def evaluate_adapter(
    base_model: str,
    adapter_dir: str | None,
    test_jsonl: str,
    limit: int | None = None,
    batch_size: int = 8,
) -> dict:
    """`{"exact_match", "stderr", "num_examples"}` of greedy answers on `test_jsonl`; no adapter = the bare base.

    `base_model` is a local folder, a hub id, or an embedded name (`smollm2-135m-instruct`).
    """
    lm_eval = _import_lm_eval()
    from lm_eval.tasks import TaskManager

    model_args = {"pretrained": models.resolve_model_path(base_model), "dtype": "float32"}
    if adapter_dir is not None:
        model_args["peft"] = str(adapter_dir)
    with tempfile.TemporaryDirectory(prefix="lowrank_spin_lm_eval.") as tmp:
        # include_defaults=False: only our task is indexed, not lm_eval's thousands of YAMLs.
        task_manager = TaskManager(include_path=task_dir(test_jsonl, tmp), include_defaults=False)
        results = lm_eval.simple_evaluate(
            model="hf",
            model_args=model_args,
            tasks=[TASK],
            task_manager=task_manager,
            device="cpu",
            batch_size=batch_size,
            limit=limit,
            apply_chat_template=True,
            log_samples=False,
        )
    metrics = results["results"][TASK]
    stderr = metrics.get("exact_match_stderr,none")
    return {
        "exact_match": float(metrics["exact_match,none"]),
        # lm_eval reports "N/A" when it cannot estimate one (a single example).
        "stderr": float(stderr) if isinstance(stderr, (int, float)) else math.nan,
        "num_examples": int(results["n-samples"][TASK]["effective"]),
    }


def main(argv: list[str]) -> None:
    """`lowrank-spin lm-eval`: evaluate one adapter (or the bare base) and print the result as JSON."""
    parser = argparse.ArgumentParser(prog="lowrank-spin lm-eval", description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="base model: local folder, hub id or embedded name")
    parser.add_argument("--adapter", default=None, help="adapter folder, e.g. runs/x/iter_1 (omit for the bare base)")
    parser.add_argument("--test-jsonl", required=True, help="the run's test split, e.g. runs/x/data/test.jsonl")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N problems")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    result = evaluate_adapter(args.base, args.adapter, args.test_jsonl, limit=args.limit, batch_size=args.batch_size)
    print(json.dumps({"base": args.base, "adapter": args.adapter, **result}))


def _import_lm_eval():
    try:
        import lm_eval
    except ImportError as error:
        raise ImportError(
            "lowrank_spin.lm_eval_runner needs EleutherAI's lm-evaluation-harness, which the package does not "
            "install: pip install lm_eval"
        ) from error
    return lm_eval
