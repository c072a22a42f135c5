"""Safe points: the places where a run may stop without losing finished work.

- SIGTERM (what a preempted cloud machine gets): `install_sigterm_handler` makes the process note it,
  and the run stops at its next safe point (status 143, `Preempted`) with everything before it on disk:
  inside a training epoch, a checkpoint of the optimizer step it is on (`callbacks.StepCheckpoint`); at
  an epoch's last step or an iteration boundary, the boundary's checkpoint (`callbacks.BoundaryCheckpoint`);
  in a generation, the batches flushed so far (a batch in progress stops at its next token). An evaluation
  is abandoned, and the resumed run does it first.
- Fault injection for the crash-and-resume tests: `LOWRANK_SPIN_KILL_AT=<point>[:<n>]` makes the
  process SIGKILL itself the n-th time (default 1st) it reaches `point`. Unset, it costs one dict lookup.

Points: `generation_batch` (a generated batch was flushed), `train_step` (an optimizer step ended),
`adapter_saved` (an iteration's adapter is on disk, its checkpoint not yet); SIGTERM also stops an
evaluation at `unsaved_generation_batch` and `evaluation_batch` (a gold-NLL batch).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import NoReturn

_counts: dict[str, int] = {}
_stop_requested = False


class RunStopped(RuntimeError):
    """The run stopped on purpose, for a reason the user can act on (bad numbers, a failed write):
    the CLI prints the message, without a traceback, and exits with status 1. What was saved before
    is left as it was."""


class Preempted(SystemExit):
    """SIGTERM stopped the run at the safe point `point`: the process exits with status 143 (128 + SIGTERM)
    unless something catches it, as the iteration boundary does around an evaluation it abandons."""

    def __init__(self, point: str):
        super().__init__(128 + signal.SIGTERM)
        self.point = point


def install_sigterm_handler() -> None:
    """Note SIGTERM instead of dying mid-write (main thread only; Lightning chains its own handler after it)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _note_sigterm)


def stop_requested() -> bool:
    """Whether SIGTERM arrived: the run is to stop at its next safe point."""
    return _stop_requested


def stop(point: str, checkpoint: str | None = None) -> NoReturn:
    """Stop the SIGTERMed run at `point`, saying so and naming the `checkpoint` just written: raises Preempted."""
    written = f"; wrote {checkpoint}" if checkpoint else ""
    print(
        f"SIGTERM received: stopping at a safe point ({point}){written}; resume with --ckpt_path last",
        file=sys.stderr,
        flush=True,
    )
    raise Preempted(point)


def safe_point(point: str) -> None:
    """A point where stopping loses nothing: stop if SIGTERM arrived, SIGKILL if `LOWRANK_SPIN_KILL_AT`
    names `point` for this visit; otherwise return None."""
    if _stop_requested:
        stop(point)
    kill_point(point)


def kill_point(point: str) -> None:
    """SIGKILL this process if `LOWRANK_SPIN_KILL_AT` names `point` for this visit; otherwise return None.
    (A point where a SIGTERM waits for a checkpoint still to come, rather than stopping at once.)"""
    spec = os.environ.get("LOWRANK_SPIN_KILL_AT")
    if not spec:
        return
    name, _, nth = spec.partition(":")
    if name != point:
        return
    _counts[point] = _counts.get(point, 0) + 1
    if _counts[point] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def _note_sigterm(signum, frame) -> None:
    global _stop_requested
    _stop_requested = True
