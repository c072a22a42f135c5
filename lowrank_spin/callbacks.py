"""Iteration boundaries: save the policy adapter, snapshot it as the next opponent, evaluate.

The regeneration of the next iteration's synthetic data follows from the snapshot: the DataModule
generates with the opponent when Lightning reloads the train dataloader for the next epoch.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import WandbLogger

from lowrank_spin import math_task, models
from lowrank_spin.evaluation import evaluate
from lowrank_spin.faults import kill_point

log = logging.getLogger(__name__)

BEFORE = -1  # the results row of the initial model, before iteration 0


class IterationBoundaries(L.Callback):
    def on_fit_start(self, trainer: L.Trainer, module) -> None:
        for logger in _wandb_loggers(trainer):
            # evaluation curves over iterations, not optimizer steps
            logger.experiment.define_metric("eval/iteration")
            logger.experiment.define_metric("eval/*", step_metric="eval/iteration")

    def on_train_start(self, trainer: L.Trainer, module) -> None:
        if BEFORE not in _read_results(trainer):
            self._evaluate(trainer, module, BEFORE)

    def on_train_epoch_start(self, trainer: L.Trainer, module) -> None:
        self._epoch_start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, module, outputs, batch, batch_idx: int) -> None:
        kill_point("train_step")

    def on_train_epoch_end(self, trainer: L.Trainer, module) -> None:
        for logger in trainer.loggers:
            logger.log_metrics(
                {"time/train_epoch_seconds": time.perf_counter() - self._epoch_start, "time/iteration": module.iteration},
                step=trainer.global_step,
            )
        if (trainer.current_epoch + 1) % module.hparams.epochs_per_iteration:
            return
        iteration = module.iteration
        run_dir = Path(trainer.default_root_dir)
        if trainer.is_global_zero:
            models.save_adapter(module.model, run_dir / f"iter_{iteration}")
            kill_point("adapter_saved")
        # θ0 + Δθt: the policy at the end of iteration t becomes the opponent of iteration t+1.
        models.snapshot_opponent(module.model)
        self._evaluate(trainer, module, iteration)
        self._log_samples(trainer, iteration)

    def _log_samples(self, trainer: L.Trainer, iteration: int, limit: int = 32) -> None:
        """A W&B table of the iteration's training pairs: what the opponent generated against the real data."""
        loggers = _wandb_loggers(trainer)
        cached = trainer.datamodule._train_cache
        if not loggers or not cached or cached[0] != iteration:
            return
        checker = trainer.datamodule.has_checker
        rows = [
            [e["prompt"], e["response"], e["generated"], iteration, math_task.is_correct(e["generated"], e["answer"]) if checker else None]
            for e in cached[1][:limit]
        ]
        for logger in loggers:
            logger.log_table(key=f"samples/iter_{iteration}", columns=["prompt", "real", "generated", "iteration", "generated_correct"], data=rows)

    def on_fit_end(self, trainer: L.Trainer, module) -> None:
        if trainer.is_global_zero:
            print(format_results(_read_results(trainer), run_dir=trainer.default_root_dir, logger=trainer.logger))
        for logger in _wandb_loggers(trainer):
            # a run is one fit: finish it, so its summary is written and the next fit in this process
            # (e.g. the next arm of `lowrank-spin compare`) starts a run of its own
            logger.experiment.finish()

    def _evaluate(self, trainer: L.Trainer, module, iteration: int) -> None:
        datamodule = trainer.datamodule
        split = datamodule.hparams.eval_split if datamodule.hparams.eval_split in datamodule.examples else "validation"
        examples = datamodule.examples.get(split)
        if not examples:
            return
        hp = datamodule.hparams
        start = time.perf_counter()
        metrics, samples = evaluate(
            module,
            examples,
            check_answers=datamodule.has_checker,
            batch_size=hp.generation_batch_size,
            max_new_tokens=hp.eval_max_new_tokens or hp.max_new_tokens,
        )
        metrics = {"iteration": iteration, "split": split, **metrics, "seconds": time.perf_counter() - start}
        for logger in trainer.loggers:
            logger.log_metrics({f"eval/{k}": v for k, v in metrics.items() if k != "split"}, step=trainer.global_step)
        if trainer.is_global_zero:
            results = _read_results(trainer)
            results[iteration] = metrics
            run_dir = Path(trainer.default_root_dir)
            _write_json_atomic(run_dir / "results.json", [results[k] for k in sorted(results)])
            name = "before" if iteration == BEFORE else f"iter_{iteration}"
            (run_dir / name).mkdir(parents=True, exist_ok=True)
            _write_json_atomic(run_dir / name / "eval_samples.json", samples)
        log.info("eval after %s: %s", "start" if iteration == BEFORE else f"iteration {iteration}", metrics)


def format_results(results: dict[int, dict], run_dir: str, logger=None) -> str:
    """The before/after table the main command ends with."""
    lines = ["", f"{'':<10}{'accuracy':>10}{'nll/token':>11}{'gen length':>12}"]
    for iteration in sorted(results):
        row = results[iteration]
        name = "before" if iteration == BEFORE else f"iter {iteration}"
        accuracy = f"{row['accuracy']:.3f}" if row.get("accuracy") is not None else "n/a"
        lines.append(f"{name:<10}{accuracy:>10}{row['nll']:>11.3f}{row['generated_tokens']:>12.1f}")
    lines.append(f"run directory: {os.path.abspath(run_dir)} (results.json, iter_*/ adapters and synthetic data)")
    if isinstance(logger, WandbLogger):
        lines.append(f"W&B run: {logger.experiment.dir} (offline runs: `wandb sync` that folder's parent)")
    return "\n".join(lines)


def _wandb_loggers(trainer: L.Trainer) -> list[WandbLogger]:
    return [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]


def _read_results(trainer: L.Trainer) -> dict[int, dict]:
    path = Path(trainer.default_root_dir) / "results.json"
    if not path.exists():
        return {}
    return {row["iteration"]: row for row in json.loads(path.read_text())}


def _write_json_atomic(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)
