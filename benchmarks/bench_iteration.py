"""Side-by-side speed measurements of the pieces of one SPIN iteration, in one process.

    .venv/bin/python benchmarks/bench_iteration.py --num-prompts 32

1. generation: batched, length-sorted, KV-cached (batch 16) vs one prompt at a time: new tokens/s
2. opponent log-probs precomputed once per iteration vs recomputed on the fly in every training step:
   seconds per training epoch (and the one-off scoring cost of the precomputed path)
3. the training step with logits for response positions only (`batching.response_logits`, what the
   package does) vs logits for every position (the plain `model(...).logits`): seconds per epoch

Both sides of each comparison run on the same model, prompts and settings, back to back, and the
ratio is printed. Timings are wall-clock on whatever machine runs this (recorded). The base runs in `--dtype`
(`report.resolve_dtype`; with `--load-in-4bit` it is the compute dtype).
"""

from __future__ import annotations

import dataclasses
import json
import time

import report
import torch

from lowrank_spin import models
from lowrank_spin.batching import Collator, response_logits, sequence_logps
from lowrank_spin.data.chat import render_prompt, response_ids
from lowrank_spin.embedded import task
from lowrank_spin.generation import generate_responses
from lowrank_spin.losses import spin_loss
from lowrank_spin.settings import SamplingSettings


def main() -> None:
    parser = report.parser(__doc__, output=None, threads=False)
    parser.add_argument("--model", default=models.SMOLLM2)
    parser.add_argument("--load-in-4bit", action="store_true", help="an nf4 base, computing in --dtype")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--generation-batch-size", type=int, default=16)
    args = parser.parse_args()
    torch.manual_seed(0)

    path = models.resolve_model_path(args.model)
    tokenizer = models.load_tokenizer(path)
    dtype, reason = report.resolve_dtype(args.dtype)
    base = models.load_base_model(path, load_in_4bit=args.load_in_4bit, dtype=dtype, compute_dtype=dtype)
    model = models.attach_lora(base)
    problems = task.make_splits(args.num_prompts, 0, 0, seed=0)["train"]
    prompts = [render_prompt(tokenizer, p.prompt) for p in problems]
    results = {
        "machine": report.machine(torch.get_num_threads()),
        "args": vars(args),
        "dtype": dtype,
        "dtype_reason": reason,
    }

    # 1. generation
    sampling = SamplingSettings(
        batch_size=args.generation_batch_size, max_new_tokens=args.max_new_tokens, temperature=1.0
    )
    generated, batched = generate_responses(model, tokenizer, prompts, sampling, seed=0)
    _, single = generate_responses(model, tokenizer, prompts, dataclasses.replace(sampling, batch_size=1), seed=0)
    results["generation"] = {
        "batched_tokens_per_s": batched["tokens_per_second"],
        "one_at_a_time_tokens_per_s": single["tokens_per_second"],
        "speedup": batched["tokens_per_second"] / single["tokens_per_second"],
    }
    print(json.dumps(results["generation"]), flush=True)

    # 2. precomputed vs on-the-fly opponent log-probs
    examples = [
        {
            "prompt_ids": prompt,
            "real_ids": response_ids(tokenizer, problem.response, True),
            "generated_ids": response_ids(tokenizer, g.text, g.finished),
        }
        for prompt, problem, g in zip(prompts, problems, generated)
    ]
    collate = Collator(tokenizer.pad_token_id, ("real", "generated"))
    batches = [collate(examples[i : i + args.batch_size]) for i in range(0, len(examples), args.batch_size)]
    models.snapshot_opponent(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    start = time.perf_counter()
    precomputed = [_opponent_logps(model, b) for b in batches]
    scoring = time.perf_counter() - start
    start = time.perf_counter()
    for batch, opponent in zip(batches, precomputed):
        _train_step(model, optimizer, batch, opponent)
    epoch_precomputed = time.perf_counter() - start
    start = time.perf_counter()
    for batch in batches:
        _train_step(model, optimizer, batch, _opponent_logps(model, batch))
    epoch_on_the_fly = time.perf_counter() - start
    results["opponent_logps"] = {
        "scoring_once_s": scoring,
        "epoch_precomputed_s": epoch_precomputed,
        "epoch_on_the_fly_s": epoch_on_the_fly,
        "epoch_ratio_on_the_fly_over_precomputed": epoch_on_the_fly / epoch_precomputed,
    }
    print(json.dumps(results["opponent_logps"]), flush=True)

    # 3. response-only vs full logits in the training step
    start = time.perf_counter()
    for batch, opponent in zip(batches, precomputed):
        _train_step(model, optimizer, batch, opponent, full_logits=True)
    epoch_full = time.perf_counter() - start
    start = time.perf_counter()
    for batch, opponent in zip(batches, precomputed):
        _train_step(model, optimizer, batch, opponent)
    epoch_response = time.perf_counter() - start
    results["logits"] = {
        "epoch_full_logits_s": epoch_full,
        "epoch_response_logits_s": epoch_response,
        "speedup": epoch_full / epoch_response,
    }
    print(json.dumps(results["logits"]), flush=True)
    write_report(results, args.output)


def write_report(results: dict, output: str | None) -> None:
    gen, opp, logits = results["generation"], results["opponent_logps"], results["logits"]
    rows = [
        ["generation: batched, length-sorted, KV cache vs one prompt at a time"]
        + [f"{gen['batched_tokens_per_s']:.1f} new tok/s", f"{gen['one_at_a_time_tokens_per_s']:.1f} new tok/s"]
        + [f"**{gen['speedup']:.1f}x**"],
        ["training epoch, opponent log-probs precomputed vs recomputed every step"]
        + [f"{opp['epoch_precomputed_s']:.1f} s (+{opp['scoring_once_s']:.1f} s scoring once)"]
        + [f"{opp['epoch_on_the_fly_s']:.1f} s", f"{opp['epoch_ratio_on_the_fly_over_precomputed']:.2f}x"],
        ["training epoch, response logits vs logits for every position"]
        + [f"{logits['epoch_response_logits_s']:.1f} s", f"{logits['epoch_full_logits_s']:.1f} s"]
        + [f"{logits['speedup']:.2f}x"],
    ]
    lines = [f"dtype: {results['dtype']} ({results['dtype_reason']})", ""]
    lines += report.table(["comparison", "ours", "alternative", "ratio"], rows)
    report.write_results(results, "\n".join(lines), output)


@torch.no_grad()
def _opponent_logps(model, batch) -> torch.Tensor:
    model.eval()
    with models.opponent(model):
        logits, labels = response_logits(model, batch)
    model.train()
    return sequence_logps(logits, labels)


def _train_step(model, optimizer, batch, opponent_logps, full_logits: bool = False) -> None:
    if full_logits:
        logits, labels = (
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
            batch["labels"],
        )
    else:
        logits, labels = response_logits(model, batch)
    real, generated = sequence_logps(logits, labels).chunk(2)
    opponent_real, opponent_generated = opponent_logps.chunk(2)
    losses, _, _ = spin_loss(real, generated, opponent_real, opponent_generated)
    losses.mean().backward()
    optimizer.step()
    optimizer.zero_grad()


if __name__ == "__main__":
    main()
