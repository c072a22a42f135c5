"""Crash safety: a real subprocess SIGKILLed at several points resumes with `--ckpt_path last`, redoes
only the work that was not finished (counted from the resumed process's own logs), and ends where an
uninterrupted run with the same seed ends."""

from __future__ import annotations

import csv
import json
import subprocess

import pytest
import torch
from conftest import fit_args, fit_command, subprocess_env
from safetensors.torch import load_file

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
        want = load_file(uninterrupted / f"iter_{iteration}" / "adapter_model.safetensors")
        have = load_file(tmp_path / f"iter_{iteration}" / "adapter_model.safetensors")
        assert want.keys() == have.keys()
        for name in want:
            torch.testing.assert_close(have[name], want[name], rtol=1e-5, atol=1e-6, msg=name)
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
