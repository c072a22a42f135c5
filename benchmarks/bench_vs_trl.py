"""One full SPIN iteration: the `lowrank-spin fit` CLI vs HF `generate` + TRL `DPOTrainer`, back to back.

    .venv/bin/pip install -e .[bench]    # trl==1.16.0, a benchmark-only extra
    .venv/bin/python benchmarks/bench_vs_trl.py --num-prompts 64 --output benchmarks/results/vs_trl.json

Both sides: SmolLM2-135M-Instruct (`--model`) with a `--dtype` base (`report.resolve_dtype`, resolved
once and recorded in the output) and LoRA r=16, alpha 32 on every linear layer; the same N prompts of the
embedded math task (`embedded.task.make_splits(N, 0, 0)["train"]`) rendered with the same chat template;
sampling at temperature 1 with top_k 50 (transformers' default), top_p 1 and 96 new tokens, generation
batch 16; then 1 epoch of the SPIN/DPO logistic loss with beta 0.1, real = chosen and generated = rejected, batch 8
pairs, AdamW at a constant lr 5e-5, no gradient clipping, no gradient checkpointing, the same torch
thread count; the opponent/reference is the base with adapters off (iteration 0), its log-probs
precomputed once.

- ours: the unchanged CLI for one iteration without evaluation (`--data.num_val 0`), in a subprocess,
  with `--model.optimizer.schedule constant` (the CLI's default warms up and decays linearly).
  Phases come from the run's metrics CSV and a read-only timing callback (`report.run_fit`).
- TRL: this script's worker, in a subprocess (`report.run_worker`): `model.generate` in batches of 16 with left padding, then
  `DPOTrainer(peft_config=LoraConfig(...), precompute_ref_log_probs=True, max_length=256)`.

Each side's peak RSS is the child's ru_maxrss (os.wait4). Differences that remain: TRL appends EOS to
every rejected response, also to those cut at max_new_tokens (ours does not), truncates prompt+response
to max_length 256 (ours caps prompt and response at 256 each; nothing here is that long), generates in
dataset order (ours sorts by prompt length), and computes log-probs with its chunked fused LM head.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import report


def main() -> None:
    parser = report.parser(__doc__, output="benchmarks/results/vs_trl.json")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument(
        "--model", default="smollm2-135m-instruct", help="an embedded model name, a hub id or a local folder"
    )
    parser.add_argument("--order", default="ours,trl", choices=["ours,trl", "trl,ours"])
    parser.add_argument("--workdir", default=None, help="run folders (default: a temporary folder)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        report.serve_worker(args.worker, trl_worker)
        return

    dtype, reason = report.resolve_dtype(args.dtype)  # both sides get the resolved name
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_vs_trl."))
    sides = {}
    for side in args.order.split(","):
        print(f"running {side} ...", flush=True)
        sides[side] = (
            run_ours(args, dtype, workdir / "ours") if side == "ours" else run_trl(args, dtype, workdir / "trl")
        )
        print(json.dumps(sides[side]), flush=True)
    ours, trl = sides["ours"], sides["trl"]
    results = {
        "machine": report.machine(args.threads),
        "settings": {k: v for k, v in vars(args).items() if k != "worker"},
        "dtype": dtype,
        "dtype_reason": reason,
        "ours": ours,
        "trl": trl,
        "ratio_trl_over_ours": {
            key: trl[key] / ours[key]
            for key in ("total_s", "work_s", "generate_s", "scoring_s", "train_s", "peak_rss_gb")
        },
    }
    write_report(results, args.output)


def run_ours(args, dtype: str, run_dir: Path) -> dict:
    overrides = [
        *("--model.num_iterations", "1"),
        *("--data.num_train", str(args.num_prompts)),
        *("--data.sampling.max_new_tokens", str(args.max_new_tokens)),
        *("--model.model_name_or_path", args.model),
        *("--model.dtype", dtype),
        *("--model.optimizer.schedule", "constant"),  # as TRL's lr_scheduler_type="constant" below
    ]
    run = report.run_fit(run_dir, overrides, threads=args.threads)
    p = report.phases(run)
    (it,) = p["iterations"]
    return {
        "startup_s": p["startup_s"],
        "model_load_s": p["model_load_s"],
        "generate_s": it["generation_s"],
        "generation_tokens_per_s": it["generation_tokens_per_s"],
        "scoring_s": it["scoring_s"],  # opponent log-probs of real and generated, once
        "train_s": it["train_s"],
        "boundary_s": it["boundary_s"],  # save the adapter, snapshot the opponent, checkpoint
        "work_s": p["fit_s"],  # everything after start-up and model load
        "total_s": run["wall_s"],
        "train_steps": it["train_steps"],
        "final_step_loss": it["final_step_loss"],
        "epoch_mean_loss": it["epoch_mean_loss"],
        "peak_rss_gb": run["peak_rss_gb"],
        "rss_after_load_gb": p["rss_after_load_gb"],
        "command": run["command"],
    }


def run_trl(args, dtype: str, workdir: Path) -> dict:
    settings = {k: v for k, v in vars(args).items() if k != "worker"} | {"dtype": dtype, "workdir": str(workdir)}
    result = report.run_worker(__file__, settings, workdir / "trl_worker", args.threads, TQDM_DISABLE="1")
    result["startup_s"] = result.pop("imported_at") - result.pop("launch_time")
    result["total_s"] = result.pop("wall_s")
    return result  # with the child's peak_rss_gb


def trl_worker(args) -> dict:
    """HF generate + TRL DPOTrainer, timed phase by phase."""
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from lowrank_spin import models
    from lowrank_spin.embedded import task

    datasets.disable_progress_bars()
    torch.set_num_threads(args.threads)
    imported_at = time.time()

    start = time.perf_counter()
    path = models.resolve_model_path(args.model)
    tokenizer = models.load_tokenizer(path)  # pad = eos when missing, as ours
    model = AutoModelForCausalLM.from_pretrained(path, dtype=models.DTYPES[args.dtype], attn_implementation="sdpa")
    load_s = time.perf_counter() - start
    rss_after_load = report.rss_gb()[0]

    problems = task.make_splits(args.num_prompts, 0, 0, seed=0)["train"]
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p.prompt}], add_generation_prompt=True, tokenize=False
        )
        for p in problems
    ]

    # generation: the plain HF way, in dataset order, left-padded batches of 16
    tokenizer.padding_side = "left"
    torch.manual_seed(0)
    model.eval()
    generated, new_tokens = [], 0
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(prompts), 16):
            inputs = tokenizer(prompts[i : i + 16], return_tensors="pt", padding=True, add_special_tokens=False)
            output = model.generate(
                **inputs,
                max_new_tokens=args.max_new_tokens,
                do_sample=True,
                temperature=1.0,
                top_k=50,
                top_p=1.0,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                use_cache=True,
            )
            for row in output[:, inputs["input_ids"].shape[1] :].tolist():
                tokens = row[: row.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in row else row
                new_tokens += len(tokens)
                generated.append(tokenizer.decode(tokens, skip_special_tokens=True))
    generate_s = time.perf_counter() - start
    tokenizer.padding_side = "right"

    # standard (not conversational) format: the rendered prompt; TRL appends EOS to chosen and rejected
    dataset = datasets.Dataset.from_list(
        [{"prompt": prompt, "chosen": p.response, "rejected": g} for prompt, p, g in zip(prompts, problems, generated)]
    )
    config = DPOConfig(
        output_dir=str(Path(args.workdir) / "dpo"),
        per_device_train_batch_size=8,
        num_train_epochs=1,
        learning_rate=5e-5,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=0.0,  # ours does not clip
        optim="adamw_torch",
        beta=0.1,
        loss_type=["sigmoid"],
        max_length=256,
        precompute_ref_log_probs=True,
        precompute_ref_batch_size=8,  # ours scores in batches of data.batch_size = 8
        gradient_checkpointing=False,
        use_cpu=True,
        dataloader_pin_memory=False,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
    )
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")

    timings = {}

    class TimedDPOTrainer(DPOTrainer):
        def _precompute_ref_logps(self, *a, **kw):
            start = time.perf_counter()
            try:
                return super()._precompute_ref_logps(*a, **kw)
            finally:
                timings["ref_logps_s"] = time.perf_counter() - start

    start = time.perf_counter()
    trainer = TimedDPOTrainer(
        model=model, args=config, train_dataset=dataset, processing_class=tokenizer, peft_config=lora
    )
    init_s = time.perf_counter() - start
    start = time.perf_counter()
    output = trainer.train()
    train_s = time.perf_counter() - start
    step_losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    return {
        "imported_at": imported_at,
        "model_load_s": load_s,
        "generate_s": generate_s,
        "generation_tokens_per_s": new_tokens / generate_s,
        "trainer_init_s": init_s,  # tokenising the pairs, wrapping with peft, and the reference pass
        "scoring_s": timings["ref_logps_s"],  # reference log-probs of chosen and rejected, once
        "train_s": train_s,
        "work_s": generate_s + init_s + train_s,
        "train_steps": trainer.state.global_step,
        "final_step_loss": step_losses[-1] if step_losses else None,
        "epoch_mean_loss": output.training_loss,
        "rss_after_load_gb": rss_after_load,
        "trl_version": __import__("trl").__version__,
    }


def write_report(results: dict, output: str) -> None:
    ours, trl, ratio = results["ours"], results["trl"], results["ratio_trl_over_ours"]
    rows = [
        ("start-up (imports) s", "startup_s"),
        ("model load s", "model_load_s"),
        ("generate s", "generate_s"),
        ("generation new tok/s", "generation_tokens_per_s"),
        ("scoring / ref log-probs s", "scoring_s"),
        ("train 1 epoch s", "train_s"),
        ("work (after load) s", "work_s"),
        ("**total wall s**", "total_s"),
        ("train steps", "train_steps"),
        ("final step loss", "final_step_loss"),
        ("epoch mean loss", "epoch_mean_loss"),
        ("RSS after load GB", "rss_after_load_gb"),
        ("peak RSS GB", "peak_rss_gb"),
    ]
    header = [f"{results['settings']['num_prompts']} prompts", "lowrank-spin CLI", "HF generate + TRL DPOTrainer"]
    cells = [
        [label, _fmt(ours.get(key)), _fmt(trl.get(key)), f"{ratio[key]:.2f}x" if key in ratio else ""]
        for label, key in rows
    ]
    lines = [
        f"base dtype: {results['dtype']} ({results['dtype_reason']})",
        "",
        *report.table([*header, "TRL / ours"], cells),
    ]
    report.write_results(results, "\n".join(lines), output)


def _fmt(value) -> str:
    if value is None:
        return "n/a"
    return (
        f"{value:.3f}"
        if isinstance(value, float) and abs(value) < 10
        else f"{value:.1f}"
        if isinstance(value, float)
        else str(value)
    )


if __name__ == "__main__":
    main()
