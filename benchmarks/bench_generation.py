"""Generation speed of HF `generate` (the default engine) per batch size, side by side in one process.

    .venv/bin/python benchmarks/bench_generation.py                       # batch 16 vs 64, as in RESULTS.md
    .venv/bin/python benchmarks/bench_generation.py --num-prompts 16 --max-new-tokens 32 --dtypes auto

SmolLM2-135M-Instruct (embedded) with a LoRA adapter on (the opponent's case), the embedded math task's
prompts, the config's sampling (temperature 1, top_k 50). New tokens/s are measured on the same model,
prompts and seeds, one batch size after the other, and divided by the first batch size's. Timings are
wall-clock on this machine only (record its CPU flags: printed). The responses' mean length, finished
share and mean log-prob per token are printed as a check that the output distribution is the same.
(Our own static-KV-cache engine, with row refill and `torch.compile`, measured 0.94-1.06x HF `generate`
here and was deleted; its tables stay in RESULTS.md.)
"""

from __future__ import annotations

import argparse

import report
import torch

from lowrank_spin import models
from lowrank_spin.data.chat import render_prompt
from lowrank_spin.embedded import task
from lowrank_spin.generation import generate_responses
from lowrank_spin.settings import AUTO, DTYPE_NAMES, SamplingSettings


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=models.SMOLLM2)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--max-new-tokens", type=int, nargs="+", default=[96, 256])
    parser.add_argument("--dtypes", nargs="+", default=[AUTO, "float32"], choices=[AUTO, *DTYPE_NAMES])
    parser.add_argument(
        "--load-in-4bit", action="store_true", help="an nf4 base (the main config's), compute in the dtype"
    )
    parser.add_argument("--output", default="benchmarks/results/generation.json")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    path = models.resolve_model_path(args.model)
    tokenizer = models.load_tokenizer(path)
    problems = task.make_splits(args.num_prompts, 0, 0, seed=0)["train"]
    prompts = [render_prompt(tokenizer, p.prompt) for p in problems]
    print(f"machine: {report.machine(torch.get_num_threads())}; {len(prompts)} prompts\n")
    rows = []
    for dtype_setting in args.dtypes:
        dtype, reason = models.choose_dtype(dtype_setting, "cpu")
        print(f"dtype {dtype_setting}: {dtype} ({reason})", flush=True)
        base = models.load_base_model(path, load_in_4bit=args.load_in_4bit, dtype=dtype, compute_dtype=dtype)
        model = models.attach_lora(base)
        with models.opponent(model):
            for max_new_tokens in args.max_new_tokens:
                for batch_size in args.batch_sizes:
                    sampling = SamplingSettings(batch_size=batch_size, max_new_tokens=max_new_tokens, temperature=1.0)
                    generated, stats = generate_responses(model, tokenizer, prompts, sampling, seed=0)
                    rows.append(
                        {
                            "dtype": dtype + (" nf4" if args.load_in_4bit else ""),
                            "max_new_tokens": max_new_tokens,
                            "batch_size": batch_size,
                            "tokens_per_s": stats["tokens_per_second"],
                            "seconds": stats["seconds"],
                            "mean_tokens": sum(g.num_tokens for g in generated) / len(generated),
                            "finished": sum(g.finished for g in generated) / len(generated),
                            "logp_per_token": sum(g.logp for g in generated) / sum(len(g.token_ids) for g in generated),
                        }
                    )
                    print("  " + _markdown(rows[-1], rows), flush=True)
        del model
    table = [
        f"| dtype | new tokens | batch | new tokens/s | vs batch {args.batch_sizes[0]} | seconds | mean length | finished | logp/token |",
        "|---|---|---|---|---|---|---|---|---|",
        *(_markdown(row, rows) for row in rows),
    ]
    results = {"machine": report.machine(torch.get_num_threads()), "cpu_flags": report.cpu_flags(), "args": vars(args)}
    report.write_results(results | {"rows": rows}, "\n".join(["", *table]), args.output)


def _markdown(row, rows) -> str:
    """The row's table line; its speed relative to the first batch size's at the same dtype and length."""
    first = next(r for r in rows if r["dtype"] == row["dtype"] and r["max_new_tokens"] == row["max_new_tokens"])
    return (
        f"| {row['dtype']} | {row['max_new_tokens']} | {row['batch_size']} | {row['tokens_per_s']:.1f} | "
        f"{row['tokens_per_s'] / first['tokens_per_s']:.2f}x | {row['seconds']:.1f} | {row['mean_tokens']:.1f} | "
        f"{row['finished']:.2f} | {row['logp_per_token']:.3f} |"
    )


if __name__ == "__main__":
    main()
