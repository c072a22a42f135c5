"""What the benchmark scripts share: their common arguments, the machine they ran on, measuring a child
process (peak RSS from `wait4`, RSS from /proc while it runs), running the real `lowrank-spin fit` CLI with
a timing probe and cutting its run into phases, and writing results as JSON plus a markdown table.

A benchmark measures in fresh processes: its own worker (`run_worker`: the script re-run with `--worker`)
or the unchanged CLI (`run_fit`). The CLI child gets `PhaseProbe` (spin_phase_probe.py), a read-only
Lightning callback added with `--trainer.callbacks+=spin_phase_probe.PhaseProbe`, which writes wall-clock
timestamps and the child's RSS at the fit and iteration boundaries to a jsonl file; together with the
run's metrics CSV (`generation/seconds`, `generation/end_elapsed_seconds`, `time/train_epoch_seconds`,
`train/loss_*`) that splits one iteration into start-up + model load, generation, opponent scoring,
training and the iteration boundary (`phases`).

Nothing heavy is imported at the top (the standard library and `lowrank_spin.settings`): the probe imports
this module inside the measured child.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

from lowrank_spin.settings import AUTO, DTYPE_NAMES

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
BF16_CONFIG = REPO / "configs" / "smollm2_spin_bf16.yaml"
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")  # what decides the dtype and kernels


# ---- arguments and the machine ----------------------------------------------------------------------


def parser(doc: str, output: str | None, threads: bool = True) -> argparse.ArgumentParser:
    """A parser described by the script's docstring, with the options every benchmark takes: `--dtype`
    (default `auto`, see `resolve_dtype`), `--output` (None: print only) and, with `threads`, `--threads`."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument(
        "--dtype",
        default=AUTO,
        choices=[AUTO, *DTYPE_NAMES],
        help="of the base; auto: bf16 where this CPU has native bf16, else float32",
    )
    parser.add_argument("--output", default=output, help="results JSON (with the markdown table in it)")
    if threads:
        parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads, in every process")
    return parser


def resolve_dtype(setting: str) -> tuple[str, str]:
    """(dtype name, reason) for a benchmark's `--dtype`: `models.choose_dtype` on this CPU, printed. `auto` is
    bf16 where this CPU has native bf16, else float32 (an AVX2-only CPU emulates bf16 matmuls, ~50x slower)."""
    from lowrank_spin import models

    dtype, reason = models.choose_dtype(setting, "cpu")
    print(f"dtype: {dtype} ({reason})", flush=True)
    return dtype, reason


def machine(threads: int) -> str:
    import torch

    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, CPU flags {cpu_flags_text()}, "
        f"torch {torch.__version__}, {threads} threads"
    )


def cpu_flags() -> list[str]:
    """Which of CPU_FLAGS this machine's CPU has (from /proc/cpuinfo; empty where it cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))
    return [f for f in CPU_FLAGS if f in flags]


def cpu_flags_text() -> str:
    """`cpu_flags()` for a table or a log line."""
    return " ".join(cpu_flags()) or "none of " + "/".join(CPU_FLAGS)


# ---- memory of a process, from /proc ----------------------------------------------------------------


def proc_status_gb(pid: int | str = "self") -> dict[str, float]:
    """The kB fields of /proc/<pid>/status (VmRSS, VmHWM, RssFile, ...) in GiB; empty once the process is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return {}
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if value.endswith("kB"):
            fields[key] = int(value.split()[0]) / 2**20
    return fields


def rss_gb(pid: int | str = "self") -> tuple[float, float]:
    """(current, peak) resident set size of a process (VmRSS, VmHWM), in GiB; zeros once it is gone."""
    fields = proc_status_gb(pid)
    return fields.get("VmRSS", 0.0), fields.get("VmHWM", 0.0)


def reset_peak_rss() -> None:
    """Reset this process's VmHWM to its current RSS: the next `rss_gb()[1]` is the peak from here on."""
    Path("/proc/self/clear_refs").write_text("5")


def mem_available_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return 16.0


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children, their children, ...)."""
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


# ---- child processes --------------------------------------------------------------------------------


def run_child(
    command: list[str],
    log_path: Path,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    sample: Callable[[int], None] | None = None,
    every: float = 0.5,
    on_output: Callable[[bytes], None] | None = None,
) -> dict:
    """Run `command` in a fresh process to its end, its output into `log_path`; while it runs, a thread calls
    `sample(pid)` every `every` s, and `on_output` gets each piece of its output as it arrives.

    Returns its launch time, wall seconds and peak RSS (the kernel's ru_maxrss, from wait4); raises with
    the last lines of the log when it fails.
    """
    stop = threading.Event()
    launch = time.time()
    with open(log_path, "wb") as log:
        child = subprocess.Popen(
            command, stdout=subprocess.PIPE if on_output else log, stderr=subprocess.STDOUT, env=env, cwd=cwd
        )
        sampler = threading.Thread(target=_sample_until, args=(sample, child.pid, every, stop), daemon=True)
        if sample:
            sampler.start()
        if on_output:
            while chunk := child.stdout.read1(4096):
                log.write(chunk)
                on_output(chunk)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.time() - launch
        stop.set()
        if sample:
            sampler.join()
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        tail = "".join(Path(log_path).read_text(errors="replace").splitlines(keepends=True)[-40:])
        raise RuntimeError(f"{command[:3]} ... exited with {child.returncode}; last lines of {log_path}:\n{tail}")
    return {"launch_time": launch, "wall_s": wall, "peak_rss_gb": usage.ru_maxrss / 2**20}  # Linux: KiB


def _sample_until(sample: Callable[[int], None], pid: int, every: float, stop: threading.Event) -> None:
    while not stop.is_set():
        sample(pid)
        stop.wait(every)


def run_worker(script: str, settings: dict, stem: Path, threads: int, **env: str) -> dict:
    """`python script --worker <stem>.json` in a fresh process with `threads` OpenMP threads: `settings` go in
    `<stem>.json`, the child's `serve_worker` writes its result beside it. Returns that result plus the
    child's launch time, wall seconds and peak RSS (`run_child`)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    path = Path(f"{stem}.json")
    path.write_text(json.dumps(settings))
    environment = dict(os.environ, OMP_NUM_THREADS=str(threads), **env)
    run = run_child([sys.executable, script, "--worker", str(path)], Path(f"{stem}.log"), env=environment)
    return json.loads(path.with_suffix(".result.json").read_text()) | run


def serve_worker(path: str, work: Callable[[SimpleNamespace], dict]) -> None:
    """The child's side of `run_worker`: `work(settings)`, its result written where the parent reads it."""
    result = work(SimpleNamespace(**json.loads(Path(path).read_text())))
    Path(path).with_suffix(".result.json").write_text(json.dumps(result))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


# ---- the `lowrank-spin fit` CLI with the phase probe -------------------------------------------------


def cli_command() -> list[str]:
    script = Path(sys.executable).parent / "lowrank-spin"
    return [str(script)] if script.exists() else [sys.executable, "-m", "lowrank_spin.cli"]


def fit_command(run_dir: Path, config: Path, probe: Path) -> list[str]:
    """`lowrank-spin fit --config <config>` into `run_dir` (its CSV logs too), with the PhaseProbe writing to `probe`."""
    return [
        *cli_command(),
        *("fit", "--config", str(config)),
        *("--trainer.default_root_dir", str(run_dir), "--trainer.logger.init_args.save_dir", str(run_dir)),
        *("--trainer.callbacks+=spin_phase_probe.PhaseProbe", "--trainer.callbacks.path", str(probe)),
    ]


def probe_environment(threads: int | None = None) -> dict[str, str]:
    """This process's environment with benchmarks/ on PYTHONPATH, where the child finds the probe."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(BENCHMARKS), os.environ.get("PYTHONPATH")])))
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def run_fit(
    run_dir: Path,
    overrides: list[str],
    config: Path = BF16_CONFIG,
    threads: int | None = None,
    sample_every: float | None = None,
) -> dict:
    """One `lowrank-spin fit --config config <overrides>` with evaluation off, in a fresh process.

    Returns `run_child`'s wall time and peak RSS, the probe's events, the metrics CSV rows and, with
    `sample_every`, the parent's (time, VmRSS GiB) samples of the child.
    """
    run_dir = Path(run_dir)
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    probe = run_dir / "probe.jsonl"
    command = [
        *fit_command(run_dir, config, probe),
        *("--data.num_val", "0"),  # no evaluation: nothing to score before, between or after iterations
        *("--data.num_test", "0"),  # the train split then equals embedded.task.make_splits(N, 0, 0)["train"]
        *("--data.evaluation.heldout_reward_pairs", "0"),
        *("--trainer.enable_progress_bar", "false"),
        *overrides,
    ]
    samples: list[tuple[float, float]] = []

    def sample(pid: int) -> None:
        if rss := rss_gb(pid)[0]:
            samples.append((time.time(), rss))

    run = run_child(
        command,
        run_dir / "child.log",
        env=probe_environment(threads),
        cwd=REPO,
        sample=sample if sample_every else None,
        every=sample_every or 0.0,
    )
    return run | {
        "command": " ".join(command),
        "events": read_jsonl(probe),
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
    with open(path) as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]


# ---- results ----------------------------------------------------------------------------------------


def table(header: list[str], rows: list[list]) -> list[str]:
    """The lines of a markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def write_results(results: dict, markdown: str, output: str | Path | None) -> None:
    """Print the table and write everything (the table included) to `output`, where one is given."""
    results["markdown"] = markdown
    print(markdown)
    if output:
        output = Path(output)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(results, indent=1))
        print(f"written to {output}")
