"""Run the real `lowrank-spin fit` CLI in a subprocess and measure it: used by bench_vs_trl.py and
bench_scaling.py, not a benchmark of its own.

The child is the unchanged console script. `PhaseProbe` (spin_phase_probe.py), a read-only Lightning callback added with
`--trainer.callbacks+=spin_phase_probe.PhaseProbe`, writes wall-clock timestamps and the child's RSS at the
fit and iteration boundaries to a jsonl file; together with the run's metrics CSV (`generation/seconds`,
`generation/end_elapsed_seconds`, `time/train_epoch_seconds`, `train/loss_*`) that splits one iteration
into start-up + model load, generation, opponent scoring, training and the iteration boundary.
The parent reads the child's peak RSS from `os.wait4` and can sample its RSS every `sample_every` s.

`BF16_CONFIG` forces a bf16 base; the callers pass `--model.dtype` resolved by `resolve_dtype` (from their
own `--dtype`, default `auto`), so an AVX2-only CPU, which emulates bf16 matmuls, runs float32 instead.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
BF16_CONFIG = REPO / "configs" / "smollm2_spin_bf16.yaml"
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")  # lowrank_spin.settings' AUTO and DTYPE_NAMES


def resolve_dtype(setting: str) -> tuple[str, str]:
    """(dtype name, reason) for a benchmark's `--dtype`: `models.choose_dtype` on this CPU, printed."""
    from lowrank_spin import models

    dtype, reason = models.choose_dtype(setting, "cpu")
    print(f"dtype: {dtype} ({reason})", flush=True)
    return dtype, reason


def probe_args(path: Path) -> list[str]:
    """The `fit` options that add the PhaseProbe callback, writing its events to `path`."""
    return ["--trainer.callbacks+=spin_phase_probe.PhaseProbe", "--trainer.callbacks.path", str(path)]


def probe_environment() -> dict[str, str]:
    """This process's environment with benchmarks/ on PYTHONPATH, where the child finds the probe."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(BENCHMARKS), os.environ.get("PYTHONPATH")])))


def run_fit(
    run_dir: Path,
    overrides: list[str],
    config: Path = BF16_CONFIG,
    threads: int | None = None,
    sample_every: float | None = None,
) -> dict:
    """One `lowrank-spin fit --config config <overrides>` with evaluation off, in a fresh process.

    Returns the wall time, the child's peak RSS, the probe's events and the metrics CSV rows.
    """
    run_dir = Path(run_dir)
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    probe_path = run_dir / "probe.jsonl"
    args = [
        *_cli_command(),
        "fit",
        "--config",
        str(config),
        "--data.num_val",
        "0",  # no evaluation: nothing to score before, between or after iterations
        "--data.num_test",
        "0",  # the train split then equals embedded.task.make_splits(N, 0, 0)["train"]
        "--data.evaluation.heldout_reward_pairs",
        "0",
        "--trainer.default_root_dir",
        str(run_dir),
        "--trainer.logger.init_args.save_dir",
        str(run_dir),
        "--trainer.enable_progress_bar",
        "false",
        *probe_args(probe_path),
        *overrides,
    ]
    env = probe_environment()
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    log_path = run_dir / "child.log"
    samples: list[tuple[float, int]] = []
    start = time.time()
    with open(log_path, "w") as log:
        child = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        sampler = _RssSampler(child.pid, sample_every, samples) if sample_every else None
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
    wall = time.time() - start
    if sampler:
        sampler.stop()
    if child.returncode != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-40:])
        raise RuntimeError(f"lowrank-spin fit exited with {child.returncode}; last lines of {log_path}:\n{tail}")
    return {
        "command": " ".join(args),
        "launch_time": start,
        "wall_s": wall,
        "peak_rss_gb": usage.ru_maxrss / 2**20,  # Linux: KiB
        "events": [json.loads(line) for line in probe_path.read_text().splitlines()],
        "metrics": read_metrics(run_dir),
        "rss_samples": samples,
        "run_dir": str(run_dir),
    }


def phases(run: dict) -> dict:
    """Per-iteration phase seconds, losses and RSS of a `run_fit` result.

    iteration t: [generation] [scoring] [train epoch] [boundary: save adapter, snapshot, checkpoint,
    reload the dataloader up to the next generation]. The module's clock (`elapsed`) is mapped to wall time.
    """
    events, rows = run["events"], run["metrics"]
    setup = next(e for e in events if e["event"] == "setup")
    fit_start = next(e for e in events if e["event"] == "fit_start")
    fit_end = next(e for e in events if e["event"] == "fit_end")
    starts = [e for e in events if e["event"] == "train_epoch_start"]
    ends = [e for e in events if e["event"] == "train_epoch_end"]
    offset = starts[0]["wall"] - starts[0]["elapsed"]  # wall = offset + module elapsed
    generation = [r for r in rows if r.get("generation/seconds") is not None]
    epoch_seconds = [r["time/train_epoch_seconds"] for r in rows if r.get("time/train_epoch_seconds") is not None]
    generation_start = [offset + g["generation/end_elapsed_seconds"] - g["generation/seconds"] for g in generation]
    iterations = []
    for t, (gen, epoch_start, epoch_end) in enumerate(zip(generation, starts, ends)):
        steps = [r for r in rows if r.get("train/loss_step") is not None and r.get("iteration") == t]
        epoch = next((r for r in rows if r.get("train/loss_epoch") is not None and r.get("epoch") == t), {})
        next_start = generation_start[t + 1] if t + 1 < len(generation_start) else fit_end["wall"]
        iterations.append(
            {
                "iteration": t,
                "generation_s": gen["generation/seconds"],
                "generation_tokens_per_s": gen["generation/tokens_per_second"],
                "generation_unfinished_fraction": gen["generation/unfinished_fraction"],
                # opponent log-probs of real and generated, once per iteration, and writing synthetic.jsonl
                "scoring_s": epoch_start["elapsed"] - gen["generation/end_elapsed_seconds"],
                "train_s": epoch_seconds[t] if t < len(epoch_seconds) else epoch_end["wall"] - epoch_start["wall"],
                "boundary_s": next_start - epoch_end["wall"],
                "train_steps": len(steps),
                "final_step_loss": steps[-1]["train/loss_step"] if steps else None,
                "epoch_mean_loss": epoch.get("train/loss_epoch"),
                "rss_after_scoring_gb": epoch_start["rss_gb"],
                "rss_after_training_gb": epoch_end["rss_gb"],
                "peak_rss_so_far_gb": epoch_end["hwm_gb"],
            }
        )
    return {
        "startup_s": setup["wall"] - run["launch_time"],  # interpreter, imports, CLI parsing, data set-up
        "model_load_s": fit_start["wall"] - setup["wall"],  # load the base, attach LoRA, build the optimizer
        "before_generation_s": generation_start[0] - fit_start["wall"],
        "fit_s": fit_end["wall"] - fit_start["wall"],
        "teardown_s": run["launch_time"] + run["wall_s"] - fit_end["wall"],
        "rss_after_load_gb": fit_start["rss_gb"],
        "iterations": iterations,
    }


def read_metrics(run_dir: Path) -> list[dict]:
    """Rows of the run's CSVLogger metrics.csv, numbers parsed, empty cells dropped."""
    (path,) = Path(run_dir).glob("**/metrics.csv")
    rows = []
    with open(path) as f:
        for row in csv.DictReader(f):
            rows.append({k: float(v) for k, v in row.items() if v not in ("", None)})
    return rows


def rss_gb(pid: int | str = "self") -> tuple[float, float]:
    """(current, peak) resident set size of a process from /proc, in GiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 2**20
    return fields.get("VmRSS", 0.0), fields.get("VmHWM", 0.0)


class _RssSampler:
    """A parent-side thread that reads the child's VmRSS every `every` seconds into `samples`."""

    def __init__(self, pid: int, every: float, samples: list):
        self.pid, self.every, self.samples = pid, every, samples
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append((time.time(), rss_gb(self.pid)[0]))
            except (FileNotFoundError, ProcessLookupError):
                return
            self._stop.wait(self.every)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _cli_command() -> list[str]:
    script = Path(sys.executable).parent / "lowrank-spin"
    return [str(script)] if script.exists() else [sys.executable, "-m", "lowrank_spin.cli"]
