"""Achieved FLOP/s of our SPIN training step against this machine's measured matmul peak, in one run.

    .venv/bin/python benchmarks/bench_flops.py --output benchmarks/results/flops.json

1. peak: `torch.matmul` of two n x n matrices (n = 2048) in bf16 and in fp32, best of `--peak-repeats`
   timed loops; 2 n^3 FLOPs per matmul.
2. our training step, as `SelfPlayLoRA.training_step` runs it with precomputed opponent log-probs:
   SmolLM2-135M-Instruct with a bf16 base and LoRA r=16 on every linear layer, `--pairs` (real, generated)
   pairs of math prompts laid out [real; generated] in one batch, `models.response_logits` ->
   `losses.sequence_logps` -> `losses.spin_loss`, backward, AdamW. The "generated" response of pair i is
   the gold response of problem i+1 (no generation needed; lengths are alike). The step's FLOPs are
   counted once with `torch.utils.flop_counter.FlopCounterMode` on the eager attention path (the CPU
   SDPA kernel is not in its registry; eager attention does the same matmuls), then the step is timed
   with SDPA: median of `--steps` after `--warmup`. The counter counts matmuls/attention only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import report
import torch
from torch.utils.flop_counter import FlopCounterMode

from lowrank_spin import math_task, models
from lowrank_spin.data import Collator, render_prompt, response_ids
from lowrank_spin.losses import sequence_logps, spin_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=models.SMOLLM2)
    parser.add_argument("--matmul-size", type=int, default=2048)
    parser.add_argument("--peak-repeats", type=int, default=5)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--output", default="benchmarks/results/flops.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    results = {"machine": report.machine(args.threads),
               "settings": vars(args)}
    results["peak"] = {name: matmul_peak(args.matmul_size, dtype, args.peak_repeats) for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32))}
    print(json.dumps(results["peak"]), flush=True)

    path = models.resolve_model_path(args.model)
    tokenizer = models.load_tokenizer(path)
    model = models.attach_lora(models.load_base_model(path, dtype="bfloat16"))
    batch = spin_batch(tokenizer, args.pairs)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-5)
    with torch.no_grad():  # opponent log-probs, precomputed once per iteration in the package
        model.eval()
        with models.opponent(model, adapters_disabled=True):
            opponent = sequence_logps(*models.response_logits(model, batch))
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
    scored = int((batch["labels"][:, 1:] != -100).sum())
    results["training_step"] = {
        "sequences": int(batch["input_ids"].shape[0]),
        "padded_length": int(batch["input_ids"].shape[1]),
        "tokens": int(batch["attention_mask"].sum()),
        "scored_tokens": scored,
        "flops": flops,
        "flops_by_op": {str(op): n for op, n in counter.get_flop_counts()["Global"].items()},
        "step_seconds": seconds,
        "median_step_s": step_s,
        "achieved_tflops": flops / step_s / 1e12,
        "fraction_of_bf16_peak": flops / step_s / (results["peak"]["bf16"]["tflops"] * 1e12),
        "fraction_of_fp32_peak": flops / step_s / (results["peak"]["fp32"]["tflops"] * 1e12),
    }
    print(json.dumps(results["training_step"]), flush=True)
    write_report(results, Path(args.output))


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


def spin_batch(tokenizer, pairs: int) -> dict:
    problems = math_task.make_splits(pairs + 1, 0, 0, seed=0)["train"]
    examples = [
        {
            "prompt_ids": render_prompt(tokenizer, p.prompt),
            "real_ids": response_ids(tokenizer, p.response, True),
            "generated_ids": response_ids(tokenizer, other.response, True),  # a stand-in generated response
        }
        for p, other in zip(problems, problems[1:])
    ]
    return Collator(tokenizer.pad_token_id, ("real", "generated"))(examples)


def train_step(model, optimizer, batch, opponent, step: bool = True) -> None:
    """`SelfPlayLoRA._compute_loss` for spin with precomputed opponent log-probs, then backward and AdamW."""
    logits, labels = models.response_logits(model, batch)
    real, generated = sequence_logps(logits, labels).chunk(2)  # layout: [real; generated]
    opponent_real, opponent_generated = opponent.chunk(2)
    losses, _, _ = spin_loss(real, generated, opponent_real, opponent_generated)
    losses.mean().backward()
    if step:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def write_report(results: dict, output: Path) -> None:
    peak, step = results["peak"], results["training_step"]
    markdown = "\n".join([
        "| measurement | value |",
        "|---|---|",
        f"| bf16 matmul peak ({peak['bf16']['n']}^2) | {peak['bf16']['tflops'] * 1e3:.0f} GFLOP/s |",
        f"| fp32 matmul peak ({peak['fp32']['n']}^2) | {peak['fp32']['tflops'] * 1e3:.0f} GFLOP/s |",
        f"| SPIN step: {step['sequences']} sequences x {step['padded_length']} tokens padded ({step['tokens']} real) | {step['flops'] / 1e12:.2f} TFLOP, {step['median_step_s']:.2f} s |",
        f"| achieved | {step['achieved_tflops'] * 1e3:.0f} GFLOP/s |",
        f"| **fraction of the bf16 peak** | **{step['fraction_of_bf16_peak']:.1%}** (of the fp32 peak: {step['fraction_of_fp32_peak']:.1%}) |",
    ])
    report.write_results(results, markdown, output)


if __name__ == "__main__":
    main()
