"""A read-only Lightning callback for `report.run_fit` and bench_memory.py --trace-fit, loaded into the `lowrank-spin fit` child
with `--trainer.callbacks+=spin_phase_probe.PhaseProbe` (benchmarks/ on PYTHONPATH)."""

from __future__ import annotations

import json
import time

import lightning as L
from report import rss_gb


class PhaseProbe(L.Callback):
    """Appends {event, wall, elapsed, rss_gb, hwm_gb} at the fit and iteration boundaries; observes only.

    Callback hooks run before the module's own and before IterationBoundaries (added by the module), so
    `train_epoch_end` is the end of the training steps, before the adapter is saved.
    """

    def __init__(self, path: str):
        self.path = path

    def _event(self, name: str, module=None) -> None:
        rss, hwm = rss_gb()
        elapsed = module.elapsed_seconds() if module is not None and hasattr(module, "elapsed_seconds") else None
        with open(self.path, "a") as f:
            f.write(
                json.dumps({"event": name, "wall": time.time(), "elapsed": elapsed, "rss_gb": rss, "hwm_gb": hwm})
                + "\n"
            )

    def setup(self, trainer, module, stage: str) -> None:
        self._event("setup")

    def on_fit_start(self, trainer, module) -> None:
        self._event("fit_start")

    def on_train_epoch_start(self, trainer, module) -> None:
        self._event("train_epoch_start", module)

    def on_train_epoch_end(self, trainer, module) -> None:
        self._event("train_epoch_end", module)

    def on_fit_end(self, trainer, module) -> None:
        self._event("fit_end", module)
