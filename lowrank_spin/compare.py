"""`lowrank-spin compare`: the papers' protocol in one command, SFT first, then SFT vs SPIN vs T-SPIN.

    lowrank-spin compare --config configs/smollm2_compare.yaml --seeds 0 1 2 --output runs/compare_smollm2
    lowrank-spin compare --config configs/tiny_spin.yaml --seeds 0 1 --output runs/tiny_compare   # seconds

Each seed (`seed_everything` and `data.seed`) runs the whole protocol in `<output>/seed_<s>/`:

1. **Stage 1, `stage1_sft/`:** SFT-LoRA on the annotated data for up to `--sft_iterations` iterations,
   the gold NLL on the validation split after each. The adapter of the lowest validation NLL is kept;
   the stage stops counting once `--patience` iterations in a row have not improved it. SPIN starts from
   an SFT model, not from the base (Chen et al. 2024, §5.1), so every later arm starts from this adapter.
2. **Stage 2:** from that adapter (`model.lora.init_adapter`), continued SFT, SPIN and T-SPIN for the
   config's `model.num_iterations`, on 100% of the annotated data, plus the data-scarcity arms
   (`--fraction_arms`, T-SPIN by default, on each of `--data_fractions` of the rows, `data.max_samples`).
   Every arm trains the same total number of optimizer steps: an arm on a fraction of the rows trains
   proportionally more epochs per iteration (`--no-equal_steps`: the same epochs). Each arm is evaluated
   (greedy accuracy, gold NLL, held-out rewards) on the validation split after every iteration.
3. **Test, `test/`:** the stage-1 adapter and every arm's final adapter, each evaluated once on the test
   split (the embedded task's `data.num_test` problems). A user dataset has no test split: its
   validation rows (`data.val_dataset`/`val_split`, or the held-out `data.val_fraction`) are then the
   only evaluation and the report says so.

Every selection (stage 1's adapter) is made on validation; test is only reported. Each arm is paired with
continued SFT problem by problem, per seed, and across seeds. The report, in `<output>`: `results.json`
(everything below, for the notebook), `summary.csv` (per arm: mean, spread and per-seed values, paired
difference, training steps, diagnostics), `comparison.csv` (per seed, arm, split and iteration),
`comparison.md` (the tables) and PNG plots. Finished runs are reused, so re-running fills in what is
missing. W&B runs (when the config logs to W&B) share one group, the output folder's name, unless
`WANDB_RUN_GROUP` is set; each run is named after its seed and arm. Any other `--model.*`/`--data.*`/
`--trainer.*` flag goes to every run.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import inspect
import json
import math
import os
import shutil
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lightning as L

from lowrank_spin.evaluation import paired_difference
from lowrank_spin.files import RunDir, write_text_atomic
from lowrank_spin.settings import per_iteration, raise_if_any

ARMS = ("sft", "spin", "tspin")
STAGE1 = "stage1_sft"
START = "start"  # the stage-1 adapter, as an arm of the report: where every stage-2 arm begins
# Set by the protocol for each run; an override of them would break the comparison.
PROTOCOL_FLAGS = (
    "--seed_everything",
    "--data.seed",
    "--model.objective.name",
    "--model.lora.init_adapter",
    "--data.evaluation.split",
    "--trainer.default_root_dir",
    "--ckpt_path",
)


@dataclass(frozen=True)
class Arm:
    """One stage-2 run of each seed: an objective on a fraction of the annotated rows."""

    objective: str
    fraction: float = 1.0

    @property
    def name(self) -> str:
        """Its folder and report name, e.g. `tspin_25pct`."""
        return f"{self.objective}_{int(round(self.fraction * 100))}pct"


BASELINE = Arm("sft")  # continued SFT on all the data: every arm is paired with it


def main(argv: list[str], fit: Callable[[list[str]], object]) -> None:
    """Run the protocol with `fit` (the `fit` CLI over a list of arguments) for every seed, then write
    and print the report. Bad arguments raise one ConfigError, listing each, before any fit starts."""
    parser = argparse.ArgumentParser(
        prog="lowrank-spin compare", description=__doc__.split("\n\n")[0], allow_abbrev=False
    )
    parser.add_argument("--config", required=True, help="a fit config; every run uses it")
    parser.add_argument("--output", default="runs/compare", help="seed_<s>/ per seed, and the report")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="each runs the whole protocol")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), help=f"stage-2 arms on all the data, of {ARMS}")
    parser.add_argument("--fraction_arms", nargs="*", default=["tspin"], help="the data-scarcity arms' objectives")
    parser.add_argument("--data_fractions", nargs="*", type=float, default=[0.25, 0.5], help="each in (0, 1)")
    parser.add_argument(
        "--num_train",
        type=int,
        default=None,
        help="annotated rows at 100%% (default: all the config's data, as given)",
    )
    parser.add_argument("--sft_iterations", type=int, default=4, help="stage 1: the most SFT iterations")
    parser.add_argument("--patience", type=int, default=1, help="stage 1: stop after this many without a better NLL")
    parser.add_argument(
        "--equal_steps",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="arms on a fraction of the data train proportionally more epochs (the same total steps)",
    )
    parser.add_argument(
        "--test",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="evaluate the final adapters on the test split once (the embedded task only)",
    )
    args, overrides = parser.parse_known_args(argv)  # anything else goes to every `fit`
    settings = _settings(args.config, overrides) if Path(args.config).is_file() else {}
    raise_if_any(argument_errors(args, overrides, settings))
    protocol = plan(args, overrides, settings)
    group = os.environ.get("WANDB_RUN_GROUP") or Path(args.output).resolve().name
    for seed in args.seeds:
        run_seed(fit, protocol, seed, group)
    report = build_report(protocol)
    write_report(report, Path(args.output))
    print((Path(args.output) / "comparison.md").read_text())


def argument_errors(args: argparse.Namespace, overrides: list[str], settings: dict) -> list[str]:
    """Every bad argument of `compare`, each naming its flag (empty when all are fine)."""
    errors = []
    if not Path(args.config).is_file():
        errors.append(f"--config: {args.config!r} is not a file")
    for flag, values, allowed in (("--arms", args.arms, ARMS), ("--fraction_arms", args.fraction_arms, ARMS)):
        if bad := [v for v in values if v not in allowed]:
            errors.append(f"{flag}: each must be one of {ARMS}, got {bad}")
    if "sft" not in args.arms:
        errors.append("--arms: must include sft, the continued-SFT baseline every arm is paired with")
    if bad := [f for f in args.data_fractions if not 0 < f < 1]:
        errors.append(f"--data_fractions: each must be in (0, 1) (100% is --arms), got {bad}")
    if len(set(args.data_fractions)) < len(args.data_fractions):
        errors.append(f"--data_fractions: each at most once, got {args.data_fractions}")
    if args.fraction_arms and not args.data_fractions:
        errors.append("--fraction_arms: needs --data_fractions (or pass --fraction_arms with no value)")
    if bad := [s for s in args.seeds if s < 0]:
        errors.append(f"--seeds: must be >= 0, got {bad}")
    if len(set(args.seeds)) < len(args.seeds):
        errors.append(f"--seeds: each at most once, got {args.seeds}")
    for flag in ("sft_iterations", "patience"):
        if getattr(args, flag) < 1:
            errors.append(f"--{flag}: must be >= 1, got {getattr(args, flag)}")
    if args.num_train is not None and args.num_train < 1:
        errors.append(f"--num_train: must be >= 1, got {args.num_train}")
    for flag in PROTOCOL_FLAGS:
        if any(o == flag or o.startswith(flag + "=") for o in overrides):
            errors.append(f"{flag}: set by compare for each run (seeds: --seeds); drop it from the command")
    if settings:
        errors += _data_errors(settings.get("data") or {})
    return errors


def _data_errors(data: dict) -> list[str]:
    """Stage 1 selects on validation and the report scores test: both must exist before any fit."""
    from lowrank_spin.data import MATH

    dataset = data.get("dataset", MATH)
    if dataset == MATH:
        return [
            f"data.{name}: the protocol needs a {split} split (stage 1 selects on validation, the report scores test), got {data[name]}"
            for name, split in (("num_val", "validation"), ("num_test", "test"))
            if name in data and data[name] < 1
        ]
    if not (data.get("val_dataset") or data.get("val_split")) and data.get("val_fraction", 0.1) <= 0:
        return [
            "data.val_fraction: stage 1 selects the SFT adapter on validation NLL: give data.val_dataset or "
            "data.val_split, or data.val_fraction > 0"
        ]
    return []


# ---- the plan: what each seed runs ------------------------------------------------------------------


@dataclass(frozen=True)
class Protocol:
    """Everything a seed runs, decided once before the first fit."""

    config: str
    output: Path
    overrides: tuple[str, ...]
    seeds: tuple[int, ...]
    arms: tuple[Arm, ...]
    sizes: dict  # data.max_samples per fraction (None: the data as given)
    epochs: dict  # model.epochs_per_iteration per fraction
    num_iterations: int
    sft_iterations: int
    patience: int
    test: bool
    beta: float | list[float]


def plan(args: argparse.Namespace, overrides: list[str], settings: dict) -> Protocol:
    """The arms, their data sizes and epochs (equal total steps), printed; returns the Protocol."""
    from lowrank_spin.data import MATH

    model, data = settings.get("model") or {}, settings.get("data") or {}
    arms = [Arm(a) for a in dict.fromkeys(args.arms)]
    arms += [Arm(a, f) for f in sorted(args.data_fractions) for a in dict.fromkeys(args.fraction_arms)]
    fractions = sorted({arm.fraction for arm in arms})
    epochs = int(model.get("epochs_per_iteration", 1))
    batch = int(data.get("batch_size", 8))
    sizes, total = _training_sizes(data, fractions, args.num_train)
    per_fraction = {}
    for f in fractions:
        rows = total if sizes[f] is None else sizes[f]
        steps = math.ceil(rows / batch)
        full = math.ceil(total / batch)
        per_fraction[f] = max(1, round(epochs * full / steps)) if args.equal_steps else epochs
    iterations = int(model.get("num_iterations", 2))
    for f in fractions:
        rows = total if sizes[f] is None else sizes[f]
        print(
            f"[compare] {f:.0%} of the data: {rows} rows, {per_fraction[f]} epoch(s) per iteration, "
            f"{iterations * per_fraction[f] * math.ceil(rows / batch)} optimizer steps in {iterations} iterations"
        )
    dataset = data.get("dataset", MATH)
    test = args.test and dataset == MATH
    if args.test and not test:
        print(f"[compare] data.dataset {dataset!r} has no test split: the report scores its validation rows")
    evaluation = data.get("evaluation") or {}
    split_size = data.get("num_val", 64) if dataset == MATH else None
    shown = min(x for x in (split_size, evaluation.get("max_examples")) if x is not None) if split_size else None
    if shown is not None and shown < 300:
        print(f"[compare] note: {shown} validation problems; the protocol asks for >= 300 for narrow paired intervals")
    objective = model.get("objective") or {}
    return Protocol(
        config=args.config,
        output=Path(args.output),
        overrides=tuple(overrides),
        seeds=tuple(args.seeds),
        arms=tuple(arms),
        sizes=sizes,
        epochs=per_fraction,
        num_iterations=iterations,
        sft_iterations=args.sft_iterations,
        patience=args.patience,
        test=test,
        beta=objective.get("beta", 0.1),
    )


def _training_sizes(data: dict, fractions, num_train: int | None) -> tuple[dict, int]:
    """(`data.max_samples` per fraction, None: the data as given; the rows at 100%), printed."""
    if num_train is not None:
        total, what = num_train, f"--num_train {num_train}"
    else:
        total, what = _training_rows(data)
    sizes = {f: None if f == 1 and num_train is None else max(1, int(round(total * f))) for f in fractions}
    shown = ", ".join(f"{f:.0%}: " + ("as given" if n is None else f"data.max_samples {n}") for f, n in sizes.items())
    print(f"[compare] data fractions of {total} training rows ({what}): {shown}")
    return sizes, total


def _training_rows(data: dict) -> tuple[int, str]:
    """How many rows the config's data section trains on, and what they are."""
    from lowrank_spin.data import MATH, SelfPlayDataModule

    parameters = inspect.signature(SelfPlayDataModule.__init__).parameters
    data = {name: p.default for name, p in parameters.items() if name != "self"} | data
    budget = f", data.max_samples {data['max_samples']}" if data["max_samples"] else ""
    if data["dataset"] == MATH:
        return min(
            data["num_train"], data["max_samples"] or data["num_train"]
        ), f"the embedded math task's train split{budget}"
    # The DataModule reads the data itself (once; cheap next to a fit): the rows it holds out for
    # evaluation and the config's own max_samples are counted exactly as every arm's `fit` counts them.
    flat = {k: v for k, v in data.items() if k not in ("sampling", "evaluation")}
    train = SelfPlayDataModule(**flat).load_records()["train"]
    return len(train), f"data.dataset {data['dataset']!r}, less its held-out rows{budget}"


# ---- one seed: stage 1, stage 2, test -----------------------------------------------------------------


def run_seed(fit: Callable[[list[str]], object], protocol: Protocol, seed: int, group: str) -> dict:
    """Run (or reuse) the whole protocol for `seed`; returns stage 1's choice (also in `stage1.json`)."""
    seed_dir = protocol.output / f"seed_{seed}"
    common = [f"--seed_everything={seed}", f"--data.seed={seed}"]

    # Stage 1: SFT, greedy answers cut at one token so each iteration costs only the gold NLL.
    stage1_dir = seed_dir / STAGE1
    _fit(
        fit,
        protocol,
        stage1_dir,
        protocol.sft_iterations,
        [
            *common,
            "--model.objective.name=sft",
            f"--model.num_iterations={protocol.sft_iterations}",
            "--data.evaluation.split=validation",
            "--data.evaluation.every_iteration=true",
            "--data.evaluation.max_new_tokens=1",
            "--data.evaluation.heldout_reward_pairs=0",
        ],
        group,
        f"seed{seed}_{STAGE1}",
    )
    choice = select_sft_adapter(RunDir(stage1_dir).read_results(), protocol.patience)
    choice["adapter"] = str(RunDir(stage1_dir).iteration(choice["iteration"]))
    write_text_atomic(seed_dir / "stage1.json", json.dumps(choice, indent=1))
    print(
        f"[compare] seed {seed} stage 1: validation NLL {', '.join(f'{x:.4f}' for x in choice['nll'])}; "
        f"starting every arm from iteration {choice['iteration']} ({choice['adapter']})"
        + ("" if choice["stopped_at"] is not None else "; still improving: raise --sft_iterations")
    )

    # Stage 2: every arm from that adapter, evaluated on validation after every iteration.
    start = ["--model.lora.init_adapter", choice["adapter"], "--data.evaluation.split=validation"]
    first = None
    for arm in protocol.arms:
        run_dir = seed_dir / arm.name
        sized = [] if protocol.sizes[arm.fraction] is None else [f"--data.max_samples={protocol.sizes[arm.fraction]}"]
        if first is not None:  # the common start is evaluated once, by the first arm
            _share_before_evaluation(first, run_dir)
        _fit(
            fit,
            protocol,
            run_dir,
            protocol.num_iterations,
            [
                *common,
                f"--model.objective.name={arm.objective}",
                f"--model.epochs_per_iteration={protocol.epochs[arm.fraction]}",
                *start,
                *sized,
            ],
            group,
            f"seed{seed}_{arm.name}",
        )
        first = first or run_dir

    # Test: each final adapter (and the start) once, on the test split.
    if protocol.test:
        finals = {START: choice["adapter"]}
        finals |= {
            arm.name: str(RunDir(seed_dir / arm.name).iteration(protocol.num_iterations - 1)) for arm in protocol.arms
        }
        for name, adapter in finals.items():
            run_dir = seed_dir / "test" / name
            if RunDir.BEFORE in RunDir(run_dir).read_results():
                print(f"[compare] {run_dir} already evaluated: reusing it")
                continue
            print(f"[compare] seed {seed}: {name} on the test split -> {run_dir}")
            with _environment(WANDB_RUN_GROUP=group, WANDB_NAME=f"seed{seed}_test_{name}"):
                fit(
                    _fit_args(protocol, run_dir)
                    + [
                        *common,
                        "--model.objective.name=sft",
                        "--model.num_iterations=1",
                        "--model.lora.init_adapter",
                        adapter,
                        "--data.evaluation.split=test",
                        "--data.evaluation.heldout_reward_pairs=0",
                        "--trainer.callbacks+=lowrank_spin.compare.EvaluateOnly",
                    ]
                )
    return choice


def select_sft_adapter(results: dict[int, dict], patience: int) -> dict:
    """Stage 1's choice from its per-iteration validation rows: the iteration of the lowest NLL, counting
    iterations only until `patience` in a row have not improved it (early stopping on validation NLL).

    Returns {"iteration", "nll" (per iteration, in order), "stopped_at" (the iteration that ended the
    stage; None if the NLL was still improving at the last one)}.
    """
    iterations = sorted(i for i in results if i >= 0)
    if not iterations:
        raise ValueError("stage 1 wrote no per-iteration validation rows (results.json)")
    best, stopped_at = iterations[0], None
    for i in iterations:
        if results[i]["nll"] < results[best]["nll"]:
            best = i
        elif i - best >= patience:
            stopped_at = i
            break
    return {"iteration": best, "nll": [results[i]["nll"] for i in iterations], "stopped_at": stopped_at}


class EvaluateOnly(L.Callback):
    """Stop a `fit` before its first step: `IterationBoundaries` has then evaluated the initial model
    (its `model.lora.init_adapter`) on `data.evaluation.split`, and nothing is trained or saved."""

    def on_train_start(self, trainer: L.Trainer, module) -> None:
        trainer.should_stop = True


def _fit_args(protocol: Protocol, run_dir: Path) -> list[str]:
    """`fit` of the config into `run_dir` with the user's overrides; the protocol's own flags follow them."""
    return [
        "fit",
        "--config",
        protocol.config,
        "--trainer.default_root_dir",
        str(run_dir),
        "--trainer.logger.init_args.save_dir",
        str(run_dir),
        *protocol.overrides,
    ]


def _fit(fit, protocol: Protocol, run_dir: Path, iterations: int, flags: list[str], group: str, name: str) -> None:
    """Run one `fit` into `run_dir`, reuse it when finished, resume it (`--ckpt_path last`) when it was cut short."""
    if _finished(run_dir, iterations):
        print(f"[compare] {run_dir} already finished: reusing it")
        return
    print(f"[compare] {name} -> {run_dir}")
    resume = ["--ckpt_path", "last"] if any(RunDir(run_dir).checkpoints.glob("*.ckpt")) else []
    with _environment(WANDB_RUN_GROUP=group, WANDB_NAME=name):  # W&B reads these
        fit(_fit_args(protocol, run_dir) + flags + resume)


def _share_before_evaluation(source: Path, run_dir: Path) -> None:
    """Seed a new arm with the first arm's evaluation of the common initial model (the callback then skips it)."""
    source, target = RunDir(source), RunDir(run_dir)
    if target.results.exists():
        return
    before = source.read_results().get(RunDir.BEFORE)
    if before is None:
        return
    target.iteration(RunDir.BEFORE).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source.eval_samples(RunDir.BEFORE), target.eval_samples(RunDir.BEFORE))
    write_text_atomic(target.results, json.dumps([before], indent=1))


# ---- the report -------------------------------------------------------------------------------------


def build_report(protocol: Protocol) -> dict:
    """Read every seed's runs into the report: `rows` (per seed, arm, split, iteration), `summary` (per
    arm, over seeds), `stage1` (per seed) and `protocol` (what was run). Returns it as a dict."""
    rows = []
    for seed in protocol.seeds:
        seed_dir = protocol.output / f"seed_{seed}"
        for arm in protocol.arms:
            rows += _validation_rows(seed, arm, seed_dir / arm.name, protocol)
        if protocol.test:
            for name in (START, *(arm.name for arm in protocol.arms)):
                result = RunDir(seed_dir / "test" / name).read_results()[RunDir.BEFORE]
                arm = _arm_named(name, protocol)
                iteration = "before" if name == START else protocol.num_iterations - 1
                rows.append(_eval_row(seed, name, arm, "test", iteration, result))
    _add_paired_differences(rows, protocol)
    final_split = "test" if protocol.test else "validation"
    return {
        "protocol": {
            "config": protocol.config,
            "overrides": list(protocol.overrides),
            "seeds": list(protocol.seeds),
            "arms": [arm.name for arm in protocol.arms],
            "num_iterations": protocol.num_iterations,
            "sft_iterations": protocol.sft_iterations,
            "patience": protocol.patience,
            "epochs_per_iteration": {f"{f:g}": e for f, e in protocol.epochs.items()},
            "max_samples": {f"{f:g}": n for f, n in protocol.sizes.items()},
            "final_split": final_split,
        },
        "stage1": {
            str(seed): json.loads((protocol.output / f"seed_{seed}" / "stage1.json").read_text())
            for seed in protocol.seeds
        },
        "summary": summarize(rows, protocol, final_split),
        "rows": rows,
    }


def _arm_named(name: str, protocol: Protocol) -> Arm:
    return BASELINE if name == START else next(arm for arm in protocol.arms if arm.name == name)


def _eval_row(seed: int, name: str, arm: Arm, split: str, iteration, result: dict) -> dict:
    return {
        "seed": seed,
        "arm": name,
        "objective": arm.objective,
        "data_fraction": arm.fraction,
        "split": split,
        "iteration": iteration,
        "num_examples": result.get("num_examples"),
        "accuracy": result.get("accuracy"),
        "accuracy_ci_low": result.get("accuracy_ci_low"),
        "accuracy_ci_high": result.get("accuracy_ci_high"),
        **{k: v for k, v in result.items() if k.startswith("accuracy_") and k.endswith("_steps")},
        "nll": result["nll"],
        "generated_tokens": result["generated_tokens"],
        # held-out pairs (gold vs the opponent's answers)
        "reward_accuracy": result.get("reward_accuracy"),
        "reward_margin": result.get("reward_margin"),
    }


def _validation_rows(seed: int, arm: Arm, run_dir: Path, protocol: Protocol) -> list[dict]:
    """One row per evaluated iteration of a stage-2 run: eval metrics, training diagnostics, steps, times."""
    metrics = _read_metrics(run_dir)
    epochs = [m for m in metrics if m.get("time/train_epoch_seconds") not in (None, "")]
    # the global step at each epoch end: steps are counted there, not from step rows (log_every_n_steps)
    ends = {}
    for m in epochs:
        ends[int(_float(m["time/iteration"]))] = int(_float(m["step"]))
    rows = []
    for iteration, result in sorted(RunDir(run_dir).read_results().items()):
        row = _eval_row(seed, arm.name, arm, "validation", "before" if iteration < 0 else iteration, result)
        if iteration >= 0:
            steps = [
                m for m in metrics if m.get("train/loss_step") not in (None, "") and _float(m["iteration"]) == iteration
            ]
            generation = [
                m
                for m in metrics
                if m.get("generation/iteration") not in (None, "") and _float(m["generation/iteration"]) == iteration
            ]
            real_rewards = _mean(steps, "rewards/real")
            row |= {
                "train_steps": ends.get(iteration, 0) - ends.get(iteration - 1, 0) if iteration in ends else None,
                "total_train_steps": ends.get(iteration),
                "train_reward_accuracy": _mean(steps, "rewards/accuracy"),
                "train_reward_margin": _mean(steps, "rewards/margin"),
                "train_logps_real": _mean(steps, "logps/real"),
                "train_logps_generated": _mean(steps, "logps/generated"),
                # log p(real) under the policy minus under the opponent, in nats: SPIN's reward over λ
                "train_real_drift": real_rewards / per_iteration(protocol.beta, iteration)
                if arm.objective == "spin" and real_rewards is not None
                else None,
                "train_seconds": sum(
                    _float(m["time/train_epoch_seconds"]) for m in epochs if _iteration_of(m) == iteration
                ),
                "generation_seconds": sum(_float(m["generation/seconds"]) for m in generation),
            }
        rows.append(row)
    return rows


def _iteration_of(m: dict) -> int:
    return int(_float(m["time/iteration"]))


def _add_paired_differences(rows: list[dict], protocol: Protocol) -> None:
    """Each row's accuracy minus continued SFT's on the same problems (same seed, split and iteration; on
    test, every final adapter and the start against continued SFT's final one)."""
    for row in rows:
        if row["arm"] == BASELINE.name or row["accuracy"] is None:
            continue
        if row["split"] == "validation" and row["iteration"] == "before":  # the common start: no difference
            continue
        mine = _correct(protocol, row["seed"], row["arm"], row["split"], row["iteration"])
        sft = _correct(protocol, row["seed"], BASELINE.name, row["split"], row["iteration"])
        if mine and sft and len(mine) == len(sft):
            row["vs_sft"], row["vs_sft_ci_low"], row["vs_sft_ci_high"] = paired_difference(mine, sft)


def _samples_path(protocol: Protocol, seed: int, name: str, split: str, iteration) -> Path:
    seed_dir = protocol.output / f"seed_{seed}"
    if split == "test":
        return RunDir(seed_dir / "test" / name).eval_samples(RunDir.BEFORE)
    return RunDir(seed_dir / name).eval_samples(RunDir.BEFORE if iteration == "before" else iteration)


def _correct(protocol: Protocol, seed: int, name: str, split: str, iteration) -> list[bool] | None:
    """Per-problem correctness of one evaluation, or None where it was not evaluated."""
    path = _samples_path(protocol, seed, name, split, iteration)
    return [bool(s.get("correct")) for s in json.loads(path.read_text())] if path.exists() else None


def summarize(rows: list[dict], protocol: Protocol, split: str) -> list[dict]:
    """Per arm, the final evaluation on `split` over the seeds: accuracy mean, spread (sample sd, min,
    max) and per-seed values; the paired difference to continued SFT per seed and pooled over seeds; the
    training steps per seed; and the diagnostics of the final iteration, averaged over seeds."""
    last = protocol.num_iterations - 1
    names = ([START] if split == "test" else []) + [arm.name for arm in protocol.arms]
    sft_nll = {  # continued SFT's final gold NLL per seed: what the NLL differences are against
        r["seed"]: r["nll"]
        for r in rows
        if r["arm"] == BASELINE.name and r["split"] == split and r["iteration"] == last
    }
    summary = []
    for name in names:
        iteration = "before" if name == START else last
        finals = [r for r in rows if r["arm"] == name and r["split"] == split and r["iteration"] == iteration]
        training = [r for r in rows if r["arm"] == name and r["split"] == "validation" and r["iteration"] == last]
        arm = _arm_named(name, protocol)
        accuracies = [r["accuracy"] for r in finals if r["accuracy"] is not None]
        differences = [r.get("vs_sft") for r in finals if r.get("vs_sft") is not None]
        nlls = [r["nll"] for r in finals]
        nll_differences = [r["nll"] - sft_nll[r["seed"]] for r in finals if r["seed"] in sft_nll]
        entry = {
            "arm": name,
            "objective": arm.objective,
            "data_fraction": arm.fraction,
            "split": split,
            "iteration": iteration,
            "num_examples": _num_examples(protocol, finals[0]) if finals else None,
            "seeds": [r["seed"] for r in finals],
            **_spread("accuracy", accuracies),
            "accuracy_ci_per_seed": [[r["accuracy_ci_low"], r["accuracy_ci_high"]] for r in finals],
            **_spread("nll", nlls),
            "nll_vs_sft_mean": None if name == BASELINE.name else _mean_of(nll_differences),
            "generated_tokens_mean": _mean_of([r["generated_tokens"] for r in finals]),
            **_spread("vs_sft", differences),
            "vs_sft_ci_per_seed": [[r["vs_sft_ci_low"], r["vs_sft_ci_high"]] for r in finals if "vs_sft" in r],
            **_pooled_difference(protocol, name, split, iteration),
            "train_steps_per_seed": [_total_steps(protocol, seed, name) for seed in [r["seed"] for r in finals]],
        }
        for key in (
            "reward_accuracy",
            "reward_margin",
            "train_reward_accuracy",
            "train_reward_margin",
            "train_real_drift",
            "train_logps_real",
            "train_logps_generated",
        ):
            entry[f"{key}_mean"] = _mean_of([r.get(key) for r in training])
        entry["train_logps_real_first_mean"] = _mean_of(
            [r.get("train_logps_real") for r in rows if r["arm"] == name and r["iteration"] == 0]
        )
        entry["train_logps_generated_first_mean"] = _mean_of(
            [r.get("train_logps_generated") for r in rows if r["arm"] == name and r["iteration"] == 0]
        )
        summary.append(entry)
    return summary


def _num_examples(protocol: Protocol, row: dict) -> int | None:
    """How many problems (or, without a checker, validation rows) an evaluation scored."""
    if row.get("num_examples") is not None:
        return row["num_examples"]
    path = _samples_path(protocol, row["seed"], row["arm"], row["split"], row["iteration"])
    return len(json.loads(path.read_text())) if path.exists() else None


def _total_steps(protocol: Protocol, seed: int, name: str) -> int | None:
    """The optimizer steps a stage-2 run took over all its iterations (None for the start)."""
    if name == START:
        return None
    metrics = _read_metrics(protocol.output / f"seed_{seed}" / name)
    ends = [int(_float(m["step"])) for m in metrics if m.get("time/train_epoch_seconds") not in (None, "")]
    return max(ends) if ends else None


def _pooled_difference(protocol: Protocol, name: str, split: str, iteration) -> dict:
    """Accuracy minus continued SFT's over all seeds: per problem, the mean over seeds of the difference,
    then a paired interval over problems (a problem, not a (seed, problem) pair, is the unit, so the seeds'
    repeats of a problem are not counted as independent). Needs every seed to have scored the same problems."""
    if name == BASELINE.name:
        return {}
    mine, sft, prompts = [], [], None
    for seed in protocol.seeds:
        a, b = (_samples_path(protocol, seed, n, split, iteration) for n in (name, BASELINE.name))
        if not (a.exists() and b.exists()):
            return {}
        a, b = json.loads(a.read_text()), json.loads(b.read_text())
        seen = [s["prompt"] for s in a]
        if prompts is not None and seen != prompts or seen != [s["prompt"] for s in b] or "correct" not in a[0]:
            return {}
        prompts = seen
        mine.append([float(s["correct"]) for s in a])
        sft.append([float(s["correct"]) for s in b])
    n = len(protocol.seeds)
    mean, low, high = paired_difference(
        [sum(col) / n for col in zip(*mine)],
        [sum(col) / n for col in zip(*sft)],
    )
    return {"vs_sft_pooled": mean, "vs_sft_pooled_ci_low": low, "vs_sft_pooled_ci_high": high}


def _spread(key: str, values: list[float]) -> dict:
    return {
        f"{key}_mean": _mean_of(values),
        f"{key}_sd": statistics.stdev(values) if len(values) > 1 else None,
        f"{key}_min": min(values) if values else None,
        f"{key}_max": max(values) if values else None,
        f"{key}_per_seed": values,
    }


def load_report(output: str | Path) -> dict:
    """The report `compare` wrote into `output` (`results.json`), as a dict."""
    return json.loads((Path(output) / "results.json").read_text())


def write_report(report: dict, output: Path) -> None:
    """Write results.json, summary.csv, comparison.csv, comparison.md and the plots into `output`; returns None."""
    output.mkdir(parents=True, exist_ok=True)
    write_text_atomic(output / "results.json", json.dumps(report, indent=1))
    _write_csv(output / "summary.csv", report["summary"])
    _write_csv(output / "comparison.csv", report["rows"])
    (output / "comparison.md").write_text(markdown(report))
    plot(report, output)


def markdown(report: dict) -> str:
    """The report's tables: the final evaluation over seeds (accuracy where answers can be checked, else
    gold NLL), validation per iteration, stage 1. Returns markdown."""
    protocol = report["protocol"]
    summary = report["summary"]
    checked = any(s["accuracy_mean"] is not None for s in summary)
    lines = _final_accuracy_table(protocol, summary) if checked else _final_nll_table(protocol, summary)
    lines += [
        "",
        "### Validation, per iteration (model selection reads these, never the test split)",
        "",
        "| seed | arm | data | iteration | accuracy [95% CI] | minus SFT, paired [95% CI] | gold NLL/token | gen. tokens | held-out reward acc. / margin | train reward acc. / margin | steps | train s | generate s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        if r["split"] != "validation":
            continue
        accuracy = (
            "n/a"
            if r["accuracy"] is None
            else f"{r['accuracy']:.3f} [{r['accuracy_ci_low']:.3f}, {r['accuracy_ci_high']:.3f}]"
        )
        versus = (
            f"{r['vs_sft']:+.3f} [{r['vs_sft_ci_low']:+.3f}, {r['vs_sft_ci_high']:+.3f}]"
            if r.get("vs_sft") is not None
            else ""
        )
        lines.append(
            f"| {r['seed']} | {r['arm']} | {r['data_fraction']:.0%} | {r['iteration']} | {accuracy} | {versus} | {r['nll']:.3f} "
            f"| {r['generated_tokens']:.1f} | {_fmt(r['reward_accuracy'])} / {_fmt(r['reward_margin'])} "
            f"| {_fmt(r.get('train_reward_accuracy'))} / {_fmt(r.get('train_reward_margin'))} | {r.get('train_steps') or ''} "
            f"| {_fmt(r.get('train_seconds'), 0)} | {_fmt(r.get('generation_seconds'), 0)} |"
        )
    lines += [
        "",
        f"### Stage 1: SFT-LoRA, validation gold NLL per iteration (patience {protocol['patience']})",
        "",
        "| seed | NLL/token per iteration | chosen iteration | stopped at |",
        "|---|---|---|---|",
    ]
    for seed, choice in report["stage1"].items():
        nll = ", ".join(f"{x:.4f}" for x in choice["nll"])
        stopped = "still improving" if choice["stopped_at"] is None else str(choice["stopped_at"])
        lines.append(f"| {seed} | {nll} | {choice['iteration']} | {stopped} |")
    return "\n".join(lines) + "\n"


def _final_accuracy_table(protocol: dict, summary: list[dict]) -> list[str]:
    """The final table where answers are checked: accuracy over seeds, paired with continued SFT per
    problem, per seed and pooled, and the training diagnostics."""
    split = protocol["final_split"]
    n = summary[0]["num_examples"] if summary else None
    seeds = ", ".join(map(str, protocol["seeds"]))
    lines = [
        f"### Final accuracy on the {split} split ({n} problems; seeds {seeds}; {protocol['num_iterations']} iterations)",
        "",
        "| arm | data | accuracy: mean ± sd [min, max] | per seed | minus continued SFT, paired: per seed [95% CI] | pooled over seeds [95% CI] | train steps | gen. tokens | train reward margin | real drift (SPIN, nats) | logps real: it. 0 → last | logps generated: it. 0 → last |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        per_seed = ", ".join(_fmt(a) for a in s["accuracy_per_seed"])
        paired = "; ".join(
            f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]" for d, (lo, hi) in zip(s["vs_sft_per_seed"], s["vs_sft_ci_per_seed"])
        )
        pooled = (
            f"{s['vs_sft_pooled']:+.3f} [{s['vs_sft_pooled_ci_low']:+.3f}, {s['vs_sft_pooled_ci_high']:+.3f}]"
            if s.get("vs_sft_pooled") is not None
            else ""
        )
        accuracy = (
            f"{_fmt(s['accuracy_mean'])} ± {_fmt(s['accuracy_sd'])} [{_fmt(s['accuracy_min'])}, {_fmt(s['accuracy_max'])}]"
            if s["accuracy_mean"] is not None
            else "n/a"
        )
        steps = ", ".join("" if x is None else str(x) for x in s["train_steps_per_seed"])
        arm = "start (stage-1 SFT)" if s["arm"] == START else s["arm"]
        lines.append(
            f"| {arm} | {s['data_fraction']:.0%} | {accuracy} | {per_seed} | {paired} | {pooled} | {steps} "
            f"| {_fmt(s['generated_tokens_mean'], 1)} | {_fmt(s['train_reward_margin_mean'])} | {_fmt(s['train_real_drift_mean'], 2)} "
            f"| {_fmt(s['train_logps_real_first_mean'], 1)} → {_fmt(s['train_logps_real_mean'], 1)} "
            f"| {_fmt(s['train_logps_generated_first_mean'], 1)} → {_fmt(s['train_logps_generated_mean'], 1)} |"
        )
    return lines


def _final_nll_table(protocol: dict, summary: list[dict]) -> list[str]:
    """The final table of a dataset without an answer checker: gold NLL per token over seeds (lower is
    better) and held-out reward accuracy, each arm against continued SFT."""
    n = summary[0]["num_examples"] if summary else None
    seeds = ", ".join(map(str, protocol["seeds"]))
    lines = [
        f"### Final gold NLL/token on the {protocol['final_split']} split ({n} rows; seeds {seeds}; "
        f"{protocol['num_iterations']} iterations)",
        "",
        "No answer checker for this dataset, so no accuracy: the arms are compared on the gold responses' NLL "
        "per token (lower is better) and on held-out reward accuracy (how often the policy prefers the gold "
        "response to its opponent's answer).",
        "",
        "| arm | data | gold NLL/token: mean ± sd [min, max] | per seed | minus continued SFT, mean over seeds | held-out reward acc. / margin | train steps | gen. tokens | train reward margin | real drift (SPIN, nats) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        nll = f"{_fmt(s['nll_mean'])} ± {_fmt(s['nll_sd'])} [{_fmt(s['nll_min'])}, {_fmt(s['nll_max'])}]"
        versus = "" if s["nll_vs_sft_mean"] is None else f"{s['nll_vs_sft_mean']:+.3f}"
        steps = ", ".join("" if x is None else str(x) for x in s["train_steps_per_seed"])
        lines.append(
            f"| {s['arm']} | {s['data_fraction']:.0%} | {nll} | {', '.join(_fmt(x) for x in s['nll_per_seed'])} "
            f"| {versus} | {_fmt(s['reward_accuracy_mean'])} / {_fmt(s['reward_margin_mean'])} | {steps} "
            f"| {_fmt(s['generated_tokens_mean'], 1)} | {_fmt(s['train_reward_margin_mean'])} "
            f"| {_fmt(s['train_real_drift_mean'], 2)} |"
        )
    return lines


def plot(report: dict, output: Path) -> None:
    """Write the PNG plots of `report` into `output`; returns None."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, summary = report["rows"], report["summary"]
    validation = [r for r in rows if r["split"] == "validation"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "accuracy", "validation accuracy"), (axes[1], "nll", "gold NLL / token")):
        for arm in dict.fromkeys(r["arm"] for r in validation):
            by_iteration: dict[int, list[float]] = {}
            for r in validation:
                if r["arm"] == arm and r[key] is not None:
                    x = -1 if r["iteration"] == "before" else r["iteration"]
                    by_iteration.setdefault(x, []).append(r[key])
            xs = sorted(by_iteration)
            means = [statistics.fmean(by_iteration[x]) for x in xs]
            ax.plot(xs, means, marker="o", label=arm)
            if key == "accuracy":
                lows = [min(by_iteration[x]) for x in xs]
                highs = [max(by_iteration[x]) for x in xs]
                ax.fill_between(xs, lows, highs, alpha=0.15)
        ax.set_xlabel("iteration (-1: the stage-1 SFT start)")
        ax.set_ylabel(f"{label} (mean; band: seeds' range)" if key == "accuracy" else label)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(output / "metrics_vs_iteration.png", dpi=100)
    plt.close(fig)

    first_seed = report["protocol"]["seeds"][0]
    fig, ax = plt.subplots(figsize=(10, 4))
    for arm in report["protocol"]["arms"]:
        metrics = _read_metrics(output / f"seed_{first_seed}" / arm)
        steps = [m for m in metrics if m.get("train/loss_step") not in (None, "")]
        ax.plot([_float(m["step"]) for m in steps], [_float(m["train/loss_step"]) for m in steps], label=arm)
    ax.set_xlabel(f"optimizer step (seed {first_seed})")
    ax.set_ylabel("train/loss")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(output / "loss_vs_step.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 4))
    sft = next((s for s in summary if s["arm"] == BASELINE.name), None)
    if sft and sft["accuracy_mean"] is not None:
        ax.axhline(sft["accuracy_mean"], color="gray", linestyle="--", label="continued SFT, 100%")
    for objective in dict.fromkeys(s["objective"] for s in summary if s["arm"] != START):
        points = sorted(
            (s["data_fraction"], s["accuracy_mean"], s["accuracy_sd"] or 0.0)
            for s in summary
            if s["objective"] == objective and s["arm"] != START and s["accuracy_mean"] is not None
        )
        if points:
            ax.errorbar(
                [p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points], marker="o", label=objective
            )
    ax.set_xlabel("fraction of annotated data")
    ax.set_ylabel(f"final {report['protocol']['final_split']} accuracy (mean ± sd over seeds)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(output / "accuracy_vs_data_fraction.png", dpi=100)
    plt.close(fig)


# ---- helpers -------------------------------------------------------------------------------------


@contextlib.contextmanager
def _environment(**variables: str):
    """Set environment variables for the block and restore the previous values after it."""
    previous = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _settings(config: str, overrides: list[str]) -> dict:
    """The config as a nested dict with the `--section.name[.name] value` overrides every run gets applied."""
    import yaml

    settings = yaml.safe_load(Path(config).read_text()) or {}
    i = 0
    while i < len(overrides):
        flag, equals, value = overrides[i].partition("=")
        if flag.startswith("--") and "." in flag and not flag.endswith("+"):
            if not equals and i + 1 < len(overrides):
                i, value = i + 1, overrides[i + 1]
            *parents, leaf = flag.removeprefix("--").split(".")
            node = settings
            for key in parents:
                node = node.setdefault(key, {}) if isinstance(node.get(key), dict | None) else {}
            node[leaf] = yaml.safe_load(value)
        i += 1
    return settings


def _finished(run_dir: Path, iterations: int) -> bool:
    """Whether the run in `run_dir` saved and evaluated its last iteration."""
    run = RunDir(run_dir)
    last = iterations - 1
    return last in run.read_results() and (run.iteration(last) / "adapter_model.safetensors").exists()


def _write_csv(path: Path, rows: list[dict]) -> None:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows([{k: json.dumps(v) if isinstance(v, list) else v for k, v in row.items()} for row in rows])


def _read_metrics(run_dir: Path) -> list[dict]:
    rows = []
    for path in sorted(run_dir.glob("logs/version_*/metrics.csv")):
        with open(path) as f:
            rows += list(csv.DictReader(f))
    return rows


def _float(value) -> float:
    return float(value) if value not in (None, "") else math.nan


def _mean(rows: list[dict], key: str) -> float | None:
    values = [_float(r.get(key)) for r in rows if r.get(key) not in (None, "")]
    return sum(values) / len(values) if values else None


def _mean_of(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _fmt(value, digits: int = 3) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"
