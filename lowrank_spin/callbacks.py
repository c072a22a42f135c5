"""Iteration boundaries: save the policy adapter, snapshot it as the next opponent, evaluate.

That is all a boundary does. The next iteration's synthetic data follow from the snapshot: the
DataModule generates with the opponent when Lightning reloads the train dataloader for the next epoch.
The callback asks the module only through its boundary interface (`ends_iteration`, `last_iteration`,
`save_adapter`, `snapshot_opponent`, `evaluation_inputs`, `heldout_rewards`, `objective`), passes the
iteration explicitly, and calls downward only (evaluation, files).

Checkpoints and SIGTERM (faults.py): `StepCheckpoint` writes one every n optimizer steps and, on SIGTERM,
one at the step the run is on before it stops; `BoundaryCheckpoint` writes the one after each epoch's
end (after the boundary) and stops a SIGTERMed run once it is written. A SIGTERM during a boundary's
evaluation abandons it; the boundary's checkpoint records it, and the resumed run evaluates it first.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger

from lowrank_spin.embedded import task
from lowrank_spin.evaluation import best_iteration, evaluate
from lowrank_spin.faults import Preempted, kill_point, stop, stop_requested
from lowrank_spin.files import RunDir, write_text_atomic
from lowrank_spin.judge import Judge

log = logging.getLogger(__name__)

BEFORE = RunDir.BEFORE


class StepCheckpoint(ModelCheckpoint):
    """A checkpoint every `every_n_train_steps` optimizer steps inside an iteration, so a killed run
    resumes from its last such step, with the same batches still to come, instead of from the
    iteration's start (the CLI's `step_checkpoint` group).

    Never at an epoch's last batch: the iteration boundary (adapter, opponent snapshot) has not
    happened there yet, and the boundary's own checkpoint (`BoundaryCheckpoint`) follows it.

    On SIGTERM: a checkpoint at the end of the optimizer step the run is on, whatever the interval, then
    the run stops (status 143), so its resume redoes no finished step.
    """

    def on_train_batch_end(self, trainer: L.Trainer, module, outputs, batch, batch_idx: int) -> None:
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            return
        super().on_train_batch_end(trainer, module, outputs, batch, batch_idx)
        if not trainer.strategy.reduce_boolean_decision(stop_requested(), all=False):
            return
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            # Mid-accumulation: this step's gradients are in memory only, so wait for the step's end.
            # Lightning would stop right after this batch (status 0, no checkpoint) on its own SIGTERM flag.
            trainer._signal_connector.received_sigterm = False
            return
        if self._last_global_step_saved != trainer.global_step:
            self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))
        saved = self._last_global_step_saved == trainer.global_step
        stop("train_step", checkpoint=self.best_model_path if saved else None)


class BoundaryCheckpoint(ModelCheckpoint):
    """The CLI's `checkpoint`: written at each epoch's end, after the iteration boundary (adapter, opponent
    snapshot, evaluation; checkpoint callbacks run last). A run SIGTERMed during the epoch's last step or
    its boundary stops (status 143) once it is written."""

    def on_train_epoch_end(self, trainer: L.Trainer, module) -> None:
        super().on_train_epoch_end(trainer, module)
        if trainer.strategy.reduce_boolean_decision(stop_requested(), all=False):
            saved = self._last_global_step_saved == trainer.global_step
            stop("epoch_end", checkpoint=(self.last_model_path or self.best_model_path) if saved else None)


class IterationBoundaries(L.Callback):
    def __init__(self):
        # an evaluation a SIGTERM abandoned at this boundary ({iteration, rewards, step}); in the checkpoint
        self._unevaluated: dict | None = None

    def on_fit_start(self, trainer: L.Trainer, module) -> None:
        for logger in _wandb_loggers(trainer):
            # evaluation curves over iterations, not optimizer steps
            logger.experiment.define_metric("eval/iteration")
            logger.experiment.define_metric("eval/*", step_metric="eval/iteration")
        if not trainer.strategy.restore_checkpoint_after_setup:  # the checkpoint's weights are loaded by now
            self._evaluate_unevaluated(trainer, module)

    def on_train_start(self, trainer: L.Trainer, module) -> None:
        self._evaluate_unevaluated(trainer, module)  # (DeepSpeed loads the checkpoint only after on_fit_start)
        if BEFORE not in RunDir(trainer.default_root_dir).read_results():
            self._evaluate(trainer, module, BEFORE)
        self._epoch_start = time.perf_counter()  # (a run resumed mid-epoch gets no on_train_epoch_start)

    def on_train_epoch_start(self, trainer: L.Trainer, module) -> None:
        self._epoch_start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, module, outputs, batch, batch_idx: int) -> None:
        # before the checkpoint callbacks (Lightning runs them last), so a step checkpoint holds this batch
        trainer.datamodule.batch_trained()
        kill_point("train_step")  # (a SIGTERM stops after StepCheckpoint has written this step)

    def on_train_epoch_end(self, trainer: L.Trainer, module) -> None:
        for logger in trainer.loggers:
            logger.log_metrics(
                {
                    "time/train_epoch_seconds": time.perf_counter() - self._epoch_start,
                    "time/iteration": module.iteration,
                },
                step=trainer.global_step,
            )
        if not module.ends_iteration(trainer.current_epoch):
            return
        iteration = module.iteration
        module.save_adapter(RunDir(trainer.default_root_dir).iteration(iteration), write=trainer.is_global_zero)
        if trainer.is_global_zero:
            kill_point("adapter_saved")  # (a SIGTERM stops after the boundary's checkpoint: BoundaryCheckpoint)
        evaluate_now = trainer.datamodule.evaluation.every_iteration or _ends_stage(module, iteration)
        # held-out rewards need the opponent of iteration t, so they come before the snapshot
        rewards = self._heldout_rewards(trainer, module, iteration) if evaluate_now else {}
        # θ0 + Δθt: the policy at the end of iteration t becomes the opponent of iteration t+1.
        module.snapshot_opponent()
        if evaluate_now:
            try:
                self._evaluate(trainer, module, iteration, rewards)
            except Preempted:
                # Stop within seconds, not after the evaluation: the boundary's checkpoint, written next,
                # records it as undone (`state_dict`), and the resumed run does it first.
                self._unevaluated = {"iteration": iteration, "rewards": rewards, "step": trainer.global_step}
                log.warning(
                    "SIGTERM: the evaluation of iteration %d is abandoned; the resumed run does it first", iteration
                )
            else:
                self._track_best(trainer, module, iteration)
        self._log_samples(trainer, iteration)

    def _evaluate_unevaluated(self, trainer: L.Trainer, module) -> None:
        """The evaluation a SIGTERM abandoned at the boundary this run resumes from, before anything else:
        the policy restored is the one it was to evaluate, that iteration's end, and its held-out rewards
        (which need the opponent before the snapshot) come from the checkpoint. Another SIGTERM stops the
        run again, the checkpoint unchanged. (Under DeepSpeed, whose checkpoint loads after on_fit_start, a
        last iteration's abandoned evaluation is not redone: nothing is left to train, so no on_train_start.)"""
        pending = self._unevaluated
        if pending is None or pending["iteration"] in RunDir(trainer.default_root_dir).read_results():
            self._unevaluated = None
            return
        log.info("evaluating iteration %d first: a SIGTERM stopped its evaluation", pending["iteration"])
        self._evaluate(trainer, module, pending["iteration"], pending["rewards"], step=pending["step"])
        self._track_best(trainer, module, pending["iteration"], step=pending["step"])
        self._unevaluated = None

    def state_dict(self) -> dict:
        return {"unevaluated": self._unevaluated} if self._unevaluated else {}

    def load_state_dict(self, state_dict: dict) -> None:
        self._unevaluated = state_dict.get("unevaluated")

    def _track_best(self, trainer: L.Trainer, module, iteration: int, step: int | None = None) -> None:
        """Keep `best/` on the best iteration so far by the validation metric, and stop iterating once it
        is `patience` iterations old (SPIN's later iterations can get worse: never ship one by accident)."""
        datamodule = trainer.datamodule
        if datamodule.eval_split != "validation":  # choosing on the test split would tune on it
            return
        run_dir, settings = RunDir(trainer.default_root_dir), datamodule.evaluation
        metric = settings.selection_metric(datamodule.has_checker)
        results = run_dir.read_results()
        best = best_iteration(results, metric)
        if best is None:
            return
        record = {"iteration": best, "metric": metric, "value": results[best][metric], "split": "validation"}
        if trainer.is_global_zero and run_dir.read_best() != record:
            run_dir.write_best(best, record)
        for logger in trainer.loggers:
            logger.log_metrics({"eval/best_iteration": best}, step=trainer.global_step if step is None else step)
        last = module.last_iteration
        if settings.patience is not None and iteration - best >= settings.patience and iteration < last:
            reason = (
                f"validation {metric} has not improved for {iteration - best} iteration(s) "
                f"(data.evaluation.patience={settings.patience}): stopping after iteration {iteration}; "
                f"the best is {_best_name(best)}"
            )
            log.warning(reason)
            if trainer.is_global_zero:
                write_text_atomic(
                    run_dir.early_stop, json.dumps({"iteration": iteration, "best": best, "reason": reason})
                )
            trainer.should_stop = True

    def _heldout_rewards(self, trainer: L.Trainer, module, iteration: int) -> dict:
        """SPIN's rewards on held-out (real, generated) pairs, policy vs the opponent of this iteration.

        The previous evaluation's greedy answers were generated by the policy of that time, which is
        exactly this iteration's opponent: they are its held-out generated responses, for free.
        """
        previous = RunDir(trainer.default_root_dir).eval_samples(BEFORE if iteration == 0 else iteration - 1)
        limit = trainer.datamodule.evaluation.heldout_reward_pairs
        examples = trainer.datamodule.eval_examples[:limit]
        if not examples or not previous.exists():
            return {}
        samples = json.loads(previous.read_text())[:limit]
        return module.heldout_rewards(examples, samples, iteration, batch_size=trainer.datamodule.hparams.batch_size)

    def _log_samples(self, trainer: L.Trainer, iteration: int, limit: int = 32) -> None:
        """A W&B table of the iteration's training pairs: what the opponent generated against the real data."""
        loggers = _wandb_loggers(trainer)
        pairs = trainer.datamodule.loaded_pairs(iteration)
        if not loggers or not pairs:
            return
        checker = trainer.datamodule.has_checker
        rows = [
            [
                e["prompt"],
                e["response"],
                e["generated"],
                iteration,
                task.is_correct(e["generated"], e["answer"]) if checker else None,
            ]
            for e in pairs[:limit]
        ]
        for logger in loggers:
            logger.log_table(
                key=f"samples/iter_{iteration}",
                columns=["prompt", "real", "generated", "iteration", "generated_correct"],
                data=rows,
            )

    def on_fit_end(self, trainer: L.Trainer, module) -> None:
        if trainer.is_global_zero:
            print(
                format_results(
                    RunDir(trainer.default_root_dir).read_results(),
                    run_dir=trainer.default_root_dir,
                    logger=trainer.logger,
                    objective=module.objective,
                )
            )
        for logger in _wandb_loggers(trainer):
            # a run is one fit: finish it, so its summary is written and the next fit in this process
            # (e.g. the next arm of `lowrank-spin compare`) starts a run of its own
            logger.experiment.finish()

    def _evaluate(
        self, trainer: L.Trainer, module, iteration: int, rewards: dict | None = None, step: int | None = None
    ) -> None:
        datamodule = trainer.datamodule
        split, examples = datamodule.eval_split, datamodule.eval_examples
        if not examples:
            return
        sampling, settings = datamodule.sampling, datamodule.evaluation
        start = time.perf_counter()
        model, tokenizer = module.evaluation_inputs()
        metrics, samples = evaluate(
            model,
            tokenizer,
            examples,
            check_answers=datamodule.has_checker,
            sampling=sampling,
            max_new_tokens=settings.max_new_tokens or sampling.max_new_tokens,
        )
        metrics = {
            "iteration": iteration,
            "split": split,
            **metrics,
            **(rewards or {}),
            **self._win_rates(trainer, iteration, samples),
            "seconds": time.perf_counter() - start,
        }
        for logger in trainer.loggers:
            logger.log_metrics(
                {f"eval/{k}": v for k, v in metrics.items() if k != "split"},
                step=trainer.global_step if step is None else step,
            )
        if trainer.is_global_zero:
            run_dir = RunDir(trainer.default_root_dir)
            run_dir.write_result(metrics)
            run_dir.iteration(iteration).mkdir(parents=True, exist_ok=True)
            write_text_atomic(run_dir.eval_samples(iteration), json.dumps(samples, indent=1))
        log.info("eval after %s: %s", "start" if iteration == BEFORE else f"iteration {iteration}", metrics)

    def _win_rates(self, trainer: L.Trainer, iteration: int, samples: list[dict]) -> dict:
        """Win rates of the evaluated answers against the gold responses and the initial model's answers,
        judged by the reward model `data.evaluation.judge` (judge.py: created once per run, its weights loaded
        for each evaluation); empty without one."""
        name = trainer.datamodule.evaluation.judge
        if name is None:
            return {}
        if getattr(self, "_judge", None) is None:
            self._judge = Judge(name, trainer.strategy.root_device, batch_size=trainer.datamodule.hparams.batch_size)
        before = RunDir(trainer.default_root_dir).eval_samples(BEFORE)
        initial = json.loads(before.read_text()) if iteration != BEFORE and before.exists() else None
        return self._judge.win_rates(samples, initial)


def _ends_stage(module, iteration: int) -> bool:
    """Whether `iteration` is the last of the run or of a stage: of a run of one objective, such as the
    SFT iterations of [sft, sft, spin, spin] (what `every_iteration: false` still evaluates)."""
    objective = module.objective
    return iteration == module.last_iteration or objective.name_at(iteration) != objective.name_at(iteration + 1)


def _best_name(iteration: int) -> str:
    """What `best/` holds, in words."""
    if iteration == BEFORE:
        return "the initial model, before any iteration (best/ names it and holds no adapter)"
    return f"iteration {iteration} (its adapter in best/)"


def format_results(results: dict[int, dict], run_dir: str, logger=None, objective=None) -> str:
    """The before/after table the main command ends with (the best iteration starred), and where the
    run's files are. With the run's `objective` settings each iteration names what it trained."""
    best = RunDir(run_dir).read_best()
    header = f"{'':<10}{'objective':>10}{'accuracy':>10}{'nll/token':>11}{'gen length':>12}{'reward acc':>12}"
    judged = any(row.get("win_rate_vs_gold") is not None for row in results.values())
    header += f"{'win vs gold':>13}{'win vs init':>13}" if judged else ""
    lines = ["", header]
    for iteration in sorted(results):
        row = results[iteration]
        name = "before" if iteration == BEFORE else f"iter {iteration}"
        name += " *" if best and best["iteration"] == iteration else ""
        trained = "" if iteration == BEFORE or objective is None else objective.name_at(iteration)
        accuracy = f"{row['accuracy']:.3f}" if row.get("accuracy") is not None else "n/a"
        rewards = f"{row['reward_accuracy']:.2f}" if row.get("reward_accuracy") is not None else "-"
        line = f"{name:<10}{trained:>10}{accuracy:>10}{row['nll']:>11.3f}{row['generated_tokens']:>12.1f}{rewards:>12}"
        if judged:  # the reward model's win rates (judge.py): vs the gold responses, vs the initial model
            line += "".join(
                f"{row[key]:>13.2f}" if row.get(key) is not None else f"{'-':>13}"
                for key in ("win_rate_vs_gold", "win_rate_vs_initial")
            )
        lines.append(line)
    if best:
        lines.append(f"* best by validation {best['metric']}: {_best_name(best['iteration'])}")
    if (stop := RunDir(run_dir).early_stop).exists():
        lines.append(json.loads(stop.read_text())["reason"])
    lines.append(f"run directory: {os.path.abspath(run_dir)} (results.json, iter_*/ adapters and synthetic data)")
    if isinstance(logger, WandbLogger):
        run = Path(logger.experiment.dir).parent
        lines.append(f"W&B run: {run} (offline: upload later with `wandb sync {run}`)")
    return "\n".join(lines)


def _wandb_loggers(trainer: L.Trainer) -> list[WandbLogger]:
    return [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]
