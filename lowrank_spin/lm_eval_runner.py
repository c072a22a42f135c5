"""Evaluate a saved adapter (`runs/x/iter_<t>`) with EleutherAI's lm-evaluation-harness.

    lowrank-spin lm-eval --base smollm2-135m-instruct --adapter runs/x/iter_1 \
        --test-jsonl runs/x/data/test.jsonl [--limit N]                       # the embedded math task
    lowrank-spin lm-eval --base alignment-handbook/zephyr-7b-sft-full --adapter runs/z/iter_2 \
        --tasks arc_challenge --num-fewshot 25 --no-chat-template      # one of the papers' tasks

The base loads through lm_eval's `hf` model with `peft=<adapter>` on `--device` in `--dtype` (both
`auto` by default: the GPU if there is one, and the dtype `fit` would choose there). `--tasks` takes
any lm-evaluation-harness task names (their data come from the Hugging Face hub, so they need it or
its cache) and `lowrank_spin_math`, the embedded task read from `--test-jsonl`, prompted through the
chat template and scored with the package's own checker; `--include-path DIR` adds your own task
YAMLs. lm_eval is an optional dependency: `pip install lm_eval`.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile

import torch

from lowrank_spin import models
from lowrank_spin.lm_eval_tasks import TASK, task_dir
from lowrank_spin.settings import AUTO, DTYPE_NAMES


def evaluate_adapter(
    base_model: str,
    adapter_dir: str | None,
    test_jsonl: str | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    tasks: list[str] | None = None,
    include_path: str | None = None,
    device: str = AUTO,
    dtype: str = AUTO,
    num_fewshot: int | None = None,
    chat_template: bool = True,
) -> dict:
    """Per task, `{"exact_match" or the task's metrics, "stderr", "num_examples"}`; no adapter = the
    bare base. `tasks` defaults to the embedded `lowrank_spin_math` (which reads `test_jsonl`).
    With only the embedded task the result is that task's dict itself (the older shape).

    `base_model` is a local folder, a hub id, or an embedded name (`smollm2-135m-instruct`).
    """
    tasks = tasks or [TASK]
    if TASK in tasks and test_jsonl is None:
        raise ValueError(f"--test-jsonl: the {TASK} task reads the run's test split, e.g. runs/x/data/test.jsonl")
    lm_eval = _import_lm_eval()
    from lm_eval.tasks import TaskManager

    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == AUTO else device
    dtype, _ = models.choose_dtype(dtype, device.split(":")[0])
    model_args = {"pretrained": models.resolve_model_path(base_model), "dtype": dtype}
    if adapter_dir is not None:
        model_args["peft"] = str(adapter_dir)
    with tempfile.TemporaryDirectory(prefix="lowrank_spin_lm_eval.") as tmp:
        includes = [task_dir(test_jsonl, tmp)] if TASK in tasks else []
        includes += [include_path] if include_path else []
        # lm_eval's own thousands of task YAMLs are indexed only when a task of theirs is asked for
        ours_only = all(t == TASK for t in tasks) or (include_path is not None and _all_local(tasks, include_path))
        task_manager = TaskManager(include_path=includes or None, include_defaults=not ours_only)
        results = lm_eval.simple_evaluate(
            model="hf",
            model_args=model_args,
            tasks=list(tasks),
            task_manager=task_manager,
            device=device,
            batch_size=batch_size,
            limit=limit,
            num_fewshot=num_fewshot,
            apply_chat_template=chat_template,
            log_samples=False,
        )
    scores = {name: _task_scores(results, name) for name in results["results"] if name in tasks}
    return scores[TASK] if tasks == [TASK] else scores


def _task_scores(results: dict, name: str) -> dict:
    """One task's metrics (`metric,filter` keys flattened to `metric`), stderr and example count."""
    known = set(results["higher_is_better"][name])  # the task's metrics (lm_eval adds other numbers too)
    metrics = {}
    for key, value in results["results"][name].items():  # e.g. "exact_match,none", "acc_stderr,none", "alias"
        metric = key.split(",")[0]
        # (a stderr lm_eval cannot estimate is the string "N/A")
        if metric.removesuffix("_stderr") in known and isinstance(value, (int, float)):
            metrics[metric] = float(value)
    if "exact_match" in metrics:  # the embedded task's shape: one stderr
        metrics["stderr"] = metrics.pop("exact_match_stderr", math.nan)
    metrics["num_examples"] = int(results["n-samples"][name]["effective"])
    return metrics


def _all_local(tasks: list[str], include_path: str) -> bool:
    """Whether every task other than the embedded one is defined in `include_path` (lm_eval's own index
    of that folder alone, without its thousands of built-in task YAMLs)."""
    from lm_eval.tasks import TaskManager

    local = set(TaskManager(include_path=include_path, include_defaults=False).all_tasks)
    return all(t == TASK or t in local for t in tasks)


def main(argv: list[str]) -> None:
    """`lowrank-spin lm-eval`: evaluate one adapter (or the bare base) and print the result as JSON."""
    parser = argparse.ArgumentParser(
        prog="lowrank-spin lm-eval",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.split("\n\n")[1:3]),
    )
    parser.add_argument("--base", required=True, help="base model: local folder, hub id or embedded name")
    parser.add_argument("--adapter", default=None, help="adapter folder, e.g. runs/x/iter_1 (omit for the bare base)")
    parser.add_argument("--tasks", nargs="+", default=[TASK], help=f"lm-evaluation-harness tasks (default: {TASK})")
    parser.add_argument("--test-jsonl", default=None, help=f"the run's test split, for {TASK}: runs/x/data/test.jsonl")
    parser.add_argument("--include-path", default=None, help="a folder of your own lm-eval task YAMLs")
    parser.add_argument("--device", default=AUTO, help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default=AUTO, choices=[AUTO, *DTYPE_NAMES], help="auto: what fit would choose")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N examples of each task")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: each task's)")
    parser.add_argument(
        "--chat-template",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=f"prompt through the model's chat template (as {TASK} and IFEval want; the leaderboard's other tasks do not)",
    )
    args = parser.parse_args(argv)
    result = evaluate_adapter(
        args.base,
        args.adapter,
        args.test_jsonl,
        limit=args.limit,
        batch_size=args.batch_size,
        tasks=args.tasks,
        include_path=args.include_path,
        device=args.device,
        dtype=args.dtype,
        num_fewshot=args.num_fewshot,
        chat_template=args.chat_template,
    )
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
