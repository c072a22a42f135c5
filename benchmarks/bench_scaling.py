"""Iteration time vs number of prompts, and RSS across iterations, with the real `lowrank-spin fit` CLI.

    .venv/bin/python benchmarks/bench_scaling.py --num-prompts 64 128 256 512 --max-new-tokens 32 --output benchmarks/results/scaling.json
    .venv/bin/python benchmarks/bench_scaling.py --num-prompts 64 --iterations 3 --output benchmarks/results/scaling_iterations.json

`configs/smollm2_spin_bf16.yaml` (SmolLM2-135M-Instruct, LoRA r=16 all-linear, batch 8, generation
batch 16) with its base in `--dtype` (`report.resolve_dtype`, recorded in the output; `--dtype bfloat16` is the
config's own) and evaluation off (`--data.num_val 0`), `--iterations` SPIN iterations of one
epoch each, one fresh `lowrank-spin fit` process per N, run one after another. Per N: wall seconds,
seconds per prompt, the generation / opponent-scoring / training phases (metrics CSV plus the read-only
timing callback, `report.run_fit`) and the child's peak RSS (os.wait4).

With `--iterations` > 1 the same runs also show whether memory stays flat across iterations: the child's
RSS at each iteration boundary (read in-process after scoring and after training), its peak so far, and
the maximum of the parent's 0.5 s samples of the child's VmRSS within each iteration.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import report


def main() -> None:
    parser = report.parser(__doc__, output="benchmarks/results/scaling.json")
    parser.add_argument("--num-prompts", nargs="+", type=int, default=[64, 128, 256, 512])
    parser.add_argument("--iterations", type=int, default=1)
    parser.add_argument(
        "--max-new-tokens", type=int, default=96, help="the config's 96; 32 keeps 512 prompts affordable"
    )
    parser.add_argument(
        "--model", default=None, help="model.model_name_or_path (default: the config's SmolLM2-135M-Instruct)"
    )
    parser.add_argument("--sample-every", type=float, default=0.5, help="seconds between the parent's RSS samples")
    parser.add_argument("--workdir", default=None, help="run folders (default: a temporary folder)")
    args = parser.parse_args()

    dtype, reason = report.resolve_dtype(args.dtype)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_scaling."))
    results = {
        "machine": report.machine(args.threads),
        "settings": vars(args),
        "dtype": dtype,
        "dtype_reason": reason,
        "runs": [],
    }
    for n in args.num_prompts:
        print(f"{n} prompts, {args.iterations} iteration(s) ...", flush=True)
        overrides = [
            *("--model.num_iterations", str(args.iterations)),
            *("--data.num_train", str(n)),
            *("--data.sampling.max_new_tokens", str(args.max_new_tokens)),
            *("--model.dtype", dtype),
        ] + (["--model.model_name_or_path", args.model] if args.model else [])
        run = report.run_fit(workdir / f"n{n}", overrides, threads=args.threads, sample_every=args.sample_every)
        p = report.phases(run)
        windows = _iteration_windows(run)
        for it, (lo, hi) in zip(p["iterations"], windows):
            in_window = [rss for t, rss in run["rss_samples"] if lo <= t <= hi]
            it["sampled_max_rss_gb"] = max(in_window) if in_window else None
        row = {
            "num_prompts": n,
            "wall_s": run["wall_s"],
            "work_s": p["fit_s"],  # after start-up and model load
            "work_s_per_prompt_iteration": p["fit_s"] / (n * args.iterations),
            "startup_s": p["startup_s"],
            "model_load_s": p["model_load_s"],
            "generation_s": sum(i["generation_s"] for i in p["iterations"]),
            "scoring_s": sum(i["scoring_s"] for i in p["iterations"]),
            "train_s": sum(i["train_s"] for i in p["iterations"]),
            "peak_rss_gb": run["peak_rss_gb"],
            "rss_after_load_gb": p["rss_after_load_gb"],
            "iterations": p["iterations"],
            "command": run["command"],
        }
        results["runs"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("iterations", "command")}), flush=True)
    write_report(results, args.output)


def _iteration_windows(run: dict) -> list[tuple[float, float]]:
    """Wall-clock spans of each iteration: from the previous train epoch's end (or the fit start) to its own."""
    events = run["events"]
    ends = [e["wall"] for e in events if e["event"] == "train_epoch_end"]
    starts = [next(e["wall"] for e in events if e["event"] == "fit_start")] + ends[:-1]
    return list(zip(starts, ends))


def write_report(results: dict, output: str) -> None:
    iterations = results["settings"]["iterations"]
    per_prompt = "s per prompt" + (" per iteration" if iterations > 1 else "")
    header = ["prompts", "wall s", "after load s", per_prompt, "generation s", "scoring s", "train s", "peak RSS GB"]
    rows = [
        [r["num_prompts"], f"{r['wall_s']:.0f}", f"{r['work_s']:.0f}", f"{r['work_s_per_prompt_iteration']:.2f}"]
        + [f"{r['generation_s']:.0f}", f"{r['scoring_s']:.0f}", f"{r['train_s']:.0f}", f"{r['peak_rss_gb']:.2f}"]
        for r in results["runs"]
    ]
    lines = [f"base dtype: {results['dtype']} ({results['dtype_reason']})", "", *report.table(header, rows)]
    if iterations > 1:
        header = ["prompts", "iteration", "RSS after scoring GB", "RSS after training GB", "peak so far GB"]
        header += ["max sampled RSS GB", "generation s", "train s"]
        rows = [
            [
                r["num_prompts"],
                it["iteration"],
                f"{it['rss_after_scoring_gb']:.2f}",
                f"{it['rss_after_training_gb']:.2f}",
            ]
            + [f"{it['peak_rss_so_far_gb']:.2f}", _gb(it["sampled_max_rss_gb"])]
            + [f"{it['generation_s']:.0f}", f"{it['train_s']:.0f}"]
            for r in results["runs"]
            for it in r["iterations"]
        ]
        lines += ["", *report.table(header, rows)]
    report.write_results(results, "\n".join(lines), output)


def _gb(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


if __name__ == "__main__":
    main()
