"""Peak memory of a SPIN training step: one nf4 base with LoRA policy/opponent adapters (ours) vs a
two-model set-up as in uclaml/SPIN (a fully fine-tuned bf16 policy plus a separate bf16 reference copy).

    .venv/bin/python benchmarks/bench_memory.py --sizes 135m 0.5b 1.1b --output benchmarks/results/memory.json

`--dtype` (default `auto`, resolved once with `models.choose_dtype` and recorded in the output) is the
dtype of the saved models, of ours' compute and of the two-model sides' weights: bf16 where this CPU has
native bf16, else float32 (an AVX2-only CPU emulates bf16 matmuls, ~50x slower). "bf16" in the names
below means that dtype; pass `--dtype bfloat16` to measure what benchmarks/RESULTS.md reports.

Models are random-weight Llamas built from real configs (SmolLM2-135M's own config.json; Qwen2.5-0.5B's
dims as a LlamaConfig; TinyLlama-1.1B), saved once in `--dtype` to a temporary folder. Each side then runs in
its own process: load, then `--steps` SPIN steps on random tokens, batch `--pairs` pairs laid out
[real; generated] (2 pairs = 4 sequences of `--seq-len` tokens, the first half a prompt with no loss),
the opponent/reference forward under no_grad, the policy forward+backward, AdamW. Both sides compute
log-probs with `batching.response_logits` and the loss with `losses.spin_loss`.

- ours: `models.load_base_model(load_in_4bit=True, compute_dtype=dtype)` + `models.attach_lora`
  (r=16 all-linear), opponent = the `opponent` adapter switched on with `models.opponent`; AdamW on LoRA.
- two-model, variant `bf16-adamw`: policy and reference loaded in bf16, torch AdamW on every policy
  parameter (its moments in bf16, like the parameters): ~10 bytes/parameter, the smallest two-model
  footprint, so ratios against it are conservative.
- two-model, variant `fp32-master`: what bf16 mixed precision (HF Trainer / DeepSpeed, as uclaml/SPIN
  trains) holds: bf16 policy and gradients plus fp32 master weights, fp32 gradients and fp32 AdamW
  moments, and the bf16 reference: ~20 bytes/parameter. Skipped at a size where its estimate does not
  fit `--memory-limit-gb` (default 80% of MemAvailable): at 1.1B it would need ~22 GB. Skipped at
  `--dtype float32`, where there is no half-precision policy to keep fp32 masters of.

Memory per side: VmRSS after load (and the optimizer), the peak while loading (VmHWM), and the peak over
the training steps (VmHWM after resetting it through /proc/self/clear_refs); `peak_gb` is the larger.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import report

from lowrank_spin.settings import AUTO, DTYPE_NAMES

GiB = 2**30
SIZES = {
    # the real SmolLM2-135M-Instruct config (read from the converted model); tied embeddings
    "135m": "smollm2",
    # Qwen2.5-0.5B's dimensions as a Llama (no q/k/v biases); tied embeddings
    "0.5b": dict(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
        max_position_embeddings=32768,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
    ),
    # TinyLlama-1.1B
    "1.1b": dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
        tie_word_embeddings=False,
        max_position_embeddings=2048,
        rope_theta=1e4,
        rms_norm_eps=1e-5,
    ),
}
VARIANTS = ("bf16-adamw", "fp32-master")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def bytes_per_parameter(variant: str, dtype: str) -> int:
    """Parameter and optimizer state of a two-model variant, for the fits-in-memory check (10 and 20 at bf16)."""
    size = DTYPE_BYTES[dtype]
    if variant == "bf16-adamw":  # policy, reference, gradients, two AdamW moments, all in `dtype`
        return 5 * size
    return 2 * size + 16  # `dtype` policy and reference; fp32 masters, gradients and two moments


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=2, help="(real, generated) pairs per step; 2 pairs = 4 sequences")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument(
        "--dtype", default=AUTO, choices=[AUTO, *DTYPE_NAMES], help="models, ours' compute, the two-model sides"
    )
    parser.add_argument("--two-model-variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--gradient-checkpointing", action="store_true", help="on both sides")
    parser.add_argument(
        "--memory-limit-gb", type=float, default=None, help="skip a variant whose estimate exceeds this"
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument(
        "--workdir", default=None, help="where the random models are saved (default: a temporary folder)"
    )
    parser.add_argument("--output", default="benchmarks/results/memory.json")
    parser.add_argument("--worker", choices=["build", "ours", *VARIANTS], help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--size", help=argparse.SUPPRESS)
    parser.add_argument("--worker-output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "build":
        build_worker(args)
        return
    if args.worker:
        step_worker(args)
        return

    from lowrank_spin import models

    setting = args.dtype
    args.dtype, reason = models.choose_dtype(setting, "cpu")  # the workers get the resolved name
    print(f"dtype: {args.dtype} ({reason})", flush=True)
    limit = args.memory_limit_gb or 0.8 * _mem_available_gb()
    hidden = ("worker", "model_dir", "size", "worker_output")
    results = {
        "settings": {k: v for k, v in vars(args).items() if k not in hidden} | {"dtype": setting},
        "dtype": args.dtype,
        "dtype_reason": reason,
        "memory_limit_gb": limit,
        "sizes": {},
    }
    for size in args.sizes:
        workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_memory."))
        workdir.mkdir(parents=True, exist_ok=True)
        model_dir = workdir / size
        try:
            print(f"[{size}] building the random {args.dtype} model ...", flush=True)
            built = _child(args, "build", size, model_dir)
            row = {"num_parameters": built["num_parameters"], "build_s": built["seconds"]}
            row["ours"] = _child(args, "ours", size, model_dir)
            print(f"[{size}] ours: {json.dumps(row['ours'])}", flush=True)
            for variant in args.two_model_variants:
                estimate = bytes_per_parameter(variant, args.dtype) * built["num_parameters"] / GiB
                if variant == "fp32-master" and args.dtype == "float32":
                    row[variant] = {
                        "skipped": "--dtype float32: no half-precision policy to keep fp32 master weights of"
                    }
                elif estimate > limit:
                    row[variant] = {
                        "skipped": f"estimated {estimate:.1f} GB of parameter/optimizer state > limit {limit:.1f} GB"
                    }
                else:
                    row[variant] = _child(args, variant, size, model_dir)
                    row[f"ratio_ours_over_{variant}"] = row["ours"]["peak_gb"] / row[variant]["peak_gb"]
                print(f"[{size}] {variant}: {json.dumps(row[variant])}", flush=True)
            results["sizes"][size] = row
        finally:
            shutil.rmtree(model_dir, ignore_errors=True)
            if not args.workdir:
                shutil.rmtree(workdir, ignore_errors=True)
    write_report(results, Path(args.output))


def _child(args, worker: str, size: str, model_dir: Path) -> dict:
    """Run one side in a fresh process; its JSON plus the kernel's ru_maxrss for it."""
    out = model_dir.parent / f"{size}.{worker}.json"
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        worker,
        "--size",
        size,
        "--model-dir",
        str(model_dir),
        "--worker-output",
        str(out),
        "--steps",
        str(args.steps),
        "--pairs",
        str(args.pairs),
        "--seq-len",
        str(args.seq_len),
        "--lora-rank",
        str(args.lora_rank),
        "--threads",
        str(args.threads),
        "--dtype",
        args.dtype,
    ] + (["--gradient-checkpointing"] if args.gradient_checkpointing else [])
    log_path = model_dir.parent / f"{size}.{worker}.log"
    with open(log_path, "w") as log:
        child = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        )
        _, status, usage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(
            f"{worker} worker ({size}) failed; last lines of {log_path}:\n"
            + "".join(log_path.read_text().splitlines(True)[-30:])
        )
    result = json.loads(out.read_text())
    result["ru_maxrss_gb"] = usage.ru_maxrss / 2**20  # after the clear_refs reset: the training peak (KiB)
    return result


# ---- workers ---------------------------------------------------------------------------------------


def build_worker(args) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lowrank_spin import models

    start = time.perf_counter()
    spec = SIZES[args.size]
    if spec == "smollm2":
        config = LlamaConfig.from_pretrained(models.resolve_model_path(models.SMOLLM2))
    else:
        config = LlamaConfig(**spec)
    dtype = models.DTYPES[args.dtype]
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    model = LlamaForCausalLM(config)
    model.config.dtype = dtype
    model.save_pretrained(args.model_dir)
    result = {"num_parameters": sum(p.numel() for p in model.parameters()), "seconds": time.perf_counter() - start}
    Path(args.worker_output).write_text(json.dumps(result))


def step_worker(args) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from lowrank_spin import models
    from lowrank_spin.batching import response_logits, sequence_logps
    from lowrank_spin.losses import spin_loss
    from lowrank_spin.settings import LoRASettings

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    start = time.perf_counter()
    if args.worker == "ours":
        base = models.load_base_model(args.model_dir, load_in_4bit=True, compute_dtype=args.dtype)
        _maybe_checkpointing(base, args)
        policy = models.attach_lora(base, LoRASettings(rank=args.lora_rank, alpha=2 * args.lora_rank))
        trainable = [p for p in policy.parameters() if p.requires_grad]

        @torch.no_grad()
        def opponent_logps(batch):
            policy.eval()
            with models.opponent(policy):  # the opponent adapter of the same model: no second copy
                logits, labels = response_logits(policy, batch)
            policy.train()
            return sequence_logps(logits, labels)
    else:
        load = dict(dtype=models.DTYPES[args.dtype], attn_implementation="sdpa")
        policy = AutoModelForCausalLM.from_pretrained(args.model_dir, **load)
        reference = AutoModelForCausalLM.from_pretrained(args.model_dir, **load).eval().requires_grad_(False)
        _maybe_checkpointing(policy, args)
        trainable = list(policy.parameters())

        @torch.no_grad()
        def opponent_logps(batch):
            logits, labels = response_logits(reference, batch)
            return sequence_logps(logits, labels)

    policy.train()
    if args.worker == "fp32-master":
        # bf16 mixed precision: the optimizer updates fp32 master weights; the bf16 policy is a copy of them
        masters = [p.detach().float() for p in trainable]
        optimizer = torch.optim.AdamW(masters, lr=1e-5)
    else:
        optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    _init_optimizer_state(optimizer)  # AdamW allocates its moments lazily: count them in "after load"
    load_s = time.perf_counter() - start
    rss_after_load, load_peak = _rss_gb()
    file_backed = _status_gb("RssFile")  # weights left memory-mapped from the checkpoint would show here

    batch = _random_batch(policy.config.vocab_size, args.pairs, args.seq_len)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the next peak is the training steps'
    step_seconds, step_losses = [], []
    for _ in range(args.steps):
        start = time.perf_counter()
        opponent_real, opponent_generated = opponent_logps(batch).chunk(2)
        logits, labels = response_logits(policy, batch)
        real, generated = sequence_logps(logits, labels).chunk(2)  # layout: [real; generated]
        loss = spin_loss(real, generated, opponent_real, opponent_generated)[0].mean()
        loss.backward()
        if args.worker == "fp32-master":
            for master, param in zip(masters, trainable):
                master.grad = param.grad.float()
                param.grad = None
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                for master, param in zip(masters, trainable):
                    param.copy_(master)
        else:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        step_seconds.append(time.perf_counter() - start)
        step_losses.append(loss.item())
    rss_end, train_peak = _rss_gb()
    result = {
        "load_s": load_s,
        "rss_after_load_gb": rss_after_load,
        "file_backed_after_load_gb": file_backed,
        "load_peak_gb": load_peak,
        "train_peak_gb": train_peak,
        "peak_gb": max(load_peak, train_peak),
        "rss_end_gb": rss_end,
        "trainable_parameters": sum(p.numel() for p in trainable),
        "step_seconds": step_seconds,
        "losses": step_losses,
    }
    Path(args.worker_output).write_text(json.dumps(result))


def _random_batch(vocab_size: int, pairs: int, seq_len: int) -> dict:
    import torch

    from lowrank_spin.batching import IGNORE_INDEX

    input_ids = torch.randint(0, vocab_size, (2 * pairs, seq_len), generator=torch.Generator().manual_seed(0))
    labels = input_ids.clone()
    labels[:, : seq_len // 2] = IGNORE_INDEX  # the prompt half carries no loss
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels, "num_responses": 2}


def _init_optimizer_state(optimizer) -> None:
    import torch

    for group in optimizer.param_groups:
        for p in group["params"]:
            optimizer.state[p] = {
                "step": torch.tensor(0.0),
                "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
            }


def _maybe_checkpointing(model, args) -> None:
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()


def _rss_gb() -> tuple[float, float]:
    return _status_gb("VmRSS"), _status_gb("VmHWM")


def _status_gb(field: str) -> float:
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields[field].split()[0]) / 2**20


def _mem_available_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return 16.0


def write_report(results: dict, output: Path) -> None:
    lines = [
        f"dtype: {results['dtype']} ({results['dtype_reason']})",
        "",
        "| size | params | side | RSS after load GB | load peak GB | train peak GB | peak GB | ours / this |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for size, row in results["sizes"].items():
        for side in ["ours", *VARIANTS]:
            if side not in row:
                continue
            r = row[side]
            if "skipped" in r:
                lines.append(
                    f"| {size} | {row['num_parameters'] / 1e6:.0f}M | two-model {side} | skipped: {r['skipped']} | | | | |"
                )
                continue
            ratio = row.get(f"ratio_ours_over_{side}")
            name = "ours (nf4 + LoRA adapters)" if side == "ours" else f"two-model {side}"
            lines.append(
                f"| {size} | {row['num_parameters'] / 1e6:.0f}M | {name} | {r['rss_after_load_gb']:.2f} | {r['load_peak_gb']:.2f} | "
                f"{r['train_peak_gb']:.2f} | {r['peak_gb']:.2f} | {f'**{ratio:.2f}x**' if ratio else ''} |"
            )
    markdown = "\n".join(lines)
    report.write_results(results, markdown, output)


if __name__ == "__main__":
    main()
