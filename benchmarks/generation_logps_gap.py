"""How far the opponent's log-probs taken from generation are from a scoring forward, on the real model.

    .venv/bin/python benchmarks/generation_logps_gap.py --num-prompts 32 --output benchmarks/results/generation_logps_gap.json

With `model.opponent_logps_from_generation` (the default) SPIN takes log p_opponent(y' | x) of each
generated response from the generation pass (`generation.Sampler`) instead of scoring it again. Both
are the same weights in eval mode; they differ by float rounding, because generation runs a KV cache
over left-padded batches of 16 and scoring one forward over the shared-prompt layout in batches of 8.
In float32 the tests find them equal to 1e-4; the gap is largest in bf16. This script measures it on
the nf4 base with `--dtype` compute that configs/smollm2_spin.yaml uses (`--base plain`: `--dtype`
weights, no quantisation), for the base (iteration 0: adapters off) and for an opponent adapter with
random non-zero weights (later iterations). `--dtype auto` (the default, `report.resolve_dtype`) is what the
configs choose; `--dtype bfloat16` measures the bf16 gap on any CPU (slowly where bf16 is emulated). As the noise floor, the same responses are also
scored in the other batch layout (one row per response): bf16 scoring does not agree with itself
across batch shapes either.
"""

from __future__ import annotations

import json

import report
import torch

from lowrank_spin import models
from lowrank_spin.batching import Collator, SharedPromptCollator, response_logps
from lowrank_spin.data.chat import render_prompt
from lowrank_spin.embedded import task
from lowrank_spin.generation import generate_responses
from lowrank_spin.settings import AUTO, SamplingSettings

OPPONENTS = {"base (adapters off)": True, "opponent adapter": False}  # name: adapters disabled


def main() -> None:
    parser = report.parser(__doc__, output=None, threads=False)
    parser.add_argument("--model", default=models.SMOLLM2)
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=8, help="scoring batch")
    parser.add_argument("--beta", type=float, default=0.1, help="to express the gap as a SPIN reward")
    parser.add_argument(
        "--base",
        choices=["nf4", "plain", "bf16"],
        default="nf4",
        help="nf4 with --dtype compute (the configs), or plain --dtype weights; bf16: the old name of `plain --dtype bfloat16`",
    )
    args = parser.parse_args()
    if args.base == "bf16":
        if args.dtype not in (AUTO, "bfloat16"):
            parser.error(f"--base bf16 is --base plain --dtype bfloat16, not --dtype {args.dtype}")
        args.base, args.dtype = "plain", "bfloat16"
    dtype, reason = report.resolve_dtype(args.dtype)

    path = models.resolve_model_path(args.model)
    tokenizer = models.load_tokenizer(path)
    nf4 = args.base == "nf4"
    model = models.attach_lora(models.load_base_model(path, load_in_4bit=nf4, dtype=dtype, compute_dtype=dtype))
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(0)
        for name, param in model.named_parameters():
            if f".{models.OPPONENT}." in name:  # an opponent that is not the base: Δθt != 0
                param.normal_(0, 0.02)
    problems = task.make_splits(args.num_prompts, 0, 0, seed=0)["train"]
    prompts = [render_prompt(tokenizer, p.prompt) for p in problems]
    results = {
        "machine": report.machine(torch.get_num_threads()),
        "args": vars(args),
        "dtype": dtype,
        "dtype_reason": reason,
    }
    sampling = SamplingSettings(batch_size=16, max_new_tokens=args.max_new_tokens, temperature=1.0, top_k=50)
    for opponent, adapters_disabled in OPPONENTS.items():
        model.eval()
        with models.opponent(model, adapters_disabled=adapters_disabled):
            generated, _ = generate_responses(model, tokenizer, prompts, sampling, seed=0)
            examples = [{"prompt_ids": p, "generated_ids": g.token_ids} for p, g in zip(prompts, generated)]
            scored = _score(
                model, examples, SharedPromptCollator(tokenizer.pad_token_id, ("generated",)), args.batch_size
            )
            # the noise floor: the same scoring with one row per response, i.e. other batch shapes
            rescored = _score(model, examples, Collator(tokenizer.pad_token_id, ("generated",)), args.batch_size)
        tokens = torch.tensor([len(g.token_ids) for g in generated], dtype=torch.float64)
        row = {"mean_logp": sum(scored) / len(scored), "mean_tokens": tokens.mean().item()}
        for name, gaps in (
            ("generation_vs_scoring", [g.logp - s for g, s in zip(generated, scored)]),
            ("scoring_rows_vs_shared", [r - s for r, s in zip(rescored, scored)]),
        ):
            gaps = torch.tensor(gaps, dtype=torch.float64)
            row[name] = {
                "mean_abs": gaps.abs().mean().item(),
                "max_abs": gaps.abs().max().item(),
                "mean": gaps.mean().item(),
                "mean_abs_per_token": (gaps.abs() / tokens).mean().item(),
                "mean_abs_as_reward": args.beta * gaps.abs().mean().item(),
            }
        results[opponent] = row
        print(opponent, json.dumps(row), flush=True)
    write_report(results, args.output)


def write_report(results: dict, output: str | None) -> None:
    header = ["opponent", "mean log p(y')", "generation − scoring: mean abs (max), nats", "mean signed"]
    header += ["per token", "rows vs shared scoring: mean abs"]
    rows = []
    for opponent in OPPONENTS:
        r = results[opponent]
        gap, floor = r["generation_vs_scoring"], r["scoring_rows_vs_shared"]
        rows.append(
            [opponent, f"{r['mean_logp']:.1f}", f"{gap['mean_abs']:.2f} ({gap['max_abs']:.2f})", f"{gap['mean']:+.2f}"]
            + [f"{gap['mean_abs_per_token']:.4f}", f"{floor['mean_abs']:.4f}"]
        )
    base = "nf4 + " if results["args"]["base"] == "nf4" else ""
    lines = [f"base: {base}{results['dtype']} ({results['dtype_reason']})", "", *report.table(header, rows)]
    report.write_results(results, "\n".join(lines), output)


@torch.no_grad()
def _score(model, examples: list[dict], collate, batch_size: int) -> list[float]:
    scored = []
    for start in range(0, len(examples), batch_size):
        scored += response_logps(model, collate(examples[start : start + batch_size])).tolist()
    return scored


if __name__ == "__main__":
    main()
