"""What a run writes and where: `RunDir` names every path; files are written to a temporary name and
renamed, so a kill never leaves a half-written file that a resumed run would trust."""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import secrets
import shutil
from pathlib import Path

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins import TorchCheckpointIO


class RunInUse(RuntimeError):
    """Another live process holds the run directory's lock (`RunDir.writer`)."""


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename (`write_bytes_atomic`); returns None."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: Path, data: bytes | memoryview) -> None:
    """Write `data` to `path` through a temporary file in the same folder, fsynced, and a rename; returns None.

    A failed write (full disk, read-only folder) raises OSError with `path` as its filename, removes
    the temporary file and leaves any earlier `path` as it was."""
    # a temporary name of its own, so concurrent writers (e.g. DDP ranks) never rename each other's file;
    # created with the permissions `open` gives a new file (the umask applies), not a private temp file's
    temporary = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    f = open(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb")
    try:
        with f:  # (closing flushes too, and can fail as well)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as error:
        os.unlink(temporary)
        raise OSError(error.errno, error.strerror, str(path)) from error
    os.replace(temporary, path)
    # the rename itself survives a power cut once the folder's entry is on disk (not every filesystem
    # can fsync a folder: the file is in place either way)
    with contextlib.suppress(OSError):
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO, except that a local checkpoint is serialised in memory, written to a
    temporary name in its folder, fsynced and renamed over its name (`write_bytes_atomic`): a kill or a
    full disk mid-write leaves the previous checkpoint whole and no torn file under a checkpoint's name.
    The CLI installs it for every strategy that saves checkpoint files (not DeepSpeed, which writes folders
    of its own); remote paths go through Lightning's own writer."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)  # (as Lightning does: nothing touches the disk until it is whole)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(path, buffer.getbuffer())


def write_jsonl_atomic(rows: list[dict], path: Path) -> None:
    """Write one JSON object per line to `path`, atomically; returns None."""
    write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


class BrokenFile(ValueError):
    """A file the run wrote earlier does not read back (torn by a full disk, say): names it and the line."""

    def __init__(self, path: Path, line: int, reason: str):
        super().__init__(f"{path}: line {line}: {reason}")
        self.path, self.line, self.reason = Path(path), line, reason


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a jsonl file (blank lines skipped); raises BrokenFile at the first line that is not JSON."""
    rows = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise BrokenFile(path, number, error.msg) from error
    return rows


class RunDir:
    """Where a run keeps what it writes, under `trainer.default_root_dir`: the only place paths are built.

    `before/` and `iter_<t>/` per evaluated model (adapter, synthetic data, evaluation samples),
    `results.json`, `checkpoints/`, `data/` (the embedded task's splits).
    """

    BEFORE = -1  # the results row and folder of the initial model, before iteration 0

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def iteration(self, iteration: int) -> Path:
        """The folder of `iteration` (`before/` for RunDir.BEFORE)."""
        return self.root / ("before" if iteration == self.BEFORE else f"iter_{iteration}")

    def synthetic(self, iteration: int) -> Path:
        """The finished synthetic data of `iteration`."""
        return self.iteration(iteration) / "synthetic.jsonl"

    def generation_progress(self, iteration: int, rank: int = 0, world_size: int = 1) -> Path:
        """The per-batch progress file of `iteration`'s generation (one per rank under DDP)."""
        suffix = ".partial.jsonl" if world_size == 1 else f".partial.rank{rank}.jsonl"
        return self.synthetic(iteration).with_suffix(suffix)

    def eval_samples(self, iteration: int) -> Path:
        """The greedy evaluation answers of the model after `iteration` (or before, RunDir.BEFORE)."""
        return self.iteration(iteration) / "eval_samples.json"

    @property
    def best(self) -> Path:
        """A copy of the best iteration's adapter (by the validation metric), with `best.json` naming it."""
        return self.root / "best"

    @property
    def early_stop(self) -> Path:
        """Written when the run stopped iterating early (`data.evaluation.patience`): why, and where."""
        return self.root / "early_stop.json"

    def finished(self, num_iterations: int) -> bool:
        """Whether the run is complete: its last iteration (of `num_iterations`) saved and evaluated, or
        it stopped iterating early (`early_stop.json`)."""
        last = num_iterations - 1
        saved = (self.iteration(last) / "adapter_model.safetensors").exists()
        return last in self.read_results() and saved or self.early_stop.exists()

    def read_best(self) -> dict | None:
        """The best iteration's record (`iteration`, `metric`, `value`), or None before there is one."""
        path = self.best / "best.json"
        return json.loads(path.read_text()) if path.exists() else None

    def write_best(self, iteration: int, record: dict) -> None:
        """Make `best/` a copy of `iteration`'s adapter files plus `best.json` = `record`; the old `best/`
        is replaced only once the new one is complete. Returns None."""
        staging = self.root / ".best.new"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        for source in self.iteration(iteration).glob("adapter_*"):
            shutil.copy2(source, staging / source.name)
        write_text_atomic(staging / "best.json", json.dumps(record, indent=1))
        old = self.root / ".best.old"
        shutil.rmtree(old, ignore_errors=True)
        if self.best.exists():
            os.replace(self.best, old)
        os.replace(staging, self.best)
        shutil.rmtree(old, ignore_errors=True)

    @property
    def results(self) -> Path:
        """Per-iteration evaluation rows."""
        return self.root / "results.json"

    @property
    def checkpoints(self) -> Path:
        """Lightning checkpoints (`last.ckpt`)."""
        return self.root / "checkpoints"

    @property
    def data(self) -> Path:
        """The embedded task's splits as jsonl."""
        return self.root / "data"

    @property
    def lock(self) -> Path:
        """Held (flock) by the one process writing the run; holds its process id."""
        return self.root / "run.lock"

    @contextlib.contextmanager
    def writer(self):
        """Be the run's only writer for the block: an exclusive `flock` on `run.lock`, which the operating
        system releases when the process ends however it ends, so a killed run never blocks its own
        resume. Raises RunInUse, naming the process that holds it, when another live process does."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.lock, "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "unknown"
                raise RunInUse(
                    f"{self.root} is being written by another run, process {holder} (it holds {self.lock.name}). "
                    "Wait for it to end (or stop it), then resume with --ckpt_path last."
                ) from None
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}\n")
            handle.flush()
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def previous_run(self) -> list[str]:
        """What an earlier run left here (adapters, synthetic data, checkpoints, evaluated iterations),
        as paths relative to the root; empty for a new folder or one holding only a seeded "before" row."""
        found = [
            str(p.relative_to(self.root)) for p in sorted(self.root.glob("iter_*/*")) if p.name != "eval_samples.json"
        ]
        found += [str(p.relative_to(self.root)) for p in sorted(self.checkpoints.glob("*.ckpt"))]
        if set(self.read_results()) - {self.BEFORE}:
            found.append(self.results.name)
        return found

    def read_results(self) -> dict[int, dict]:
        """The evaluation rows written so far, by iteration (empty before the first)."""
        if not self.results.exists():
            return {}
        return {row["iteration"]: row for row in json.loads(self.results.read_text())}

    def write_result(self, row: dict) -> None:
        """Add or replace the row of `row["iteration"]` in results.json, atomically."""
        results = self.read_results()
        results[row["iteration"]] = row
        write_text_atomic(self.results, json.dumps([results[k] for k in sorted(results)], indent=1))
