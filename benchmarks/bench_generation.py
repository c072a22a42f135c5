"""Generation speed per technique, side by side in one process: HF `generate` vs our static engine.

    .venv/bin/python benchmarks/bench_generation.py                       # the table in RESULTS.md
    .venv/bin/python benchmarks/bench_generation.py --num-prompts 16 --max-new-tokens 32 --dtypes auto

SmolLM2-135M-Instruct (embedded) with a LoRA adapter on (the opponent's case), the embedded math task's
prompts, the config's sampling (temperature 1, top_k 50), batch 16. Variants (`data.sampling` settings):

- `hf`: transformers' `generate` per length-sorted batch, left-padded, dynamic KV cache (engine hf)
- `static`: our decode loop over a pre-allocated KV cache, one batch per flush unit (no refill)
- `static+refill`: the same, with 4 batches per flush unit: a finished row takes a waiting prompt
- `static+compile`: `static` with its decode step `torch.compile`d
- `all`: static + refill + compile

New tokens/s are measured on the same model, prompts and seeds, one variant after the other, and
divided by the `hf` row's; compiled variants are warmed up first (compile time printed on its own).
Timings are wall-clock on this machine only (record its CPU flags: printed). Same sampling in all
variants; the responses' mean length, finished share and mean log-prob per token are printed as a
check that the output distribution is the same.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import time

import report
import torch

from lowrank_spin import models
from lowrank_spin.data.chat import render_prompt
from lowrank_spin.embedded import task
from lowrank_spin.generation import generate_responses
from lowrank_spin.settings import AUTO, DTYPE_NAMES, SamplingSettings

VARIANTS = {
    "hf": dict(engine="hf"),
    "static": dict(engine="static"),
    "static+refill": dict(engine="static", refill=True),
    "static+compile": dict(engine="static", compile=True),
    "all": dict(engine="static", refill=True, compile=True),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=models.SMOLLM2)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, nargs="+", default=[96, 256])
    parser.add_argument("--dtypes", nargs="+", default=[AUTO, "float32"], choices=[AUTO, *DTYPE_NAMES])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument(
        "--load-in-4bit", action="store_true", help="an nf4 base (the main config's), compute in the dtype"
    )
    parser.add_argument("--output", default="benchmarks/results/generation.json")
    parser.add_argument("--refill-batches", type=int, default=4, help="batches per flush unit with refill")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    path = models.resolve_model_path(args.model)
    tokenizer = models.load_tokenizer(path)
    problems = task.make_splits(args.num_prompts, 0, 0, seed=0)["train"]
    prompts = [render_prompt(tokenizer, p.prompt) for p in problems]
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"CPU flags: {report.cpu_flags_text()}"
    )
    print(f"torch {torch.__version__}; {len(prompts)} prompts, batch {args.batch_size}\n")
    rows = []
    for dtype_setting in args.dtypes:
        dtype, reason = models.choose_dtype(dtype_setting, "cpu")
        print(f"dtype {dtype_setting}: {dtype} ({reason})", flush=True)
        base = models.load_base_model(path, load_in_4bit=args.load_in_4bit, dtype=dtype, compute_dtype=dtype)
        model = models.attach_lora(base)
        with models.opponent(model):
            for max_new_tokens in args.max_new_tokens:
                base = SamplingSettings(batch_size=args.batch_size, max_new_tokens=max_new_tokens, temperature=1.0)
                for name in args.variants:
                    options = dict(VARIANTS[name])
                    refill = options.pop("refill", False)
                    sampling = dataclasses.replace(
                        base, **options, prompts_per_flush=args.batch_size * args.refill_batches if refill else None
                    )
                    compile_s = _warm_up(model, tokenizer, prompts, sampling) if sampling.compile else 0.0
                    generated, stats = generate_responses(model, tokenizer, prompts, sampling, seed=0)
                    row = {
                        "dtype": dtype + (" nf4" if args.load_in_4bit else ""),
                        "max_new_tokens": max_new_tokens,
                        "variant": name,
                        "engine": stats["engine"],
                        "tokens_per_s": stats["tokens_per_second"],
                        "seconds": stats["seconds"],
                        "compile_s": compile_s,
                        "mean_tokens": sum(g.num_tokens for g in generated) / len(generated),
                        "finished": sum(g.finished for g in generated) / len(generated),
                        "logp_per_token": sum(g.logp for g in generated) / sum(len(g.token_ids) for g in generated),
                    }
                    rows.append(row)
                    print(_line(row, rows), flush=True)
        del model
    table = [
        "| dtype | new tokens | variant | new tokens/s | vs hf | seconds | compile+warm-up s | mean length | finished | logp/token |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *(_markdown(row, rows) for row in rows),
    ]
    results = {"machine": report.machine(torch.get_num_threads()), "cpu_flags": report.cpu_flags(), "args": vars(args)}
    report.write_results(results | {"rows": rows}, "\n".join(["", *table]), args.output)


def _warm_up(model, tokenizer, prompts, sampling) -> float:
    """Compile the decode step on the shapes the measured run uses (same longest prompt, same rows)."""
    longest = sorted(prompts, key=len)[-sampling.batch_size :]
    start = time.perf_counter()
    generate_responses(model, tokenizer, longest, dataclasses.replace(sampling, prompts_per_flush=None), seed=1)
    return time.perf_counter() - start


def _ratio(row, rows) -> float | None:
    hf = next(
        (
            r
            for r in rows
            if r["variant"] == "hf" and r["dtype"] == row["dtype"] and r["max_new_tokens"] == row["max_new_tokens"]
        ),
        None,
    )
    return row["tokens_per_s"] / hf["tokens_per_s"] if hf else None


def _line(row, rows) -> str:
    ratio = _ratio(row, rows)
    return (
        f"  {row['dtype']} {row['max_new_tokens']} {row['variant']:15s} ({row['engine']}): "
        f"{row['tokens_per_s']:.1f} new tokens/s"
        + (f", {ratio:.2f}x hf" if ratio else "")
        + f", {row['seconds']:.1f} s (compile+warm-up {row['compile_s']:.0f} s), mean length "
        f"{row['mean_tokens']:.1f}, finished {row['finished']:.2f}, logp/token {row['logp_per_token']:.3f}"
    )


def _markdown(row, rows) -> str:
    ratio = _ratio(row, rows)
    return (
        f"| {row['dtype']} | {row['max_new_tokens']} | {row['variant']} | {row['tokens_per_s']:.1f} | "
        f"{f'{ratio:.2f}x' if ratio else '-'} | {row['seconds']:.1f} | "
        f"{row['compile_s']:.0f} | {row['mean_tokens']:.1f} | {row['finished']:.2f} | {row['logp_per_token']:.3f} |"
    )


if __name__ == "__main__":
    main()
