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
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import report
import spin_cli_run

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
    parser.add_argument(
        "--phases",
        action="store_true",
        help="instead: peak RSS per phase of one SPIN iteration of the embedded SmolLM2 at the main config's "
        "shapes, full logits vs chunked log-probs, each in a fresh process",
    )
    parser.add_argument("--chunk-sizes", nargs="+", default=["none", "512"], help="with --phases: none = full logits")
    parser.add_argument("--generation-batches", type=int, default=1, help="with --phases: batches of 16 prompts")
    parser.add_argument("--repeats", type=int, default=3, help="with --phases: timed training steps per variant")
    parser.add_argument(
        "--trace-fit",
        metavar="RUN_DIR",
        help="instead: run the README's main command (lowrank-spin fit --config configs/smollm2_spin.yaml) into "
        "RUN_DIR, sampling its RSS every 0.2 s, and report peak RSS and seconds per phase",
    )
    parser.add_argument(
        "--fit-args", nargs=argparse.REMAINDER, default=[], help="with --trace-fit: more `fit` options, last"
    )
    parser.add_argument("--trace-file", help="instead: the per-phase table of a trace written by --trace-fit")
    parser.add_argument("--worker", choices=["build", "ours", "phases", *VARIANTS], help=argparse.SUPPRESS)
    parser.add_argument("--chunk-size", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--size", help=argparse.SUPPRESS)
    parser.add_argument("--worker-output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "build":
        build_worker(args)
        return
    if args.worker == "phases":
        phases_worker(args)
        return
    if args.phases:
        phases_main(args)
        return
    if args.trace_fit or args.trace_file:
        trace_main(args)
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


# ---- --phases: where the memory of one SPIN iteration goes -----------------------------------------

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "smollm2_spin.yaml"
PHASES = (
    ("startup", "start-up: imports"),
    ("model_load", "model load: nf4 base + LoRA adapters"),
    ("generation", "generation: one batch of 16 prompts, 96 new tokens (HF generate, KV cache)"),
    ("scoring", "opponent scoring: 8 examples [real; generated], no grad"),
    ("train_forward", "training step: policy forward (log-probs with graph)"),
    ("train_backward", "training step: backward"),
    ("optimizer", "training step: AdamW step"),
    ("eval_gold_nll", "evaluation: gold NLL, 16 rows (evaluation.gold_nll: response_logits)"),
    ("eval_gold_nll_chunked", "evaluation: gold NLL, 16 rows via response_logps(chunk_size)"),
)


def phases_main(args) -> None:
    """One fresh process per `--chunk-sizes` value, run back to back: per-phase peak RSS and seconds."""
    from lowrank_spin import models

    setting = args.dtype
    args.dtype, reason = models.choose_dtype(setting, "cpu")
    print(f"dtype: {args.dtype} ({reason})", flush=True)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_memory."))
    workdir.mkdir(parents=True, exist_ok=True)
    results = {
        "settings": {
            "chunk_sizes": args.chunk_sizes,
            "generation_batches": args.generation_batches,
            "repeats": args.repeats,
            "threads": args.threads,
            "dtype": setting,
        },
        "dtype": args.dtype,
        "dtype_reason": reason,
        "cpu_flags": report.cpu_flags_text(),
        "variants": {},
    }
    for chunk in args.chunk_sizes:
        out = workdir / f"phases.{chunk}.json"
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            "phases",
            "--chunk-size",
            chunk,
            "--worker-output",
            str(out),
            "--dtype",
            args.dtype,
            "--threads",
            str(args.threads),
            "--repeats",
            str(args.repeats),
            "--generation-batches",
            str(args.generation_batches),
        ]
        print(f"[phases] chunk_size={chunk} ...", flush=True)
        child = subprocess.Popen(cmd, env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)))
        _, status, usage = os.wait4(child.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"phases worker (chunk_size={chunk}) failed")
        results["variants"][chunk] = json.loads(out.read_text()) | {"ru_maxrss_gb": usage.ru_maxrss / 2**20}
    write_phases_report(results, Path(args.output))


def phases_worker(args) -> None:
    """Peak RSS (VmHWM, reset through /proc/self/clear_refs before each phase) and seconds per phase."""
    import ctypes

    started = time.perf_counter()
    import torch
    import yaml

    from lowrank_spin import models
    from lowrank_spin.batching import SharedPromptCollator, response_logps
    from lowrank_spin.data.chat import render_pair
    from lowrank_spin.embedded import task
    from lowrank_spin.evaluation import gold_nll
    from lowrank_spin.generation import generate_responses
    from lowrank_spin.losses import spin_loss
    from lowrank_spin.settings import LoRASettings, SamplingSettings

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    chunk = None if args.chunk_size == "none" else int(args.chunk_size)
    config = yaml.safe_load(CONFIG.read_text())
    data, sampling_config = config["data"], config["data"]["sampling"]
    lora = config["model"]["lora"]
    trim = ctypes.CDLL("libc.so.6").malloc_trim
    rows = {}

    def record(name: str, start: float) -> None:
        rss, peak = _rss_gb()
        trim(0)  # what glibc gives back: RSS kept by the allocator after the phase's frees
        rows[name] = {
            "peak_gb": peak,
            "rss_after_gb": rss,
            "rss_after_trim_gb": _status_gb("VmRSS"),
            "seconds": time.perf_counter() - start,
        }
        print(f"[phases chunk={args.chunk_size}] {name}: {json.dumps(rows[name])}", flush=True)
        Path("/proc/self/clear_refs").write_text("5")

    record("startup", started)
    start = time.perf_counter()
    path = models.resolve_model_path(models.SMOLLM2)
    tokenizer = models.load_tokenizer(path)
    base = models.load_base_model(path, load_in_4bit=config["model"]["load_in_4bit"], compute_dtype=args.dtype)
    model = models.attach_lora(base, LoRASettings(rank=lora["rank"], alpha=lora["alpha"]))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    _init_optimizer_state(optimizer)
    record("model_load", start)

    problems = task.make_splits(data["num_train"], data["num_val"], 0)
    examples = []
    for i, problem in enumerate(problems["train"]):
        prompt_ids, real_ids = render_pair(tokenizer, problem.prompt, problem.response)
        other = problems["train"][(i + 1) % len(problems["train"])]
        # a generated response as long as an answer drawn with max_new_tokens (96) can be
        generated_ids = render_pair(tokenizer, problem.prompt, other.response)[1][: sampling_config["max_new_tokens"]]
        examples.append({"prompt_ids": prompt_ids, "real_ids": real_ids, "generated_ids": generated_ids})
    examples.sort(key=lambda e: -len(e["prompt_ids"]) - len(e["real_ids"]) - len(e["generated_ids"]))

    start = time.perf_counter()
    sampling = SamplingSettings(
        **{k: sampling_config[k] for k in ("temperature", "top_k", "top_p", "max_new_tokens", "batch_size")}
    )
    prompts = [e["prompt_ids"] for e in examples[: sampling.batch_size * args.generation_batches]]
    with models.opponent(model, adapters_disabled=True):
        _, stats = generate_responses(model, tokenizer, prompts, sampling, desc="generate")
    record("generation", start)
    rows["generation"]["new_tokens"] = stats["new_tokens"]

    batch = SharedPromptCollator(tokenizer.pad_token_id, ("real", "generated"))(examples[: data["batch_size"]])
    rows_info = {
        "batch_width": int(batch["input_ids"].shape[1]),
        "scored_positions": int((batch["targets"] != -100).sum()),
    }
    start = time.perf_counter()
    model.eval()
    with torch.no_grad(), models.opponent(model, adapters_disabled=True):
        opponent_real, opponent_generated = response_logps(model, batch, chunk_size=chunk).chunk(2)
    model.train()
    record("scoring", start)

    step_seconds = []
    for repeat in range(args.repeats):
        start = time.perf_counter()
        real, generated = response_logps(model, batch, chunk_size=chunk).chunk(2)  # layout: [real; generated]
        loss = spin_loss(real, generated, opponent_real, opponent_generated)[0].mean()
        if repeat == 0:
            record("train_forward", start)
        middle = time.perf_counter()
        loss.backward()
        if repeat == 0:
            record("train_backward", middle)
        end_backward = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if repeat == 0:
            record("optimizer", end_backward)
        step_seconds.append(
            {
                "forward_s": middle - start,
                "backward_s": end_backward - middle,
                "step_s": time.perf_counter() - start,
                "loss": loss.item(),
            }
        )

    from lowrank_spin.batching import Collator, batches

    eval_examples = examples[: sampling.batch_size]
    start = time.perf_counter()
    nll, tokens = gold_nll(model, eval_examples, Collator(tokenizer.pad_token_id, ("real",)), sampling.batch_size)
    record("eval_gold_nll", start)
    start = time.perf_counter()
    model.eval()
    with torch.no_grad():
        chunked_nll = sum(
            -response_logps(model, b, chunk_size=chunk).sum().item()
            for _, b in batches(eval_examples, Collator(tokenizer.pad_token_id, ("real",)), sampling.batch_size, "cpu")
        )
    record("eval_gold_nll_chunked", start)
    rows["eval_gold_nll_chunked"]["nll_difference"] = chunked_nll - nll
    result = {"phases": rows, "steps": step_seconds, "batch": rows_info, "chunk_size": chunk}
    Path(args.worker_output).write_text(json.dumps(result))


def write_phases_report(results: dict, output: Path) -> None:
    variants = results["variants"]
    names = list(variants)
    lines = [
        f"dtype: {results['dtype']} ({results['dtype_reason']}); CPU flags: {results['cpu_flags']}",
        f"one fresh process per variant, run back to back; batch: {next(iter(variants.values()))['batch']}",
        "",
        "| phase | " + " | ".join(f"chunk={n}: peak GB / RSS after / after malloc_trim / s" for n in names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for key, label in PHASES:
        cells = []
        for n in names:
            r = variants[n]["phases"].get(key)
            cells.append(
                f"{r['peak_gb']:.2f} / {r['rss_after_gb']:.2f} / {r['rss_after_trim_gb']:.2f} / {r['seconds']:.1f}"
                if r
                else ""
            )
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append(
        "| whole process (ru_maxrss) | " + " | ".join(f"{variants[n]['ru_maxrss_gb']:.2f}" for n in names) + " |"
    )
    for n in names:
        steps = variants[n]["steps"][1:] or variants[n]["steps"]  # the first step warms up
        fwd = sum(s["forward_s"] for s in steps) / len(steps)
        bwd = sum(s["backward_s"] for s in steps) / len(steps)
        lines.append(
            f"\\nchunk={n}: training step forward {fwd:.2f} s, backward {bwd:.2f} s (mean of {len(steps)} after the first), "
            f"losses {[round(s['loss'], 6) for s in variants[n]['steps']]}"
        )
    report.write_results(results, "\n".join(lines), output)


# ---- --trace-fit: the main command's RSS over time, cut into phases by what it prints -------------------

# (phase, pattern of an output fragment that starts it); a progress bar at n == total ends its phase.
# The training steps print no line a pipe sees (Rich's bar draws once, at the end): their start and end
# come from the read-only PhaseProbe callback (benchmarks/spin_phase_probe.py) instead.
TRACE_MARKERS = (
    ("model load", re.compile(r"^model\.(compute_)?dtype: ")),
    ("generation", re.compile(r"^iter \d+ generate:")),
    ("evaluation: greedy answers", re.compile(r"^evaluate:")),
    ("teardown", re.compile(r"^run directory: ")),
)
AFTER_BAR = {
    "generation": "opponent scoring",
    "evaluation: greedy answers": "evaluation: gold NLL, results",
}
PROBE_PHASES = {"train_epoch_start": "training steps", "train_epoch_end": "boundary: save adapter, snapshot"}
_BAR = re.compile(r"(\d+)/(\d+) \[")
_ITERATION = re.compile(r"^iter (\d+) generate:")


def trace_main(args) -> None:
    trace = Path(args.trace_file) if args.trace_file else Path(args.trace_fit) / "memory_trace.jsonl"
    probe = trace.with_name("probe.jsonl")
    if args.trace_fit:
        cache = Path(os.environ.get("LOWRANK_SPIN_CACHE", Path.home() / ".cache" / "lowrank_spin"))
        script = Path(sys.executable).parent / "lowrank-spin"
        cli = [str(script)] if script.exists() else [sys.executable, "-m", "lowrank_spin.cli"]
        command = [*cli, "fit", "--config", str(CONFIG), "--trainer.default_root_dir", args.trace_fit]
        command += ["--trainer.logger.init_args.save_dir", args.trace_fit]
        command += spin_cli_run.probe_args(probe)
        Path(args.trace_fit).mkdir(parents=True, exist_ok=True)
        probe.unlink(missing_ok=True)
        record_trace([*command, *args.fit_args], trace, cache)
    events = [json.loads(line) for line in probe.read_text().splitlines()] if probe.exists() else []
    table = trace_phases([json.loads(line) for line in trace.read_text().splitlines()], events)
    results = {"trace": str(trace), "fit_args": args.fit_args, "cpu_flags": report.cpu_flags_text(), "phases": table}
    lines = [
        f"CPU flags: {results['cpu_flags']}; trace {trace}",
        "",
        "| phase | seconds | peak RSS GB |",
        "|---|---|---|",
    ]
    lines += [f"| {row['phase']} | {row['seconds']:.0f} | {row['peak_gb']:.2f} |" for row in table["rows"]]
    lines.append(f"| whole run (wait4 ru_maxrss) | {table['wall_s']:.0f} | {table['ru_maxrss_gb']:.2f} |")
    report.write_results(results, "\n".join(lines), Path(args.output))


def record_trace(command: list[str], trace: Path, cache: Path) -> None:
    """Run `command` (benchmarks/ on its PYTHONPATH, for the probe); write JSON lines to `trace`: its output
    fragments (split on \\r and \\n) with their arrival time, its VmRSS and its largest child's every 0.2 s,
    whether `cache` holds a model being built."""
    import threading

    out, lock, stop = open(trace, "w"), threading.Lock(), threading.Event()

    def emit(record: dict) -> None:
        with lock:
            out.write(json.dumps(record) + "\n")
            out.flush()

    emit({"kind": "start", "t": time.time(), "cmd": command})
    child = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=0, env=spin_cli_run.probe_environment()
    )

    def sample() -> None:
        while not stop.is_set():
            children = _descendants(child.pid)
            building = cache.exists() and any(p.name.startswith(".smollm2-135m-instruct.") for p in cache.iterdir())
            emit(
                {
                    "kind": "rss",
                    "t": time.time(),
                    "kib": _rss_kib(child.pid),
                    "kids_kib": max([_rss_kib(c) or 0 for c in children], default=0),
                    "building": building,
                }
            )
            stop.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    buffer, emitted = b"", False
    with open(f"{trace}.log", "wb") as log:
        while chunk := child.stdout.read(4096):
            log.write(chunk)
            buffer += chunk
            parts = re.split(rb"[\r\n]", buffer)
            buffer = parts.pop()
            now = time.time()
            # a progress bar writes "\r<state>": its state counts from when it arrives, not when the next ends it
            for i, part in enumerate([*parts, buffer]):
                if part.strip() and not (i == 0 and emitted):
                    emit({"kind": "out", "t": now, "text": part.decode(errors="replace")[:300]})
            emitted = bool(buffer.strip())
    _, status, usage = os.wait4(child.pid, 0)
    stop.set()
    sampler.join()
    emit({"kind": "end", "t": time.time(), "rc": os.waitstatus_to_exitcode(status), "ru_maxrss_kib": usage.ru_maxrss})
    out.close()


def trace_phases(records: list[dict], events: list[dict] = ()) -> dict:
    """Seconds and peak RSS (the process's, or its largest child's while one runs) per phase of a trace,
    per iteration: generation and scoring carry the iteration they generate for, training the one it
    trains, an evaluation the last iteration trained before it ("before training" if none)."""
    start = next(r for r in records if r["kind"] == "start")
    # a trace still being written (or of a killed run) ends at its last record, without ru_maxrss
    end = next((r for r in records if r["kind"] == "end"), {"t": records[-1]["t"], "ru_maxrss_kib": 0})
    marks = [(r["t"], "out", r["text"].strip()) for r in records if r["kind"] == "out"]
    marks += [(e["wall"], "probe", e["event"]) for e in events if e["event"] in PROBE_PHASES]
    changes, phase, iteration, trained = [(start["t"], "start-up: imports, CLI, data")], None, None, None
    for t, kind, text in sorted(marks, key=lambda m: m[0]):
        if kind == "probe":
            new = PROBE_PHASES[text]
            trained = iteration if text == "train_epoch_end" else trained
        else:
            new = next((name for name, pattern in TRACE_MARKERS if pattern.search(text)), None)
            if found := _ITERATION.search(text):
                iteration = int(found.group(1))
            bar = _BAR.search(text)
            if new and bar and int(bar.group(1)) == int(bar.group(2)) and new in AFTER_BAR:
                new = AFTER_BAR[new]
            if phase in AFTER_BAR.values() and new in AFTER_BAR and AFTER_BAR[new] == phase:
                continue  # the finished bar printed again
        if new is None:
            continue
        if new.startswith("evaluation"):
            new += ", before training" if trained is None else f", after iteration {trained}"
        elif new != "teardown" and new != "model load" and iteration is not None:
            new += f", iteration {iteration}"
        if new != phase:
            changes.append((t, new))
            phase = new
    rows: dict[str, dict] = {}
    samples = [r for r in records if r["kind"] == "rss" and r["kib"]]
    building_label = "GGUF conversion (in its own process where it has one)"
    for i, (t, name) in enumerate(changes):
        stop = changes[i + 1][0] if i + 1 < len(changes) else end["t"]
        for s in (s for s in samples if t <= s["t"] < stop):
            label = building_label if s["building"] else name
            row = rows.setdefault(label, {"phase": label, "seconds": 0.0, "peak_gb": 0.0})
            row["peak_gb"] = max(row["peak_gb"], max(s["kib"], s["kids_kib"]) / 2**20)
        rows.setdefault(name, {"phase": name, "seconds": 0.0, "peak_gb": 0.0})["seconds"] += stop - t
    building = [s["t"] for s in samples if s["building"]]
    if building:
        rows[building_label]["seconds"] = building[-1] - building[0]
    return {
        "rows": list(rows.values()),
        "wall_s": end["t"] - start["t"],
        "ru_maxrss_gb": end["ru_maxrss_kib"] / 2**20,
        "changes": changes,
    }


def _rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return 0


def _descendants(pid: int) -> list[int]:
    parents = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parents[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, ProcessLookupError, PermissionError, IndexError):
                continue
    found, todo = [], [pid]
    while todo:
        pid = todo.pop()
        kids = [k for k, parent in parents.items() if parent == pid]
        found += kids
        todo += kids
    return found


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
