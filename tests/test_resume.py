"""Crash safety: a real subprocess SIGKILLed at several points resumes with `--ckpt_path last`, redoes
only the work that was not finished (counted from the resumed process's own logs), and ends where an
uninterrupted run with the same seed ends. SIGTERM (preemption) stops a real run within seconds, with
a checkpoint of where it stood, so its resume redoes nothing at all."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import time

import lightning as L
import pytest
import torch
from conftest import fit_args, fit_command, subprocess_env
from safetensors.torch import load_file

from lowrank_spin.evaluation import best_iteration
from lowrank_spin.files import RunDir

# The tiny config: 16 prompts in generation batches of 8 (2 per iteration), 4 train steps per epoch.
# Per kill point: what the resumed process must still do, (training steps, generation batches).
KILL_POINTS = {
    # iteration 0, mid-generation (no checkpoint yet): its 2nd batch, then all of iteration 1
    "generation_batch:1": (8, 3),
    # iteration 0's adapter written, its checkpoint not: iteration 0 trains again, its data are kept
    "adapter_saved:1": (8, 2),
    # iteration 1, mid-generation: from iteration 0's checkpoint, 1 batch left
    "generation_batch:3": (4, 1),
    # iteration 1, mid-epoch, no step checkpoint (the default is every 50 steps): the epoch again
    "train_step:6": (4, 0),
    # the same kill with a step checkpoint every 2 steps: from step 6's checkpoint, steps 7 and 8
    "train_step:7 every 2": (2, 0),
    # killed at step 5 (the 1st of iteration 1) with step 4's checkpoint skipped at the epoch's end: from the
    # boundary checkpoint, so iteration 0's snapshot is in place, and iteration 1's 4 steps again
    "train_step:5 every 2": (4, 0),
}


def _kill_args(kill_at: str) -> tuple[str, list[str]]:
    """The fault point of a KILL_POINTS key, and the fit options it runs with."""
    point, _, every = kill_at.partition(" every ")
    return point, (["--step_checkpoint.every_n_train_steps", every] if every else [])


def _fit(run_dir, cache_dir, *options: str, kill_at: str | None = None, resume: bool = False) -> int:
    env = subprocess_env(cache_dir, **({"LOWRANK_SPIN_KILL_AT": kill_at} if kill_at else {}))
    args = fit_command(fit_args(run_dir, *options, *(["--ckpt_path", "last"] if resume else [])))
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=300).returncode


def _synthetic(run_dir, iteration):
    return [json.loads(line) for line in (run_dir / f"iter_{iteration}" / "synthetic.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache_dir, tiny_model_dir):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    assert _fit(run_dir, cache_dir) == 0
    return run_dir


@pytest.fixture(scope="module")
def reference(uninterrupted, tmp_path_factory, cache_dir):
    """The uninterrupted run with the given fit options (each run once per module)."""
    runs = {(): uninterrupted}

    def run(*options: str):
        if options not in runs:
            runs[options] = tmp_path_factory.mktemp("reference")
            assert _fit(runs[options], cache_dir, *options) == 0
        return runs[options]

    return run


def _assert_same_adapters(expected_run, run, iterations) -> None:
    for iteration in iterations:
        want = load_file(expected_run / f"iter_{iteration}" / "adapter_model.safetensors")
        have = load_file(run / f"iter_{iteration}" / "adapter_model.safetensors")
        assert want.keys() == have.keys()
        for name in want:
            torch.testing.assert_close(have[name], want[name], rtol=1e-5, atol=1e-6, msg=name)


def _work_done(run_dir, version: int) -> tuple[int, int]:
    """(training steps, generation batches) that the process writing logs/version_<version> executed."""
    with open(run_dir / "logs" / f"version_{version}" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    steps = sum(1 for r in rows if r.get("train/loss_step"))
    return steps, sum(int(float(r["generation/batches"])) for r in rows if r.get("generation/batches"))


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", KILL_POINTS)
def test_killed_run_resumes_to_the_same_adapters(kill_at, uninterrupted, tmp_path, cache_dir):
    point, options = _kill_args(kill_at)
    assert _fit(tmp_path, cache_dir, *options, kill_at=point) == -9, "the fault point was not reached"
    assert not (tmp_path / "iter_1" / "adapter_model.safetensors").exists()
    assert _fit(tmp_path, cache_dir, *options, resume=True) == 0
    assert _work_done(tmp_path, version=1) == KILL_POINTS[kill_at], "the resumed run redid finished work"
    for iteration in (0, 1):
        expected, got = _synthetic(uninterrupted, iteration), _synthetic(tmp_path, iteration)
        assert len({r["prompt"] for r in got}) == len(got) == 16, "each prompt exactly once"
        assert [r["generated"] for r in got] == [r["generated"] for r in expected]
        assert not (tmp_path / f"iter_{iteration}" / "synthetic.partial.jsonl").exists()
    _assert_same_adapters(uninterrupted, tmp_path, (0, 1))
    assert [r["iteration"] for r in json.loads((tmp_path / "results.json").read_text())] == [-1, 0, 1]


@pytest.mark.slow
def test_resuming_a_finished_run_does_nothing(uninterrupted, tmp_path, cache_dir):
    import shutil

    shutil.copytree(uninterrupted, tmp_path / "run")
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    assert _fit(tmp_path / "run", cache_dir, resume=True) == 0
    assert not (tmp_path / "run" / "iter_2").exists(), "no generation for an iteration past the last"
    assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()} == before


@pytest.mark.slow
def test_sigterm_stops_at_the_next_safe_point_within_seconds(tmp_path, cache_dir, tiny_model_dir):
    """SIGTERM mid-generation: the process exits (143) right after the batch it is on, with that batch
    flushed, and a resume finishes the run."""
    import signal
    import time

    env = subprocess_env(cache_dir)
    args = fit_command(fit_args(tmp_path, "--data.sampling.batch_size", "1", "--model.num_iterations", "1"))
    process = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    progress = tmp_path / "iter_0" / "synthetic.partial.jsonl"
    deadline = time.time() + 120
    while not (progress.exists() and progress.read_text().count("\n") >= 2) and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    sent = time.time()
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143, stderr[-2000:]
    assert time.time() - sent < 10, "SIGTERM must stop the run within seconds"
    assert "stopping at a safe point (generation_batch)" in stderr
    flushed = progress.read_text().splitlines()
    assert 2 <= len(flushed) < 16 and all(json.loads(line) for line in flushed), "only whole batches, and not all"
    assert not (tmp_path / "iter_0" / "synthetic.jsonl").exists()
    resumed = subprocess.run(args + ["--ckpt_path", "last"], env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert len({row["prompt"] for row in _synthetic(tmp_path, 0)}) == 16
    assert _work_done(tmp_path, version=1)[1] == 16 - len(flushed), "the flushed batches are not generated again"


class Paced(L.Callback):
    """For the SIGTERM tests, in the run's own process (`--trainer.callbacks`): says on stdout when each
    training batch and epoch has ended (before the run's own callbacks act on it), then waits `seconds`
    after each batch, so that a signal sent on reading the line arrives before the run goes on."""

    def __init__(self, seconds: float = 0.0):
        self.seconds, self.batches = seconds, 0

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.batches += 1
        print(f"paced: batch {self.batches} ended", flush=True)
        time.sleep(self.seconds)

    def on_train_epoch_end(self, trainer, module):
        print(f"paced: epoch {trainer.current_epoch} ended", flush=True)


def _sigterm_at(run_dir, cache_dir, line: str, *options: str, seconds: float = 0.0) -> tuple[int, float, str]:
    """Run `fit` with `options` in its own process, send that process SIGTERM once it prints `line`
    (`Paced`); returns its exit status, the seconds from the signal to its exit, and its stderr."""
    tests = os.path.dirname(os.path.abspath(__file__))
    env = subprocess_env(cache_dir, PYTHONPATH=os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")])))
    paced = json.dumps({"class_path": "test_resume.Paced", "init_args": {"seconds": seconds}})
    args = fit_command(fit_args(run_dir, *options, f"--trainer.callbacks+={paced}"))
    with open(run_dir / "stderr.txt", "w") as stderr:
        process = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)
        try:
            for printed in process.stdout:
                if printed.strip() == line:
                    break
            process.send_signal(signal.SIGTERM)
            sent = time.monotonic()
            process.communicate(timeout=120)
            seconds_to_exit = time.monotonic() - sent
        finally:
            process.kill()
            process.wait()
    return process.returncode, seconds_to_exit, (run_dir / "stderr.txt").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("accumulate", [1, 2], ids=["1 batch a step", "2 batches a step"])
def test_sigterm_mid_iteration_checkpoints_its_step_and_the_resume_redoes_none(
    accumulate, reference, tmp_path, cache_dir
):
    """SIGTERM while iteration 1 trains, its 1st batch just ended (no step checkpoint due: the default is
    every 50 steps): the run writes a checkpoint at the end of the optimizer step it is on and exits 143
    within seconds; the resume trains only the batches after it (counted) and ends with the uninterrupted
    run's adapters. With 2 batches a step the signal comes mid-step, so the run finishes that step first:
    its gradients are in memory only."""
    options = ("--trainer.accumulate_grad_batches", str(accumulate)) if accumulate > 1 else ()
    status, seconds, stderr = _sigterm_at(tmp_path, cache_dir, "paced: batch 5 ended", *options, seconds=0.5)
    assert status == 143, stderr[-3000:]
    assert seconds < 10, "SIGTERM must stop the run within seconds"
    # 4 batches an epoch: the stop comes at the end of batch 5 (step 5), or of batch 6 (step 3 of 2 batches)
    batches_done = 5 if accumulate == 1 else 6
    [checkpoint] = (tmp_path / "checkpoints").glob("step-*.ckpt")
    assert checkpoint.name == f"step-{batches_done // accumulate}.ckpt"
    assert f"stopping at a safe point (train_step); wrote {checkpoint}" in stderr
    assert _fit(tmp_path, cache_dir, *options, resume=True) == 0
    steps_left = (8 - batches_done) // accumulate
    assert _work_done(tmp_path, version=1) == (steps_left, 0), "the resumed run redid finished steps"
    _assert_same_adapters(reference(*options), tmp_path, (0, 1))


def _evaluated(run_dir, version: int) -> list[int]:
    """The iterations that the process writing logs/version_<version> evaluated, in order."""
    with open(run_dir / "logs" / f"version_{version}" / "metrics.csv") as f:
        return [int(float(r["eval/iteration"])) for r in csv.DictReader(f) if r.get("eval/iteration")]


@pytest.mark.slow
@pytest.mark.parametrize("num_iterations", [2, 1], ids=["then iteration 1", "the last iteration"])
def test_sigterm_during_a_boundary_evaluation_abandons_it_and_the_resume_does_it_first(
    num_iterations, uninterrupted, tmp_path, cache_dir
):
    """SIGTERM as iteration 0's boundary starts, its evaluation long enough to be still running (400
    greedy tokens a prompt): the evaluation is abandoned, the boundary's checkpoint written, and the run
    exits 143 within seconds (that a batch stops at its next token is test_faults.py's). The resume
    evaluates iteration 0 first (its held-out rewards, which need iteration 0's opponent, come from the
    checkpoint), then trains and generates only what is left: nothing of iteration 0 again."""
    options = ("--model.num_iterations", str(num_iterations), "--data.evaluation.max_new_tokens", "400")
    status, seconds, stderr = _sigterm_at(tmp_path, cache_dir, "paced: epoch 0 ended", *options)
    assert status == 143, stderr[-3000:]
    assert seconds < 10, "SIGTERM must stop the run within seconds"
    results = RunDir(tmp_path).read_results()
    assert list(results) == [RunDir.BEFORE], "iteration 0's evaluation was abandoned"
    assert "the evaluation of iteration 0 is abandoned" in stderr
    assert f"stopping at a safe point (epoch_end); wrote {tmp_path / 'checkpoints' / 'last.ckpt'}" in stderr
    assert (tmp_path / "iter_0" / "adapter_model.safetensors").exists()

    assert _fit(tmp_path, cache_dir, *options, resume=True) == 0
    assert _evaluated(tmp_path, version=1) == list(range(num_iterations)), "iteration 0 first"
    left = (4, 2) if num_iterations == 2 else (0, 0)  # iteration 1's steps and generation batches
    assert _work_done(tmp_path, version=1) == left, "the resumed run redid finished work"
    results = RunDir(tmp_path).read_results()
    assert list(results) == [RunDir.BEFORE, *range(num_iterations)]
    assert results[0]["reward_accuracy"] is not None
    best = RunDir(tmp_path).read_best()
    assert best["iteration"] == best_iteration(results, best["metric"])
    assert RunDir(tmp_path).finished(num_iterations)
    _assert_same_adapters(uninterrupted, tmp_path, range(num_iterations))
