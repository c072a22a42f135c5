"""Safe points: the places where a run may stop without losing finished work.

- SIGTERM (what a preempted cloud machine gets): `install_sigterm_handler` makes the process note it,
  and the next safe point exits (status 143) with everything before it on disk: a flushed generation
  batch, a finished optimizer step (Lightning stops there itself), a saved adapter.
- Fault injection for the crash-and-resume tests: `LOWRANK_SPIN_KILL_AT=<point>[:<n>]` makes the
  process SIGKILL itself the n-th time (default 1st) it reaches `point`. Unset, it costs one dict lookup.

Points: `generation_batch` (a generated batch was flushed), `train_step` (an optimizer step ended),
`adapter_saved` (an iteration's adapter is on disk, its checkpoint not yet).
"""

from __future__ import annotations

import os
import signal
import sys
import threading

_counts: dict[str, int] = {}
_stop_requested = False


class RunStopped(RuntimeError):
    """The run stopped on purpose, for a reason the user can act on (bad numbers, a failed write):
    the CLI prints the message, without a traceback, and exits with status 1. What was saved before
    is left as it was."""


def install_sigterm_handler() -> None:
    """Note SIGTERM instead of dying mid-write (main thread only; Lightning chains its own handler after it)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _note_sigterm)


def safe_point(point: str) -> None:
    """A point where stopping loses nothing: exit if SIGTERM arrived, SIGKILL if `LOWRANK_SPIN_KILL_AT`
    names `point` for this visit; otherwise return None."""
    if _stop_requested:
        print(
            f"SIGTERM received: stopping at a safe point ({point}); resume with --ckpt_path last",
            file=sys.stderr,
            flush=True,
        )
        raise SystemExit(128 + signal.SIGTERM)
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
