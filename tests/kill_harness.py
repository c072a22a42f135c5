"""A random-time kill harness (issue 18): SIGKILL runs of the tiny config at times drawn uniformly over an
uninterrupted run's whole life, resume each with `--ckpt_path last`, and check that it ends where the
uninterrupted run ends.

    .venv/bin/python tests/kill_harness.py --kills 10 --seed 0 --out runs/kill_harness

First one uninterrupted reference run, timed (T) and its phases recorded by polling its run directory.
Then per trial, in a fresh run directory with a fresh, empty model cache (so start-up includes building
the embedded tiny model, the tiny config's stand-in for SmolLM2's GGUF conversion): a kill at a time
drawn uniformly in (0, T) with a seeded RNG, the phase it hit read from the files the killed run left,
then resumes with `--ckpt_path last` until one exits 0 (at most `MAX_RESUMES`). Checks, against the
reference run:
- every iteration's adapter: `torch.testing.assert_close(rtol=1e-5, atol=1e-6)`, as tests/test_resume.py;
- every iteration's synthetic.jsonl: each training prompt exactly once, the same generated responses,
  and no synthetic.partial.jsonl left;
- results.json: one row per evaluated model, iterations [-1, 0, ..., n-1].
Prints a table, writes it with the timeline to kill_harness.json under --out, and exits 1 if any
check fails. `run_harness` is the same, as a function (tests/test_kill_harness.py runs it in CI).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from conftest import fit_args, fit_command, subprocess_env
from safetensors.torch import load_file

from lowrank_spin.files import RunDir, read_jsonl
from lowrank_spin.models import ADAPTER_WEIGHTS, TINY_LLAMA

RTOL, ATOL = 1e-5, 1e-6  # the adapters' tolerance, as in tests/test_resume.py
MAX_RESUMES = 3  # a resume that exits non-zero fails the trial; the next one shows whether it recovers
POLL_SECONDS = 0.02  # how often the reference run's directory is read for its timeline


@dataclass(frozen=True)
class Workload:
    """The run every trial repeats: the tiny config (configs/tiny_spin.yaml) with these overrides."""

    num_iterations: int = 3
    num_train: int = 48
    # a step checkpoint every 2 optimizer steps, so kills mid-iteration resume from a step
    options: tuple[str, ...] = ("--step_checkpoint.every_n_train_steps", "2")

    def args(self, run_dir: Path, *more: str) -> list[str]:
        """The `fit` arguments of this workload into `run_dir`."""
        sizes = ["--model.num_iterations", str(self.num_iterations), "--data.num_train", str(self.num_train)]
        return fit_args(run_dir, *sizes, *self.options, *more)


@dataclass
class Trial:
    """One kill and its resumes: what was hit, and what the checks found."""

    trial: int
    kill_s: float  # drawn in (0, T)
    kill_share: float  # kill_s / T
    phase: str = ""  # read from the killed run's files
    reference_phase: str = ""  # the reference run's phase at kill_s (its timeline)
    killed_rc: int | None = None  # -9 when the kill landed, 0 when the run had finished before it
    torn_checkpoints: list[str] = field(default_factory=list)  # left by the kill, not loadable
    resumed_from: str = ""  # <checkpoint>@<step> the resume starts from (`--ckpt_path last`'s pick)
    resume_rcs: list[int] = field(default_factory=list)
    resume_s: float = 0.0
    max_adapter_diff: float | None = None
    adapters_ok: bool = False
    rows_ok: bool = False
    results_ok: bool = False
    leftovers: list[str] = field(default_factory=list)  # temporary files a kill left (not a failure)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        resumed = bool(self.resume_rcs) and set(self.resume_rcs) == {0}
        return resumed and self.adapters_ok and self.rows_ok and self.results_ok and not self.problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=10, help="trials, one random kill each")
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill times")
    parser.add_argument("--out", type=Path, default=Path("runs/kill_harness"))
    parser.add_argument("--num_iterations", type=int, default=Workload.num_iterations)
    parser.add_argument("--num_train", type=int, default=Workload.num_train)
    parser.add_argument(
        "--options",
        nargs=argparse.REMAINDER,
        default=list(Workload.options),
        help="further `fit` options, all after this flag (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    workload = Workload(args.num_iterations, args.num_train, tuple(args.options))
    progress = lambda line: print(line, file=sys.stderr, flush=True)
    report = run_harness(args.out, kills=args.kills, seed=args.seed, workload=workload, log=progress)
    print(format_table(report))
    print(f"written: {args.out / 'kill_harness.json'}")
    return 0 if report["ok"] else 1


def run_harness(out: str | Path, kills: int = 10, seed: int = 0, workload: Workload = Workload(), log=print) -> dict:
    """The reference run, then `kills` trials (kill at a seeded uniform time in (0, T), resume, check);
    returns the report (also written to `out`/kill_harness.json) whose `ok` says whether every check passed.

    `out` gets reference/ and trial_<i>/ folders (run directory, model cache, each process's log);
    those of an earlier harness run there are removed first."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for old in [out / "reference", *out.glob("trial_*")]:
        shutil.rmtree(old, ignore_errors=True)
    started = time.monotonic()
    reference, seconds, timeline = reference_run(out / "reference", workload)
    log(f"reference run: {seconds:.1f} s; " + ", ".join(f"{p['phase']} @{p['start_s']:.2f}" for p in timeline))
    log(HEADER)
    rng = random.Random(seed)
    trials = []
    for number in range(kills):
        kill_s = rng.uniform(0, seconds)
        trial = Trial(number, kill_s, kill_s / seconds, reference_phase=phase_at(timeline, kill_s))
        run_trial(trial, out / f"trial_{number}", reference, workload, timeout=max(300.0, 20 * seconds))
        trials.append(trial)
        log(format_row(trial))
    report = {
        "ok": all(t.ok for t in trials),
        "kills": kills,
        "seed": seed,
        "workload": asdict(workload),
        "tolerance": {"rtol": RTOL, "atol": ATOL},
        "reference": {"seconds": seconds, "timeline": timeline},
        "trials": [asdict(t) | {"ok": t.ok} for t in trials],
        "harness_seconds": time.monotonic() - started,
    }
    (out / "kill_harness.json").write_text(json.dumps(report, indent=1))
    return report


def reference_run(folder: Path, workload: Workload) -> tuple[Path, float, list[dict]]:
    """The uninterrupted run: its run directory, its wall time T, and its timeline, [{phase, start_s}]
    in order (its directory read every POLL_SECONDS, so phases shorter than that may be missed)."""
    run_dir, cache = folder / "run", folder / "cache"
    cache.mkdir(parents=True)
    with open(folder / "fit.log", "w") as output:
        process = _start(workload.args(run_dir), cache, output)
        start, timeline = time.monotonic(), []
        while process.poll() is None:
            phase = phase_of(run_dir, cache, workload)
            if not timeline or timeline[-1]["phase"] != phase:
                timeline.append({"phase": phase, "start_s": time.monotonic() - start})
            time.sleep(POLL_SECONDS)
        seconds = time.monotonic() - start
    if process.returncode != 0:
        raise RuntimeError(f"the reference run exited {process.returncode}; see {folder / 'fit.log'}")
    return run_dir, seconds, timeline


def run_trial(trial: Trial, folder: Path, reference: Path, workload: Workload, timeout: float) -> None:
    """Kill a fresh run at `trial.kill_s`, read the phase it hit, resume it until it exits 0, check it
    against `reference`; fills in `trial`, returns None."""
    run_dir, cache = folder / "run", folder / "cache"
    cache.mkdir(parents=True)
    with open(folder / "killed.log", "w") as output:
        process = _start(workload.args(run_dir), cache, output)
        deadline = time.monotonic() + trial.kill_s
        while process.poll() is None and time.monotonic() < deadline:
            time.sleep(min(POLL_SECONDS, max(0.0, deadline - time.monotonic())))
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)  # its own session: the run and anything it started
        trial.killed_rc = process.wait()
    trial.phase = phase_of(run_dir, cache, workload) if trial.killed_rc == -signal.SIGKILL else "finished"
    if trial.killed_rc not in (0, -signal.SIGKILL):
        trial.phase = "crashed"
        trial.problems.append(f"the run exited {trial.killed_rc} before the kill: {_tail(folder / 'killed.log')}")
    trial.torn_checkpoints, trial.resumed_from = _checkpoints(RunDir(run_dir).checkpoints)
    start = time.monotonic()
    for attempt in range(1, MAX_RESUMES + 1):
        log_path = folder / f"resume_{attempt}.log"
        with open(log_path, "w") as output:
            process = _start(workload.args(run_dir, "--ckpt_path", "last"), cache, output)
            try:
                trial.resume_rcs.append(process.wait(timeout=timeout))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                trial.resume_rcs.append(process.wait())
        if trial.resume_rcs[-1] == 0:
            break
        trial.problems.append(f"resume {attempt} exited {trial.resume_rcs[-1]}: {_tail(log_path)}")
    if "nothing to resume" in (folder / "resume_1.log").read_text(errors="replace"):
        trial.resumed_from = "nothing (finished)"
    trial.resume_s = time.monotonic() - start
    check_run(trial, run_dir, reference, workload)
    trial.leftovers += [f"cache/{p.name}" for p in cache.glob(".*")]  # a model build the kill cut short


def _start(args: list[str], cache: Path, output) -> subprocess.Popen:
    """`lowrank-spin <args>` in a new session (so a kill reaches everything it starts), one thread."""
    return subprocess.Popen(
        fit_command(args),
        env=subprocess_env(str(cache)),
        stdout=output,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


# ---- the phase a run is in, from its files ---------------------------------------------------------------


def phase_of(run_dir: Path, cache: Path, workload: Workload) -> str:
    """The phase of a run, read from what it has written (RunDir's layout) and from the model cache.

    A run writes, in this order: the embedded model into the cache (a `.<name>.*` folder renamed into
    place); per iteration t, iter_t/synthetic.partial.jsonl (opened when generation starts, a line per
    generated prompt, flushed per batch), iter_t/synthetic.jsonl once the opponent has scored them
    (iteration 0's is followed by the initial model's evaluation, results row -1), step checkpoints while
    training, iter_t/adapter_model.safetensors at the iteration's end, then its evaluation (results row
    t, best/), then the boundary checkpoint `epoch=t-step=*.ckpt` (its copy to last*.ckpt counts as the
    next phase). A phase is named by the first of these that is missing:

    start-up (imports, the CLI), model build, model load (set-up, LoRA, tokenising, until generation 0
    starts), generation t, scoring t (every prompt generated, synthetic.jsonl not written yet),
    evaluation before, training t, saving/evaluation t (adapter written: held-out rewards, opponent
    snapshot, evaluation), checkpoint t (results row t written: best/, the boundary checkpoint), exit.
    """
    model = cache / TINY_LLAMA
    if not (model / "config.json").exists():
        return "model build" if any(cache.glob(f".{TINY_LLAMA}.*")) else "start-up"
    run = RunDir(run_dir)
    results = run.read_results()
    for t in range(workload.num_iterations):
        if not run.synthetic(t).exists():
            progress = run.generation_progress(t)
            if not progress.exists():
                return "model load" if t == 0 else f"generation {t}"
            try:
                generated = progress.read_bytes().count(b"\n")
            except FileNotFoundError:  # removed since: synthetic.jsonl was just written
                generated = workload.num_train
            return f"generation {t}" if generated < workload.num_train else f"scoring {t}"
        if t == 0 and RunDir.BEFORE not in results:
            return "evaluation before"
        if not (run.iteration(t) / ADAPTER_WEIGHTS).exists():
            return f"training {t}"
        if t not in results:
            return f"saving/evaluation {t}"
        if _last_boundary_checkpoint(run) < t:
            return f"checkpoint {t}"
    return "exit"


def phase_at(timeline: list[dict], seconds: float) -> str:
    """The phase a timeline was in at `seconds`."""
    return [p["phase"] for p in timeline if p["start_s"] <= seconds][-1] if timeline else "start-up"


def _last_boundary_checkpoint(run: RunDir) -> int:
    """The latest iteration with a boundary checkpoint (`epoch=<t>-step=<s>.ckpt`, one epoch per
    iteration in the tiny config), -1 when none."""
    epochs = [re.match(r"epoch=(\d+)-", p.name) for p in run.checkpoints.glob("epoch=*.ckpt")]
    return max((int(m.group(1)) for m in epochs if m), default=-1)


def _checkpoints(directory: Path) -> tuple[list[str], str]:
    """The checkpoints in `directory` that do not load, and the one a resume starts from, with its step
    (`cli.last_good_checkpoint`'s choice: the furthest step, then the newest), or "start" when none loads."""
    torn, found = [], []
    for path in sorted(directory.glob("*.ckpt")):
        try:
            step = torch.load(path, map_location="cpu", weights_only=False, mmap=True)["global_step"]
        except Exception:
            torn.append(path.name)
            continue
        found.append((step, path.stat().st_mtime, path.name))
    step, _, name = max(found, default=(None, None, None))
    return torn, f"{name}@{step}" if name else "start"


# ---- the checks ----------------------------------------------------------------------------------------------


def check_run(trial: Trial, run_dir: Path, reference: Path, workload: Workload) -> None:
    """Compare a resumed run with the reference run: adapters, synthetic rows, results; fills in
    `trial`'s checks and problems, returns None."""
    run, want = RunDir(run_dir), RunDir(reference)
    trial.adapters_ok, trial.max_adapter_diff = True, 0.0
    trial.rows_ok = True
    for t in range(workload.num_iterations):
        adapter = run.iteration(t) / ADAPTER_WEIGHTS
        if not adapter.exists():
            trial.adapters_ok = False
            trial.problems.append(f"iteration {t}: no adapter")
        else:
            expected, got = load_file(want.iteration(t) / ADAPTER_WEIGHTS), load_file(adapter)
            if expected.keys() != got.keys():
                trial.adapters_ok = False
                trial.problems.append(f"iteration {t}: adapter tensors {sorted(got)} != {sorted(expected)}")
            for name in expected.keys() & got.keys():
                diff = (got[name] - expected[name]).abs().max().item()
                trial.max_adapter_diff = max(trial.max_adapter_diff, diff)
                try:
                    torch.testing.assert_close(got[name], expected[name], rtol=RTOL, atol=ATOL)
                except AssertionError:
                    trial.adapters_ok = False
                    trial.problems.append(f"iteration {t}: {name} differs by up to {diff:.3g}")
        if problem := _rows_problem(run, want, t, workload.num_train):
            trial.rows_ok = False
            trial.problems.append(f"iteration {t}: {problem}")
    iterations = [row["iteration"] for row in json.loads(run.results.read_text())] if run.results.exists() else []
    expected_iterations = [RunDir.BEFORE, *range(workload.num_iterations)]
    trial.results_ok = iterations == expected_iterations
    if not trial.results_ok:
        trial.problems.append(f"results.json iterations {iterations}, expected {expected_iterations}")
    trial.leftovers = sorted(
        str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.name.startswith(".") or p.name.endswith(".broken")
    )


def _rows_problem(run: RunDir, want: RunDir, iteration: int, num_prompts: int) -> str | None:
    """What is wrong with `iteration`'s synthetic rows (lost, duplicated, different from the reference's,
    a progress file left), or None."""
    leftover = sorted(p.name for p in run.iteration(iteration).glob("synthetic.partial*"))
    if leftover:
        return f"{leftover} left behind"
    if not run.synthetic(iteration).exists():
        return "no synthetic.jsonl"
    rows, expected = read_jsonl(run.synthetic(iteration)), read_jsonl(want.synthetic(iteration))
    prompts = [row["prompt"] for row in rows]
    if len(rows) != num_prompts or len(set(prompts)) != len(rows):
        return f"{len(rows)} rows, {len(set(prompts))} distinct prompts; expected each of {num_prompts} once"
    if prompts != [row["prompt"] for row in expected]:
        return "the prompts differ from the reference run's"
    differ = sum(a["generated"] != b["generated"] for a, b in zip(rows, expected))
    return f"{differ} generated responses differ from the reference run's" if differ else None


def _tail(path: Path, lines: int = 12) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


# ---- the report ----------------------------------------------------------------------------------------------

HEADER = (
    f"{'trial':>5} {'kill s':>7} {'of T':>5}  {'phase hit':<20} {'reference phase':<20} "
    f"{'resumed from':<24} {'resume rc':<9} {'max|Δadapter|':>13} {'rows':>4} {'results':>7} {'resume s':>8}"
)


def format_row(trial: Trial) -> str:
    diff = "n/a" if trial.max_adapter_diff is None else f"{trial.max_adapter_diff:.1e}"
    return (
        f"{trial.trial:>5} {trial.kill_s:>7.2f} {trial.kill_share:>5.2f}  {trial.phase:<20} "
        f"{trial.reference_phase:<20} {trial.resumed_from:<24} {','.join(map(str, trial.resume_rcs)):<9} {diff:>13} "
        f"{'ok' if trial.rows_ok else 'FAIL':>4} {'ok' if trial.results_ok else 'FAIL':>7} {trial.resume_s:>8.1f}"
    )


def format_table(report: dict) -> str:
    """The trials as a table, then the problems found and the verdict."""
    trials = [Trial(**{k: v for k, v in t.items() if k != "ok"}) for t in report["trials"]]
    reference = report["reference"]
    lines = [
        f"reference run: {reference['seconds']:.1f} s (T); workload {report['workload']}",
        "its timeline: " + ", ".join(f"{p['phase']} @{p['start_s']:.2f}" for p in reference["timeline"]),
        f"adapters compared with rtol={report['tolerance']['rtol']}, atol={report['tolerance']['atol']}",
        HEADER,
        *map(format_row, trials),
    ]
    for trial in trials:
        notes = [*trial.problems]
        notes += [f"torn checkpoints after the kill: {trial.torn_checkpoints}"] if trial.torn_checkpoints else []
        notes += [f"left behind (harmless): {trial.leftovers}"] if trial.leftovers else []
        lines += [f"trial {trial.trial}: {note}" for note in notes]
    failed = sum(not t.ok for t in trials)
    verdict = f"FAILED: {failed} of {len(trials)} trials" if failed else f"all {len(trials)} trials passed"
    lines.append(f"{verdict}; harness wall time {report['harness_seconds']:.0f} s")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
