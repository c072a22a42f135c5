"""Peak memory: of a SPIN training step, ours vs a two-model set-up (default); of the README's main command (--trace-fit).

    .venv/bin/python benchmarks/bench_memory.py --sizes 0.5b 1.1b --steps 2 --memory-limit-gb 20 --output benchmarks/results/memory.json
    .venv/bin/python benchmarks/bench_memory.py --trace-fit runs/main_command --output benchmarks/results/main_command.json --fit-args ...

**A training step** (default): one nf4 base with LoRA policy/opponent adapters (ours) vs a two-model
set-up as in uclaml/SPIN (a fully fine-tuned policy plus a separate reference copy). Models are
random-weight Llamas built from real configs (Qwen2.5-0.5B's dims as a LlamaConfig; TinyLlama-1.1B),
saved once in `--dtype` (the dtype of ours' compute and of the two-model sides' weights; "bf16" below
means it) to a temporary folder. Each side then runs in its own process: load, then `--steps` SPIN
steps on random tokens, 2 pairs laid out [real; generated] (4 sequences of 256 tokens, the first half a
prompt with no loss), the opponent/reference forward under no_grad, the policy forward+backward, AdamW.
Both sides compute log-probs with `batching.response_logits` and the loss with `losses.spin_loss`.

- ours: `models.load_base_model(load_in_4bit=True, compute_dtype=dtype)` + `models.attach_lora`
  (r=16 all-linear), opponent = the `opponent` adapter switched on with `models.opponent`; AdamW on LoRA.
- two-model `bf16-adamw`: policy and reference loaded in bf16, torch AdamW on every policy parameter
  (its moments in bf16, like the parameters): ~10 bytes/parameter, the smallest two-model footprint,
  so ratios against it are conservative.
- two-model `fp32-master`: what bf16 mixed precision (HF Trainer / DeepSpeed, as uclaml/SPIN trains)
  holds: bf16 policy and gradients plus fp32 master weights, fp32 gradients and fp32 AdamW moments,
  and the bf16 reference: ~20 bytes/parameter. Skipped at a size where its estimate does not fit
  `--memory-limit-gb` (default 80% of MemAvailable), and at `--dtype float32` (no half-precision
  policy to keep fp32 masters of).

Memory per side: VmRSS after load (and the optimizer), the peak while loading (VmHWM), and the peak
over the training steps (VmHWM after resetting it through /proc/self/clear_refs); `peak_gb` is the larger.

**The main command** (`--trace-fit RUN_DIR`): `lowrank-spin fit --config configs/smollm2_spin.yaml`
(plus `--fit-args`) into RUN_DIR, its RSS (and its largest child's, e.g. a GGUF conversion) sampled
every 0.2 s, its output timestamped as it arrives; the phases are cut from what it prints and from the
read-only PhaseProbe callback (spin_phase_probe.py). Per phase: seconds and peak RSS; whole run: wall
seconds and `wait4` ru_maxrss.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
import threading
import time
from pathlib import Path

import report

GiB = 2**30
SIZES = {
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
PAIRS, SEQ_LEN, LORA_RANK = 2, 256, 16
VARIANTS = ("bf16-adamw", "fp32-master")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
MAIN_CONFIG = report.REPO / "configs" / "smollm2_spin.yaml"  # the README's main command


def main() -> None:
    parser = report.parser(__doc__, output="benchmarks/results/memory.json")
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--gradient-checkpointing", action="store_true", help="on both sides")
    parser.add_argument("--memory-limit-gb", type=float, help="skip a two-model side whose estimate exceeds this")
    parser.add_argument("--trace-fit", metavar="RUN_DIR", help="instead: trace the README's main command (above)")
    parser.add_argument(
        "--fit-args", nargs=argparse.REMAINDER, default=[], help="with --trace-fit: more `fit` options, last"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        report.serve_worker(args.worker, lambda s: build_model(s) if s.side == "build" else train_steps(s))
    elif args.trace_fit:
        trace_main(Path(args.trace_fit), args.fit_args, args.output)
    else:
        sizes_main(args)


def bytes_per_parameter(variant: str, dtype: str) -> int:
    """Parameter and optimizer state of a two-model variant, for the fits-in-memory check (10 and 20 at bf16)."""
    size = DTYPE_BYTES[dtype]
    if variant == "bf16-adamw":  # policy, reference, gradients, two AdamW moments, all in `dtype`
        return 5 * size
    return 2 * size + 16  # `dtype` policy and reference; fp32 masters, gradients and two moments


# ---- a training step, ours vs two models: one process per side ---------------------------------------


def sizes_main(args) -> None:
    dtype, reason = report.resolve_dtype(args.dtype)  # the workers get the resolved name
    limit = args.memory_limit_gb or 0.8 * report.mem_available_gb()
    results = {
        "machine": report.machine(args.threads),
        "settings": {k: v for k, v in vars(args).items() if k != "worker"},
        "dtype": dtype,
        "dtype_reason": reason,
        "memory_limit_gb": limit,
        "sizes": {},
    }
    for size in args.sizes:
        results["sizes"][size] = measure_size(size, args, dtype, limit)
    write_sizes_report(results, args.output)


def measure_size(size: str, args, dtype: str, limit: float) -> dict:
    """Build the random model of `size`, then run ours and each two-model side on it, one process each."""
    with tempfile.TemporaryDirectory(prefix="bench_memory.") as workdir:
        settings = {
            "size": size,
            "model_dir": str(Path(workdir) / size),
            "steps": args.steps,
            "dtype": dtype,
            "threads": args.threads,
            "gradient_checkpointing": args.gradient_checkpointing,
        }

        def side(name: str) -> dict:
            stem = Path(workdir) / f"{size}.{name}"
            return report.run_worker(__file__, settings | {"side": name}, stem, args.threads)

        print(f"[{size}] building the random {dtype} model ...", flush=True)
        built = side("build")
        row = {"num_parameters": built["num_parameters"], "build_s": built["seconds"], "ours": side("ours")}
        print(f"[{size}] ours: {json.dumps(row['ours'])}", flush=True)
        for variant in VARIANTS:
            estimate = bytes_per_parameter(variant, dtype) * built["num_parameters"] / GiB
            if variant == "fp32-master" and dtype == "float32":
                row[variant] = {"skipped": "--dtype float32: no half-precision policy to keep fp32 master weights of"}
            elif estimate > limit:
                row[variant] = {
                    "skipped": f"estimated {estimate:.1f} GB of parameter/optimizer state > limit {limit:.1f} GB"
                }
            else:
                row[variant] = side(variant)
                row[f"ratio_ours_over_{variant}"] = row["ours"]["peak_gb"] / row[variant]["peak_gb"]
            print(f"[{size}] {variant}: {json.dumps(row[variant])}", flush=True)
        return row


def build_model(s) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lowrank_spin import models

    start = time.perf_counter()
    dtype = models.DTYPES[s.dtype]
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    model = LlamaForCausalLM(LlamaConfig(**SIZES[s.size]))
    model.config.dtype = dtype
    model.save_pretrained(s.model_dir)
    return {"num_parameters": sum(p.numel() for p in model.parameters()), "seconds": time.perf_counter() - start}


def train_steps(s) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from lowrank_spin import models
    from lowrank_spin.batching import response_logits, sequence_logps
    from lowrank_spin.losses import spin_loss
    from lowrank_spin.settings import LoRASettings

    torch.set_num_threads(s.threads)
    torch.manual_seed(0)
    start = time.perf_counter()
    if s.side == "ours":
        base = models.load_base_model(s.model_dir, load_in_4bit=True, compute_dtype=s.dtype)
        _maybe_checkpointing(base, s)
        policy = models.attach_lora(base, LoRASettings(rank=LORA_RANK, alpha=2 * LORA_RANK))
        trainable = [p for p in policy.parameters() if p.requires_grad]

        @torch.no_grad()
        def opponent_logps(batch):
            policy.eval()
            with models.opponent(policy):  # the opponent adapter of the same model: no second copy
                logits, labels = response_logits(policy, batch)
            policy.train()
            return sequence_logps(logits, labels)
    else:
        load = dict(dtype=models.DTYPES[s.dtype], attn_implementation="sdpa")
        policy = AutoModelForCausalLM.from_pretrained(s.model_dir, **load)
        reference = AutoModelForCausalLM.from_pretrained(s.model_dir, **load).eval().requires_grad_(False)
        _maybe_checkpointing(policy, s)
        trainable = list(policy.parameters())

        @torch.no_grad()
        def opponent_logps(batch):
            logits, labels = response_logits(reference, batch)
            return sequence_logps(logits, labels)

    policy.train()
    if s.side == "fp32-master":
        # bf16 mixed precision: the optimizer updates fp32 master weights; the bf16 policy is a copy of them
        masters = [p.detach().float() for p in trainable]
        optimizer = torch.optim.AdamW(masters, lr=1e-5)
    else:
        optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    _init_optimizer_state(optimizer)  # AdamW allocates its moments lazily: count them in "after load"
    load_s = time.perf_counter() - start
    rss_after_load, load_peak = report.rss_gb()
    file_backed = report.proc_status_gb()["RssFile"]  # weights left memory-mapped from the checkpoint show here

    batch = _random_batch(policy.config.vocab_size)
    report.reset_peak_rss()  # the next peak is the training steps'
    step_seconds, step_losses = [], []
    for _ in range(s.steps):
        start = time.perf_counter()
        opponent_real, opponent_generated = opponent_logps(batch).chunk(2)
        logits, labels = response_logits(policy, batch)
        real, generated = sequence_logps(logits, labels).chunk(2)  # layout: [real; generated]
        loss = spin_loss(real, generated, opponent_real, opponent_generated)[0].mean()
        loss.backward()
        if s.side == "fp32-master":
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
    rss_end, train_peak = report.rss_gb()
    return {
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


def _random_batch(vocab_size: int) -> dict:
    import torch

    from lowrank_spin.batching import IGNORE_INDEX

    input_ids = torch.randint(0, vocab_size, (2 * PAIRS, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    labels = input_ids.clone()
    labels[:, : SEQ_LEN // 2] = IGNORE_INDEX  # the prompt half carries no loss
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


def _maybe_checkpointing(model, s) -> None:
    if s.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()


def write_sizes_report(results: dict, output: str) -> None:
    rows = []
    for size, row in results["sizes"].items():
        params = f"{row['num_parameters'] / 1e6:.0f}M"
        for side in ["ours", *VARIANTS]:
            r = row[side]
            if "skipped" in r:
                rows.append([size, params, f"two-model {side}", f"skipped: {r['skipped']}", "", "", "", ""])
                continue
            ratio = row.get(f"ratio_ours_over_{side}")
            name = "ours (nf4 + LoRA adapters)" if side == "ours" else f"two-model {side}"
            rows.append(
                [size, params, name, f"{r['rss_after_load_gb']:.2f}", f"{r['load_peak_gb']:.2f}"]
                + [f"{r['train_peak_gb']:.2f}", f"{r['peak_gb']:.2f}", f"**{ratio:.2f}x**" if ratio else ""]
            )
    header = ["size", "params", "side", "RSS after load GB", "load peak GB", "train peak GB", "peak GB", "ours / this"]
    lines = [f"dtype: {results['dtype']} ({results['dtype_reason']})", "", *report.table(header, rows)]
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


def trace_main(run_dir: Path, fit_args: list[str], output: str) -> None:
    trace, probe = run_dir / "memory_trace.jsonl", run_dir / "probe.jsonl"
    run_dir.mkdir(parents=True, exist_ok=True)
    probe.unlink(missing_ok=True)
    record_trace([*report.fit_command(run_dir, MAIN_CONFIG, probe), *fit_args], trace)
    events = report.read_jsonl(probe) if probe.exists() else []
    table = trace_phases(report.read_jsonl(trace), events)
    results = {"trace": str(trace), "fit_args": fit_args, "cpu_flags": report.cpu_flags_text(), "phases": table}
    rows = [[row["phase"], f"{row['seconds']:.0f}", f"{row['peak_gb']:.2f}"] for row in table["rows"]]
    rows.append(["whole run (wait4 ru_maxrss)", f"{table['wall_s']:.0f}", f"{table['ru_maxrss_gb']:.2f}"])
    lines = [
        f"CPU flags: {results['cpu_flags']}; trace {trace}",
        "",
        *report.table(["phase", "seconds", "peak RSS GB"], rows),
    ]
    report.write_results(results, "\n".join(lines), output)


def record_trace(command: list[str], trace: Path) -> None:
    """Run `command`; write JSON lines to `trace`: its output fragments (split on \\r and \\n) with their
    arrival time, and every 0.2 s its VmRSS, its largest descendant's, and whether the model cache holds
    a model being built."""
    cache = Path(os.environ.get("LOWRANK_SPIN_CACHE", Path.home() / ".cache" / "lowrank_spin"))
    lock, pending = threading.Lock(), {"buffer": b"", "open": False}
    with open(trace, "w") as out:

        def emit(record: dict) -> None:
            with lock:
                out.write(json.dumps(record) + "\n")
                out.flush()

        def sample(pid: int) -> None:
            kids = max((report.rss_gb(c)[0] for c in report.descendants(pid)), default=0.0)
            building = cache.exists() and any(p.name.startswith(".smollm2-135m-instruct.") for p in cache.iterdir())
            emit({"kind": "rss", "t": time.time(), "gb": report.rss_gb(pid)[0], "kids_gb": kids, "building": building})

        def output(chunk: bytes) -> None:
            parts = re.split(rb"[\r\n]", pending["buffer"] + chunk)
            now = time.time()
            # a progress bar writes "\r<state>": its state counts from when it arrives, not when the next ends it
            for i, part in enumerate(parts):
                if part.strip() and not (i == 0 and pending["open"]):
                    emit({"kind": "out", "t": now, "text": part.decode(errors="replace")[:300]})
            pending["buffer"], pending["open"] = parts[-1], bool(parts[-1].strip())

        emit({"kind": "start", "t": time.time(), "cmd": command})
        run = report.run_child(
            command, Path(f"{trace}.log"), env=report.probe_environment(), sample=sample, every=0.2, on_output=output
        )
        emit({"kind": "end", "t": time.time(), "ru_maxrss_gb": run["peak_rss_gb"]})


def trace_phases(records: list[dict], events: list[dict] = ()) -> dict:
    """Seconds and peak RSS (the process's, or its largest child's while one runs) per phase of a trace,
    per iteration: generation and scoring carry the iteration they generate for, training the one it
    trains, an evaluation the last iteration trained before it ("before training" if none)."""
    start = next(r for r in records if r["kind"] == "start")
    end = next(r for r in records if r["kind"] == "end")
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
    samples = [r for r in records if r["kind"] == "rss" and r["gb"]]
    building_label = "GGUF conversion (in its own process where it has one)"
    for i, (t, name) in enumerate(changes):
        stop = changes[i + 1][0] if i + 1 < len(changes) else end["t"]
        for s in (s for s in samples if t <= s["t"] < stop):
            label = building_label if s["building"] else name
            row = rows.setdefault(label, {"phase": label, "seconds": 0.0, "peak_gb": 0.0})
            row["peak_gb"] = max(row["peak_gb"], s["gb"], s["kids_gb"])
        rows.setdefault(name, {"phase": name, "seconds": 0.0, "peak_gb": 0.0})["seconds"] += stop - t
    building = [s["t"] for s in samples if s["building"]]
    if building:
        rows[building_label]["seconds"] = building[-1] - building[0]
    return {
        "rows": list(rows.values()),
        "wall_s": end["t"] - start["t"],
        "ru_maxrss_gb": end["ru_maxrss_gb"],
        "changes": changes,
    }


if __name__ == "__main__":
    main()
