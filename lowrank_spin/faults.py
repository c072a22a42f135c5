"""Fault injection for the crash-and-resume tests: `LOWRANK_SPIN_KILL_AT=<point>[:<n>]` makes the
process SIGKILL itself the n-th time (default 1st) it reaches `point`. Unset, it costs one dict lookup.

Points: `generation_batch` (a generated batch was flushed), `train_step` (an optimizer step ended),
`adapter_saved` (an iteration's adapter is on disk, its checkpoint not yet).
"""

from __future__ import annotations

import os
import signal

_counts: dict[str, int] = {}


def kill_point(point: str) -> None:
    """SIGKILL this process if `LOWRANK_SPIN_KILL_AT` names `point` and this is its n-th visit; else return None."""
    spec = os.environ.get("LOWRANK_SPIN_KILL_AT")
    if not spec:
        return
    name, _, nth = spec.partition(":")
    if name != point:
        return
    _counts[point] = _counts.get(point, 0) + 1
    if _counts[point] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
