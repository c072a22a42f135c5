"""Achieved FLOP/s of our SPIN training step against this machine's measured matmul peak, in one run.

    .venv/bin/python benchmarks/bench_flops.py --output benchmarks/results/flops.json

1. peak: `torch.matmul` of two n x n matrices (n = 2048) in bf16 and in fp32, best of `--peak-repeats`
   timed loops; 2 n^3 FLOPs per matmul.
2. our training step, as `SelfPlayLoRA.training_step` runs it with precomputed opponent log-probs:
   SmolLM2-135M-Instruct with a `--dtype` base (`report.resolve_dtype`) and LoRA r=16 on every linear layer, `--pairs` (real,
   generated) pairs of math prompts, `batching.response_logps` -> `losses.spin_loss`, backward, AdamW.
   Both batch layouts, side by side on the same pairs: `rows` (one row per response,
   `batching.Collator`) and `shared` (the prompt once per pair, `batching.SharedPromptCollator`, the default). The "generated"
   response of pair i is the gold response of problem i+1 (no generation needed; lengths are alike).
   Each step's FLOPs are counted once with `torch.utils.flop_counter.FlopCounterMode` on the eager
   attention path (the CPU SDPA kernel is not in its registry; eager attention does the same matmuls),
   then the step is timed with SDPA: median of `--steps` after `--warmup`. The counter counts
   matmuls/attention only. The fraction of the peak is reported for the dtype the step ran in.
"""

from __future__ import annotations

import json
import statistics
import time

import report
import torch
from torch.utils.flop_counter import FlopCounterMode

from lowrank_spin import models
from lowrank_spin.batching import Collator, SharedPromptCollator, response_logps
from lowrank_spin.data.chat import render_prompt, response_ids
from lowrank_spin.embedded import task
from lowrank_spin.losses import spin_loss
from lowrank_spin.settings import DTYPE_NAMES

LAYOUTS = {"rows": Collator, "shared": SharedPromptCollator}
PEAK_NAMES = {"bfloat16": "bf16", "float32": "fp32", "float16": "fp16"}  # results["peak"] keys


def main() -> None:
    parser = report.parser(__doc__, output="benchmarks/results/flops.json")
    parser.add_argument("--model", default=models.SMOLLM2)
    parser.add_argument("--matmul-size", type=int, default=2048)
    parser.add_argument("--peak-repeats", type=int, default=5)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    dtype, reason = report.resolve_dtype(args.dtype)
    results = {"machine": report.machine(args.threads), "settings": vars(args), "dtype": dtype, "dtype_reason": reason}
    peak_dtypes = {"bfloat16", "float32", dtype}
    results["peak"] = {
        PEAK_NAMES[name]: matmul_peak(args.matmul_size, models.DTYPES[name], args.peak_repeats)
        for name in DTYPE_NAMES
        if name in peak_dtypes
    }
    print(json.dumps(results["peak"]), flush=True)

    path = models.resolve_model_path(args.model)
    tokenizer = models.load_tokenizer(path)
    model = models.attach_lora(models.load_base_model(path, dtype=dtype))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-5)
    examples = spin_examples(tokenizer, args.pairs)
    results["training_step"] = {}
    for layout, collate in LAYOUTS.items():
        batch = collate(tokenizer.pad_token_id, ("real", "generated"))(examples)
        results["training_step"][layout] = measure_step(
            model, optimizer, batch, args, results["peak"], PEAK_NAMES[dtype]
        )
        print(json.dumps({layout: results["training_step"][layout]}), flush=True)
    rows, shared = results["training_step"]["rows"], results["training_step"]["shared"]
    results["rows_over_shared"] = {
        "step_s": rows["median_step_s"] / shared["median_step_s"],
        "flops": rows["flops"] / shared["flops"],
    }
    write_report(results, args.output)


def measure_step(model, optimizer, batch: dict, args, peak: dict, peak_name: str) -> dict:
    with torch.no_grad():  # opponent log-probs, precomputed once per iteration in the package
        model.eval()
        with models.opponent(model, adapters_disabled=True):
            opponent = response_logps(model, batch)
        model.train()

    model.base_model.model.set_attn_implementation("eager")
    counter = FlopCounterMode(display=False)
    with counter:
        train_step(model, optimizer, batch, opponent, step=False)
    flops = counter.get_total_flops()
    model.base_model.model.set_attn_implementation("sdpa")

    for _ in range(args.warmup):
        train_step(model, optimizer, batch, opponent)
    seconds = []
    for _ in range(args.steps):
        start = time.perf_counter()
        train_step(model, optimizer, batch, opponent)
        seconds.append(time.perf_counter() - start)
    step_s = statistics.median(seconds)
    return {
        "rows": int(batch["input_ids"].shape[0]),
        "padded_length": int(batch["input_ids"].shape[1]),
        "scored_tokens": int(batch["response_lengths"].sum()),
        "flops": flops,
        "flops_by_op": {str(op): n for op, n in counter.get_flop_counts()["Global"].items()},
        "step_seconds": seconds,
        "median_step_s": step_s,
        "achieved_tflops": flops / step_s / 1e12,
        "fraction_of_bf16_peak": flops / step_s / (peak["bf16"]["tflops"] * 1e12),
        "fraction_of_fp32_peak": flops / step_s / (peak["fp32"]["tflops"] * 1e12),
        "fraction_of_dtype_peak": flops / step_s / (peak[peak_name]["tflops"] * 1e12),  # the dtype the step ran in
    }


def matmul_peak(n: int, dtype: torch.dtype, repeats: int, inner: int = 5) -> dict:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.matmul(a, b)  # warm-up: kernel selection, page faults
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            torch.matmul(a, b)
        best = min(best, (time.perf_counter() - start) / inner)
    return {"n": n, "best_matmul_s": best, "tflops": 2 * n**3 / best / 1e12}


def spin_examples(tokenizer, pairs: int) -> list[dict]:
    problems = task.make_splits(pairs + 1, 0, 0, seed=0)["train"]
    examples = [
        {
            "prompt_ids": render_prompt(tokenizer, p.prompt),
            "real_ids": response_ids(tokenizer, p.response, True),
            "generated_ids": response_ids(tokenizer, other.response, True),  # a stand-in generated response
        }
        for p, other in zip(problems, problems[1:])
    ]
    return examples


def train_step(model, optimizer, batch, opponent, step: bool = True) -> None:
    """`SelfPlayLoRA._compute_loss` for spin with precomputed opponent log-probs, then backward and AdamW."""
    real, generated = response_logps(model, batch).chunk(2)  # layout: [real; generated]
    opponent_real, opponent_generated = opponent.chunk(2)
    losses, _, _ = spin_loss(real, generated, opponent_real, opponent_generated)
    losses.mean().backward()
    if step:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def write_report(results: dict, output: str) -> None:
    peak, steps = results["peak"], results["training_step"]
    dtype = PEAK_NAMES[results["dtype"]]
    other = "fp32" if dtype == "bf16" else "bf16"
    ratio = results["rows_over_shared"]
    row = lambda label, fmt: [label, *(fmt(steps[k]) for k in LAYOUTS)]
    rows = [
        [
            f"bf16 / fp32 matmul peak ({peak['bf16']['n']}^2)",
            f"{peak['bf16']['tflops'] * 1e3:.0f} / {peak['fp32']['tflops'] * 1e3:.0f} GFLOP/s",
            "",
        ],
        row("batch", lambda s: f"{s['rows']} rows x {s['padded_length']} tokens"),
        row("FLOPs per step", lambda s: f"{s['flops'] / 1e12:.2f} TFLOP"),
        row("median step", lambda s: f"{s['median_step_s']:.2f} s"),
        row("achieved", lambda s: f"{s['achieved_tflops'] * 1e3:.0f} GFLOP/s"),
        row(
            f"**fraction of the {dtype} peak**",
            lambda s: f"**{s['fraction_of_dtype_peak']:.1%}** ({other} peak: {s[f'fraction_of_{other}_peak']:.1%})",
        ),
        ["step time rows / shared", f"**{ratio['step_s']:.2f}x** (FLOPs {ratio['flops']:.2f}x)", ""],
    ]
    header = ["measurement", "rows (one per response)", "shared (prompt once per pair)"]
    lines = [f"base dtype: {results['dtype']} ({results['dtype_reason']})", "", *report.table(header, rows)]
    report.write_results(results, "\n".join(lines), output)


if __name__ == "__main__":
    main()
