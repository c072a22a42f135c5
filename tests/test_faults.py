"""Bad numbers and failed writes: a nan/inf step is skipped and counted, a run that keeps producing
them stops with a message; a write that fails (full disk, read-only folder) stops the run with one
message and leaves what was saved before intact and loadable, and the run resumes from there. A
checkpoint is whole or not there; SIGTERM ends a generation batch at its next token."""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import tempfile

import lightning as L
import pytest
import torch
from conftest import fit_args

from lowrank_spin import faults, files, models
from lowrank_spin.cli import build_cli
from lowrank_spin.generation import generate_responses
from lowrank_spin.module import SelfPlayLoRA
from lowrank_spin.settings import SamplingSettings

# the tiny config: 4 optimizer steps per iteration, 2 iterations


def _poison_steps(monkeypatch, steps: set[int], where: str) -> None:
    """Make the loss (`where="loss"`) or only the gradient (`where="gradient"`: the loss stays finite)
    of the given global steps nan."""
    compute = SelfPlayLoRA._compute_loss

    def poisoned(self, batch):
        loss, metrics = compute(self, batch)
        if self.trainer.global_step in steps:
            if where == "loss":
                loss = loss * float("nan")
            else:  # sqrt at 0: the value 0, the gradient 0 * inf = nan
                lora = next(p for p in self.model.parameters() if p.requires_grad)
                loss = loss + torch.sqrt(lora.sum() * 0)
        return loss, metrics

    monkeypatch.setattr(SelfPlayLoRA, "_compute_loss", poisoned)


class _RecordSteps(L.Callback):
    """Whether each optimizer step moved the trainable weights."""

    def __init__(self):
        self.moved: dict[int, bool] = {}

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self._before = [p.detach().clone() for p in module.model.parameters() if p.requires_grad]

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        after = [p.detach() for p in module.model.parameters() if p.requires_grad]
        self.moved[trainer.global_step - 1] = any(not torch.equal(a, b) for a, b in zip(after, self._before))


@pytest.mark.parametrize("where", ["loss", "gradient"])
def test_a_nonfinite_step_is_skipped_and_counted(where, tmp_path, cache_dir, monkeypatch):
    _poison_steps(monkeypatch, {1, 5}, where)
    recorder = _RecordSteps()
    cli = build_cli(fit_args(tmp_path)[1:], run=False)
    cli.trainer.callbacks.append(recorder)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert recorder.moved == {0: True, 1: False, 2: True, 3: True, 4: True, 5: False, 6: True, 7: True}
    assert cli.model._skipped_steps == 2
    assert all(torch.isfinite(p).all() for p in cli.model.model.parameters())
    assert (tmp_path / "iter_1" / "adapter_model.safetensors").exists()
    logged = (tmp_path / "logs" / "version_0" / "metrics.csv").read_text()
    assert "train/skipped_steps" in logged.splitlines()[0]


def _hashes(root) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        # not the logs, nor a temporary file or folder of a write in progress
        if p.is_file() and "logs" not in p.parts and not any(part.startswith(".") for part in p.relative_to(root).parts)
    }


class _SnapshotAtIteration(L.Callback):
    """The run folder's files (and their hashes) when iteration `iteration` starts training."""

    def __init__(self, root, iteration: int = 1):
        self.root, self.iteration, self.files = root, iteration, None

    def on_train_epoch_start(self, trainer, module):
        if trainer.current_epoch == self.iteration:
            self.files = _hashes(self.root)


def test_a_run_that_keeps_producing_nan_stops_and_touches_nothing_saved(tmp_path, cache_dir, monkeypatch, capsys):
    _poison_steps(monkeypatch, {4, 5, 6, 7}, "loss")  # all of iteration 1
    snapshot = _SnapshotAtIteration(tmp_path)
    cli = build_cli(fit_args(tmp_path, "--model.optimizer.max_nonfinite_steps", "2")[1:], run=False)
    cli.trainer.callbacks.append(snapshot)
    with pytest.raises(SystemExit) as stopped:
        cli.fit(cli.model, datamodule=cli.datamodule)
    assert stopped.value.code == 1
    message = capsys.readouterr().err
    assert "iteration 1, step 5" in message and "2 optimizer step(s) in a row" in message
    assert "model.optimizer.learning_rate" in message and "model.objective.beta" in message
    after = _hashes(tmp_path)
    assert {k: after.get(k) for k in snapshot.files} == snapshot.files, "a file saved before was changed"
    assert "iter_0/adapter_model.safetensors" in snapshot.files
    assert not (tmp_path / "iter_1" / "adapter_model.safetensors").exists()


def _fail_writes(monkeypatch, name: str, code: int, before_failing) -> None:
    """Make fsync of a temporary file whose path contains `name` fail with `code`, as a full disk or
    a read-only folder does, after it was partly written (calling `before_failing` first)."""
    fsync = os.fsync

    def failing(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        if name in path and path.endswith(".tmp"):
            before_failing()
            raise OSError(code, os.strerror(code))
        return fsync(fd)

    monkeypatch.setattr(files.os, "fsync", failing)


def _save_file_fails_in_iteration_1(monkeypatch, code: int, before_failing) -> None:
    save_file = models.save_file

    def failing(state, path, metadata=None):
        if "iter_1" in str(path):
            before_failing()
            with open(path, "wb") as f:
                f.write(b"\0" * 100)  # a torn file, as a full disk leaves
            raise OSError(code, os.strerror(code), str(path))
        return save_file(state, path, metadata=metadata)

    monkeypatch.setattr(models, "save_file", failing)


@pytest.mark.parametrize(
    "fault",
    [
        "adapter: no space",  # saving iteration 1's adapter
        "synthetic: read-only",  # writing iteration 1's synthetic data (after its generation)
    ],
)
def test_a_failed_write_stops_the_run_and_keeps_what_was_saved(fault, tmp_path, cache_dir, monkeypatch, capsys):
    what, _, kind = fault.partition(": ")
    code = errno.ENOSPC if kind == "no space" else errno.EROFS
    saved = {}
    if what == "adapter":
        _save_file_fails_in_iteration_1(monkeypatch, code, lambda: saved.update(_hashes(tmp_path)))
    else:
        _fail_writes(monkeypatch, "iter_1/.synthetic.jsonl.", code, lambda: saved.update(_hashes(tmp_path)))
    cli = build_cli(fit_args(tmp_path)[1:], run=False)
    with pytest.raises(SystemExit) as stopped:
        cli.fit(cli.model, datamodule=cli.datamodule)
    assert stopped.value.code == 1
    message = capsys.readouterr().err
    assert os.strerror(code) in message and "iter_1" in message and "--ckpt_path last" in message
    after = _hashes(tmp_path)
    assert {k: after.get(k) for k in saved} == saved, "a file saved before the failure was changed"
    assert "iter_0/adapter_model.safetensors" in saved and "checkpoints/last.ckpt" in saved
    assert not (tmp_path / "iter_1" / "adapter_model.safetensors").exists(), "no torn adapter left"
    assert not list(tmp_path.rglob("*.tmp")), "no temporary file left"
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["epoch"] == 0, "the last checkpoint is iteration 0's boundary"
    monkeypatch.undo()
    resumed = build_cli(fit_args(tmp_path)[1:], run=False)
    resumed.fit(resumed.model, datamodule=resumed.datamodule, ckpt_path="last")
    assert (tmp_path / "iter_1" / "adapter_model.safetensors").exists()


def test_broken_files_found_at_resume_are_named_and_the_run_recovers(tmp_path, cache_dir):
    """Killed at step 7 (iteration 1) with a step checkpoint at step 6; then the disk tears the newest
    checkpoint and iteration 1's synthetic file. The resume names both, starts from iteration 0's
    boundary checkpoint, generates iteration 1's responses again, and ends with the uninterrupted
    run's adapters."""
    import subprocess

    from conftest import fit_command, subprocess_env
    from safetensors.torch import load_file

    every_2 = ("--step_checkpoint.every_n_train_steps", "2")
    reference, run = tmp_path / "reference", tmp_path / "run"
    assert subprocess.run(fit_command(fit_args(reference, *every_2)), env=subprocess_env(cache_dir)).returncode == 0
    killed = subprocess.run(
        fit_command(fit_args(run, *every_2)), env=subprocess_env(cache_dir, LOWRANK_SPIN_KILL_AT="train_step:7")
    )
    assert killed.returncode == -9
    [step_checkpoint] = (run / "checkpoints").glob("step-*.ckpt")
    assert step_checkpoint.name == "step-6.ckpt"
    step_checkpoint.write_bytes(step_checkpoint.read_bytes()[: step_checkpoint.stat().st_size // 2])
    synthetic = run / "iter_1" / "synthetic.jsonl"
    synthetic.write_text(synthetic.read_text()[: len(synthetic.read_text()) // 2])  # cut mid-row

    resumed = subprocess.run(
        fit_command(fit_args(run, *every_2, "--ckpt_path", "last")),
        env=subprocess_env(cache_dir),
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{step_checkpoint} does not load" in resumed.stderr
    assert f"{synthetic}: line" in resumed.stderr and "the file is broken" in resumed.stderr
    assert (run / "iter_1" / "synthetic.jsonl.broken").exists()
    for iteration in (0, 1):
        want = load_file(reference / f"iter_{iteration}" / "adapter_model.safetensors")
        have = load_file(run / f"iter_{iteration}" / "adapter_model.safetensors")
        for name in want:
            torch.testing.assert_close(have[name], want[name], rtol=1e-5, atol=1e-6, msg=name)
    assert files.read_jsonl(synthetic) == files.read_jsonl(reference / "iter_1" / "synthetic.jsonl")


@pytest.mark.slow
def test_a_second_fit_into_a_live_run_is_refused_and_a_killed_run_blocks_nothing(tmp_path, cache_dir):
    """Two real `fit` processes into one run directory: the second exits at once naming the first's
    process id, writing nothing; once the first is killed (SIGKILL: no clean-up of its own), the
    operating system has released its lock and the resume goes ahead."""
    import signal
    import subprocess
    import time

    from conftest import fit_command, subprocess_env

    env = subprocess_env(cache_dir)
    first = subprocess.Popen(
        fit_command(fit_args(tmp_path, "--model.num_iterations", "40")),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        lock = files.RunDir(tmp_path).lock
        deadline = time.monotonic() + 120
        while not (lock.exists() and lock.read_text().strip() == str(first.pid)):
            assert first.poll() is None and time.monotonic() < deadline, "the first run never took its lock"
            time.sleep(0.2)
        before = sorted(p.name for p in tmp_path.rglob("*") if "logs" not in p.parts)
        second = subprocess.run(
            fit_command(fit_args(tmp_path, "--model.num_iterations", "40", "--ckpt_path", "last", csv_logs=False)),
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert second.returncode == 1, second.stderr[-2000:]
        assert f"is being written by another run, process {first.pid}" in second.stderr
        assert first.poll() is None, "the first run goes on"
        assert not list(tmp_path.glob("checkpoints/*-v1.ckpt")), "no second writer's checkpoints"
        assert set(before) <= {p.name for p in tmp_path.rglob("*") if "logs" not in p.parts}
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    with files.RunDir(tmp_path).writer():  # released by the kill: a resume is not blocked
        assert files.RunDir(tmp_path).lock.read_text().strip() == str(os.getpid())


def test_a_checkpoint_is_written_whole_or_not_at_all(tmp_path, cache_dir, monkeypatch):
    """The CLI's checkpoint IO writes a checkpoint to a temporary name next to it and renames it: a write
    that fails midway (a file-size limit, as a full disk does, 1 MB into 4) raises naming the checkpoint
    and leaves the previous one whole, with no torn file under its name and no temporary file. It needs
    nothing of TMPDIR (Lightning's own IO writes there first, and a move from another filesystem is a
    copy, which a kill can tear)."""
    import resource

    checkpoint_io = build_cli(fit_args(tmp_path)[1:], run=False).trainer.strategy.checkpoint_io
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no such folder"))
    path = tmp_path / "checkpoints" / "last.ckpt"
    checkpoint_io.save_checkpoint({"global_step": 1, "weights": torch.ones(8)}, path)
    saved = path.read_bytes()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    kill = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit a write fails (EFBIG) instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, hard))
    try:
        with pytest.raises(OSError) as failed:
            checkpoint_io.save_checkpoint({"global_step": 2, "weights": torch.ones(2**20)}, path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, kill)
    assert failed.value.errno == errno.EFBIG and failed.value.filename == str(path)
    assert path.read_bytes() == saved
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"], "no torn or temporary file"
    assert torch.load(path, weights_only=True)["global_step"] == 1


def test_sigterm_ends_a_generation_batch_at_its_next_token(tiny_model_dir, tokenizer, tmp_path, monkeypatch):
    """A real SIGTERM to this process at the 50th decoding step of one batch of 8 answers of 800 tokens:
    the batch ends at its next token, not 750 tokens later, and is not kept (a cut answer is not an
    answer); the run stops there (Preempted: status 143)."""
    model = models.load_base_model(tiny_model_dir, dtype="float32")
    forwards = 0  # one per decoding step (the first one over the prompts)

    def sigterm_at_the_50th(module, args, output):
        nonlocal forwards
        forwards += 1
        if forwards == 50:
            os.kill(os.getpid(), signal.SIGTERM)

    model.register_forward_hook(sigterm_at_the_50th)
    monkeypatch.setattr(faults, "_stop_requested", False)
    previous = signal.getsignal(signal.SIGTERM)
    faults.install_sigterm_handler()
    progress = tmp_path / "synthetic.partial.jsonl"
    sampling = SamplingSettings(batch_size=8, max_new_tokens=800, temperature=0.0)
    try:
        with pytest.raises(faults.Preempted) as stopped:
            generate_responses(model, tokenizer, [[5 + i, 6, 7, 8] for i in range(8)], sampling, progress_path=progress)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert stopped.value.code == 143 and stopped.value.point == "generation_batch"
    assert forwards == 50, "no decoding step after the one SIGTERM came in"
    assert progress.read_text() == "", "the cut batch is not kept"
