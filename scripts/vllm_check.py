"""vLLM against the model that trains, on one CUDA GPU (`data.sampling.engine: vllm`).

    python scripts/vllm_check.py --output gpu_check/vllm_check.json   # scripts/gpu_check.sh runs it

On the embedded default as `configs/smollm2_spin.yaml` trains it (SmolLM2-135M-Instruct, nf4 base with
bf16 compute, LoRA r=16 on every linear layer) with a random, nonzero opponent adapter, through the
package's own `VLLMEngine` (vLLM's bitsandbytes nf4 of the same checkpoint, the adapter as a LoRARequest):

1. log-prob agreement: vLLM's log-prob of each token it drew (temperature 1, no top-k or top-p, so its
   raw log-probs) against the training model's score of the same tokens (HF, opponent adapter on, eval
   mode): max and mean absolute difference per token, and per response against the loss's batched
   scoring (`batching.response_logps`). For scale, the same against the bare base (no adapter: far
   larger if vLLM applied the adapter), and HF generate's own recorded log-probs against that scoring
   (the gap `model.opponent_logps_from_generation` accepts with the hf engine).
2. the adapter per iteration: a second adapter, sent under a new LoRARequest after vLLM slept and woke
   again, measured as in 1.
3. sleep mode: free GPU memory with vLLM awake and asleep.
4. greedy answers of HF generate and vLLM on the same prompts: identical responses, common prefix.
5. new tokens/s of each engine through `generate_responses` (temperature 1, top-k 50, batch 64, as the
   default config; vLLM's figure includes waking it and putting it to sleep), and of vLLM's draw alone.

Exits 2 with one line naming what is missing where it cannot run (no CUDA, vLLM not installed).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

GIB = 2**30


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="an embedded model, folder or hub id")
    parser.add_argument("--prompts", type=int, default=64, help="prompts of the embedded task's train split")
    parser.add_argument("--max_new_tokens", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, help="where the JSON report goes (also printed as lines)")
    args = parser.parse_args(argv)
    missing = missing_requirements()
    if missing:
        print(f"vllm_check: cannot run here: {missing}; nothing was measured", file=sys.stderr)
        return 2
    report = run_check(args.model, args.prompts, args.max_new_tokens, args.seed)
    for line in summary_lines(report):
        print(line, flush=True)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def missing_requirements() -> str | None:
    """What this machine lacks for the check, in one line; None when it can run."""
    missing = []
    if not torch.cuda.is_available():
        missing.append("no CUDA device visible to torch (a CPU build of torch, or no GPU)")
    if importlib.util.find_spec("vllm") is None:
        missing.append("vLLM not installed (pip install -e '.[vllm]')")
    return "; ".join(missing) or None


def run_check(model_name: str, num_prompts: int, max_new_tokens: int, seed: int) -> dict:
    from lowrank_spin import generation, models
    from lowrank_spin.data.chat import render_prompt
    from lowrank_spin.embedded import task
    from lowrank_spin.settings import LoRASettings, SamplingSettings

    path = models.resolve_model_path(model_name)
    tokenizer = models.load_tokenizer(path)
    base = models.load_base_model(path, load_in_4bit=True, compute_dtype="bfloat16").cuda()
    model = models.attach_lora(base, LoRASettings(rank=16, alpha=32, target_modules="all-linear"))
    prompts = [render_prompt(tokenizer, p.prompt) for p in task.make_splits(num_prompts, 0, 0, seed=0)["train"]]
    # temperature 1 and every token: vLLM's raw log-probs are then also those of the distribution it drew from
    raw = SamplingSettings(temperature=1.0, top_k=0, max_new_tokens=max_new_tokens, batch_size=64, engine="vllm")
    report: dict = {"model": path, "base": "nf4 (bitsandbytes), compute bfloat16", "prompts": len(prompts)}
    report["gpu"] = torch.cuda.get_device_name(0)
    report["rounds"] = []
    with tempfile.TemporaryDirectory() as folder:
        for round_index in range(2):  # two iterations' opponents, vLLM asleep in between
            _random_opponent(model, seed=round_index + 1)
            with models.opponent(model):
                engine = generation.make_engine(
                    model, tokenizer, raw, adapter_dir=Path(folder) / f"adapter_{round_index}"
                )
                with engine.session():
                    torch.cuda.synchronize()
                    start = time.perf_counter()
                    drawn = engine.draw(prompts, seed)
                    seconds = time.perf_counter() - start
                    free_awake = torch.cuda.mem_get_info()[0]
                free_asleep = torch.cuda.mem_get_info()[0]
                responses = [tokens for tokens, _ in drawn]
                vllm_logps = [logps for _, logps in drawn]
                with_adapter = agreement(vllm_logps, token_logps(model, prompts, responses))
                with_adapter |= response_agreement(vllm_logps, scored_sums(model, tokenizer, prompts, responses))
            with model.disable_adapter():
                without_adapter = agreement(vllm_logps, token_logps(model, prompts, responses))
            new_tokens = sum(len(r) for r in responses)
            report["rounds"].append(
                {
                    "lora_request": {"id": engine.lora_request.lora_int_id, "path": engine.lora_request.lora_path},
                    "vllm_vs_training_model": with_adapter,
                    "vllm_vs_base_without_adapter": without_adapter,
                    "vllm_draw_tokens_per_second": new_tokens / seconds,
                    "new_tokens": new_tokens,
                    "free_gpu_gib_awake": free_awake / GIB,
                    "free_gpu_gib_asleep": free_asleep / GIB,
                }
            )

        with models.opponent(model):
            hf_drawn, _ = generation.generate_responses(
                model, tokenizer, prompts, dataclasses.replace(raw, engine="hf"), seed=seed
            )
            hf_responses = [g.token_ids for g in hf_drawn]
            hf_sums = scored_sums(model, tokenizer, prompts, hf_responses)
            report["hf_generate_recorded_vs_scored"] = response_agreement([[g.logp] for g in hf_drawn], hf_sums)

            greedy = {}
            for name in ("hf", "vllm"):
                settings = dataclasses.replace(raw, engine=name, temperature=0.0)
                greedy[name] = [
                    g.token_ids for g in generation.generate_responses(model, tokenizer, prompts, settings)[0]
                ]
            prefixes = [_common_prefix(a, b) for a, b in zip(greedy["hf"], greedy["vllm"])]
            report["greedy_hf_vs_vllm"] = {
                "identical": sum(a == b for a, b in zip(greedy["hf"], greedy["vllm"])) / len(prompts),
                "mean_common_prefix_tokens": sum(prefixes) / len(prompts),
                "mean_tokens_hf": sum(map(len, greedy["hf"])) / len(prompts),
                "mean_tokens_vllm": sum(map(len, greedy["vllm"])) / len(prompts),
            }

            default = SamplingSettings(max_new_tokens=max_new_tokens, batch_size=64)  # T=1, top-k 50
            throughput = {}
            for name in ("hf", "vllm"):
                settings = dataclasses.replace(default, engine=name)
                generation.generate_responses(model, tokenizer, prompts[:8], settings, seed=seed + 1)  # warm-up
                torch.cuda.synchronize()
                _, stats = generation.generate_responses(model, tokenizer, prompts, settings, seed=seed)
                throughput[name] = stats["tokens_per_second"]
            report["generate_responses_tokens_per_second"] = throughput
    report["peak_gpu_memory_allocated_gib_hf"] = torch.cuda.max_memory_allocated() / GIB
    return report


def _random_opponent(model, seed: int) -> None:
    """A nonzero policy adapter (LoRA B starts at 0: Δθ = 0 would not tell a served adapter from none),
    snapshotted as the opponent, as at an iteration boundary."""
    from lowrank_spin import models

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name and f".{models.POLICY}." in name:
                param.copy_(torch.randn(param.shape, generator=generator).to(param) * 0.02)
    models.snapshot_opponent(model)


@torch.no_grad()
def token_logps(model, prompts: list[list[int]], responses: list[list[int]]) -> list[list[float]]:
    """log p(token | prompt, earlier tokens) of every response token under `model` as it is (eval mode)."""
    model.eval()
    device = next(model.parameters()).device
    result = []
    for prompt, response in zip(prompts, responses):
        if not response:
            result.append([])
            continue
        ids = torch.tensor([prompt + response], device=device)
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
        result.append(logits.log_softmax(-1).gather(-1, ids[0, len(prompt) :, None]).squeeze(-1).tolist())
    return result


@torch.no_grad()
def scored_sums(model, tokenizer, prompts: list[list[int]], responses: list[list[int]]) -> list[float]:
    """The responses' log-probs as the loss gets them: `batching.response_logps` over padded batches."""
    from lowrank_spin import batching

    model.eval()
    device = next(model.parameters()).device
    collate = batching.Collator(tokenizer.pad_token_id, ("generated",))
    sums = []
    for start in range(0, len(prompts), 16):
        examples = [
            {"prompt_ids": p, "generated_ids": r}
            for p, r in zip(prompts[start : start + 16], responses[start : start + 16])
        ]
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in collate(examples).items()}
        sums += batching.response_logps(model, batch).tolist()
    return sums


def agreement(a: list[list[float]], b: list[list[float]]) -> dict:
    """Per-token absolute differences of two models' log-probs of the same tokens."""
    diffs = [abs(x - y) for row_a, row_b in zip(a, b) for x, y in zip(row_a, row_b, strict=True)]
    return {"tokens": len(diffs), "max_abs_per_token": max(diffs), "mean_abs_per_token": sum(diffs) / len(diffs)}


def response_agreement(a: list[list[float]], sums: list[float]) -> dict:
    """Absolute differences of the responses' summed log-probs (`a` per token, or one sum per row)."""
    diffs = [abs(sum(row) - s) for row, s in zip(a, sums)]
    return {"max_abs_per_response": max(diffs), "mean_abs_per_response": sum(diffs) / len(diffs)}


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def summary_lines(report: dict) -> list[str]:
    lines = [f"vllm_check on {report['gpu']}: {report['model']}, {report['base']}, {report['prompts']} prompts"]
    for i, r in enumerate(report["rounds"]):
        ours, bare = r["vllm_vs_training_model"], r["vllm_vs_base_without_adapter"]
        lines.append(
            f"adapter {i + 1} (LoRARequest id {r['lora_request']['id']}): vLLM vs training model log-probs over "
            f"{ours['tokens']} tokens: per token max {ours['max_abs_per_token']:.4f}, mean {ours['mean_abs_per_token']:.4f}; "
            f"per response max {ours['max_abs_per_response']:.3f}, mean {ours['mean_abs_per_response']:.3f} "
            f"(vs the base without adapter: per token mean {bare['mean_abs_per_token']:.4f})"
        )
        lines.append(
            f"  vLLM draw {r['vllm_draw_tokens_per_second']:.0f} new tokens/s; free GPU memory awake "
            f"{r['free_gpu_gib_awake']:.1f} GiB, asleep {r['free_gpu_gib_asleep']:.1f} GiB"
        )
    hf = report["hf_generate_recorded_vs_scored"]
    lines.append(
        f"HF generate's recorded log-probs vs the same scoring: per response max {hf['max_abs_per_response']:.3f}, "
        f"mean {hf['mean_abs_per_response']:.3f}"
    )
    g = report["greedy_hf_vs_vllm"]
    lines.append(
        f"greedy HF vs vLLM: {g['identical']:.0%} identical, mean common prefix {g['mean_common_prefix_tokens']:.1f} "
        f"of {g['mean_tokens_hf']:.1f} (HF) / {g['mean_tokens_vllm']:.1f} (vLLM) tokens"
    )
    t = report["generate_responses_tokens_per_second"]
    lines.append(
        f"generate_responses new tokens/s: hf {t['hf']:.0f}, vllm {t['vllm']:.0f} (with its wake-up and sleep)"
    )
    return lines


if __name__ == "__main__":  # vLLM's worker processes re-import this file (spawn): run only as a script
    sys.exit(main())
