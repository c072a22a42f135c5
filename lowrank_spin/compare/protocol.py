"""`lowrank-spin compare`: the papers' protocol in one command, SFT first, then SFT vs SPIN vs T-SPIN.

    lowrank-spin compare --config configs/smollm2_compare.yaml --seeds 0 1 2 --output runs/compare_smollm2
    lowrank-spin compare --config configs/tiny_spin.yaml --seeds 0 1 --output runs/tiny_compare   # seconds

Each seed (`seed_everything` and `data.seed`) runs the whole protocol in `<output>/seed_<s>/`:

1. **Stage 1, `stage1_sft/`** (or `--stage1 RUN [CONTINUATION...]`, one SFT run that every seed starts
   from, with any runs that continued it from its last adapter): SFT-LoRA
   on the annotated data until it has stopped improving, at `--sft_learning_rate`. After each iteration
   it scores validation accuracy (where answers are checked; else gold NLL, the selection metric) and
   gold NLL; the stage stops once `--patience` iterations in a row have not improved on the best
   (`data.evaluation.patience`; ties on accuracy go to the lower NLL), or at the cap, `--sft_iterations`
   (the report's first line then says it was capped, not converged). The best iteration's adapter is
   kept: SPIN starts from an SFT model that has stopped improving (Chen et al. 2024, §5.1 and §5.3), so
   every later arm starts from it; continued SFT past it is the control.
2. **Stage 2:** from that adapter (`model.lora.init_adapter`), continued SFT, SPIN and T-SPIN for the
   config's `model.num_iterations`, on 100% of the annotated data, plus the data-scarcity arms
   (`--fraction_arms`, T-SPIN by default, on each of `--data_fractions` of the rows, `data.max_samples`),
   plus any named variants (`--variant spin_anchor spin model.objective.nll_weight=1.0`: an objective
   on all the data with settings of its own, to study on validation which SPIN settings hold up).
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

This module holds the arguments, the plan and the runs of each seed; `report.py` reads what they wrote.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lightning as L
from jsonargparse import Namespace

from lowrank_spin.evaluation import best_iteration
from lowrank_spin.files import RunDir, write_text_atomic
from lowrank_spin.settings import ConfigError

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


# What a `--variant` may change: how an arm trains and samples, not what every arm is measured on.
VARIANT_PREFIXES = ("model.", "data.sampling.")


@dataclass(frozen=True)
class Arm:
    """One stage-2 run of each seed: an objective on a fraction of the annotated rows, or a named
    variant (`--variant`): an objective on all of them with settings of its own (`flags`)."""

    objective: str
    fraction: float = 1.0
    label: str = ""
    flags: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """Its folder and report name, e.g. `tspin_25pct`, or the variant's own."""
        return self.label or f"{self.objective}_{int(round(self.fraction * 100))}pct"


BASELINE = Arm("sft")  # continued SFT on all the data: every arm is paired with it


def parse_arguments(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """`compare`'s own arguments, and the rest: the overrides every `fit` gets."""
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
        "--variant",
        nargs="+",
        action="append",
        default=[],
        metavar="NAME OBJECTIVE KEY=VALUE",
        help="another arm on all the data: its name, its objective and its own settings, e.g. "
        "--variant spin_anchor spin model.objective.nll_weight=1.0 (repeatable; model.* and data.sampling.*)",
    )
    parser.add_argument(
        "--num_train",
        type=int,
        default=None,
        help="annotated rows at 100%% (default: all the config's data, as given)",
    )
    parser.add_argument(
        "--stage1",
        nargs="+",
        default=None,
        metavar="RUN",
        help="a finished SFT run (fit --model.objective.name=sft, evaluated on validation every iteration) "
        "that every seed's stage 2 starts from, instead of a stage 1 per seed (the papers have one SFT model); "
        "more runs after it are its continuations, each started from the one before's last adapter "
        "(model.lora.init_adapter), read as one run",
    )
    parser.add_argument("--sft_iterations", type=int, default=12, help="stage 1: the cap on SFT iterations")
    parser.add_argument(
        "--patience", type=int, default=2, help="stage 1: stop after this many without a better validation metric"
    )
    parser.add_argument(
        "--sft_learning_rate", type=float, default=None, help="stage 1's learning rate (default: the config's)"
    )
    parser.add_argument(
        "--test_examples", type=int, default=None, help="score the first N test problems (default: all)"
    )
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
    return parser.parse_known_args(argv)  # anything else goes to every `fit`


def read_settings(parse: Callable[[list[str]], Namespace], config: str, overrides: list[str]) -> tuple[dict, list[str]]:
    """The config every run gets (`config` with `overrides`) as `parse` (the `fit` CLI's parser) reads
    it, a nested dict with every default from the code, and the errors of parsing it. Nothing is
    instantiated: no model is loaded. Empty when `config` is not a file (argument_errors says so)."""
    if not Path(config).is_file():
        return {}, []
    try:
        return parse(["--config", config, *overrides]).as_dict(), []
    except ConfigError as error:
        return {}, error.errors


def argument_errors(args: argparse.Namespace, overrides: list[str], settings: dict) -> list[str]:
    """Every bad argument of `compare`, each naming its flag (empty when all are fine)."""
    errors = []
    if not Path(args.config).is_file():
        errors.append(f"--config: {args.config!r} is not a file")
    for flag, values, allowed in (("--arms", args.arms, ARMS), ("--fraction_arms", args.fraction_arms, ARMS)):
        if bad := [v for v in values if v not in allowed]:
            errors.append(f"{flag}: each must be one of {ARMS}, got {bad}")
    errors += _variant_errors(args)
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
    if args.stage1 is not None:
        errors += _stage1_errors(args.stage1)
    for flag in ("sft_learning_rate", "test_examples"):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:
            errors.append(f"--{flag}: must be > 0, got {getattr(args, flag)}")
    if args.num_train is not None and args.num_train < 1:
        errors.append(f"--num_train: must be >= 1, got {args.num_train}")
    for flag in PROTOCOL_FLAGS:
        if any(o == flag or o.startswith(flag + "=") for o in overrides):
            errors.append(f"{flag}: set by compare for each run (seeds: --seeds); drop it from the command")
    if settings:
        errors += _data_errors(settings["data"])
    return errors


def _stage1_errors(runs: list[str]) -> list[str]:
    """`--stage1 RUN [CONTINUATION...]`: each run holds per-iteration validation rows, and each
    continuation started where the run before it ended: its evaluation before training (the adapter it
    started from) scores what that run's last iteration scored."""
    errors, previous = [], None  # (run, its last iteration, that iteration's row)
    for run in runs:
        results = RunDir(run).read_results() if Path(run).is_dir() else {}
        if not any(i >= 0 and r.get("split") == "validation" for i, r in results.items()):
            errors.append(f"--stage1: {run!r} holds no per-iteration validation results (results.json)")
            previous = None
            continue
        start = results.get(RunDir.BEFORE)
        if previous is not None:
            before, last, row = previous
            if start is None or start.get("accuracy") != row.get("accuracy") or abs(start["nll"] - row["nll"]) > 1e-4:
                seen = "no evaluation before training" if start is None else f"NLL {start['nll']:.5f} before training"
                errors.append(
                    f"--stage1: {run!r} does not continue {before!r}: {seen}, where that run's last iteration "
                    f"scored NLL {row['nll']:.5f} (a continuation starts from the run before's last adapter: "
                    f"model.lora.init_adapter {RunDir(before).iteration(last)})"
                )
        last = max(results)
        previous = (run, last, results[last])
    return errors


def _variant_errors(args: argparse.Namespace) -> list[str]:
    """Each `--variant NAME OBJECTIVE KEY=VALUE...`: a new name, a known objective, settings it may change."""
    errors, taken = [], {Arm(a).name for a in args.arms} | {"start", "test", "stage1_sft"}
    for variant in args.variant:
        name, objective, flags = variant[0], (variant[1:2] or [None])[0], variant[2:]
        if not name.isidentifier() or name in taken:
            errors.append(f"--variant {name}: the name must be a new identifier (not {sorted(taken)})")
        taken.add(name)
        if objective not in ARMS:
            errors.append(f"--variant {name}: the objective must be one of {ARMS}, got {objective!r}")
        for flag in flags:
            key, equals, _ = flag.partition("=")
            if not equals or not key.startswith(VARIANT_PREFIXES) or "--" + key in PROTOCOL_FLAGS:
                errors.append(
                    f"--variant {name}: {flag!r} must be KEY=VALUE with KEY under {' or '.join(VARIANT_PREFIXES)} "
                    "(not one compare sets per run)"
                )
    return errors


def variant_overrides(args: argparse.Namespace) -> list[list[str]]:
    """Each variant's settings as `fit` flags, to be parsed (and refused) before any fit starts."""
    return [[f"--{flag}" for flag in variant[2:]] for variant in args.variant]


def _data_errors(data: dict) -> list[str]:
    """Stage 1 selects on validation and the report scores test: both must exist before any fit."""
    from lowrank_spin.data import MATH

    if data["dataset"] == MATH:
        return [
            f"data.{name}: the protocol needs a {split} split (stage 1 selects on validation, the report scores test), got {data[name]}"
            for name, split in (("num_val", "validation"), ("num_test", "test"))
            if data[name] < 1
        ]
    if not (data["val_dataset"] or data["val_split"]) and data["val_fraction"] <= 0:
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
    stage1: tuple[Path, ...] | None  # a shared stage-1 run and its continuations; None: one run per seed
    sft_learning_rate: float | None
    test_examples: int | None
    test: bool
    beta: float | list[float]


def plan(args: argparse.Namespace, overrides: list[str], settings: dict) -> Protocol:
    """The arms, their data sizes and epochs (equal total steps), printed; returns the Protocol."""
    from lowrank_spin.data import MATH

    model, data = settings["model"], settings["data"]
    arms = [Arm(a) for a in dict.fromkeys(args.arms)]
    arms += [Arm(v[1], label=v[0], flags=tuple(f)) for v, f in zip(args.variant, variant_overrides(args))]
    arms += [Arm(a, f) for f in sorted(args.data_fractions) for a in dict.fromkeys(args.fraction_arms)]
    fractions = sorted({arm.fraction for arm in arms})
    epochs, batch = model["epochs_per_iteration"], data["batch_size"]
    sizes, total = _training_sizes(data, fractions, args.num_train)
    per_fraction = {}
    for f in fractions:
        rows = total if sizes[f] is None else sizes[f]
        steps = math.ceil(rows / batch)
        full = math.ceil(total / batch)
        per_fraction[f] = max(1, round(epochs * full / steps)) if args.equal_steps else epochs
    iterations = model["num_iterations"]
    for f in fractions:
        rows = total if sizes[f] is None else sizes[f]
        print(
            f"[compare] {f:.0%} of the data: {rows} rows, {per_fraction[f]} epoch(s) per iteration, "
            f"{iterations * per_fraction[f] * math.ceil(rows / batch)} optimizer steps in {iterations} iterations"
        )
    dataset = data["dataset"]
    test = args.test and dataset == MATH
    if args.test and not test:
        print(f"[compare] data.dataset {dataset!r} has no test split: the report scores its validation rows")
    split_size = data["num_val"] if dataset == MATH else None
    shown = min(x for x in (split_size, data["evaluation"]["max_examples"]) if x is not None) if split_size else None
    if shown is not None and shown < 300:
        print(f"[compare] note: {shown} validation problems; the protocol asks for >= 300 for narrow paired intervals")
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
        stage1=None if args.stage1 is None else tuple(Path(run) for run in args.stage1),
        sft_learning_rate=args.sft_learning_rate,
        test_examples=args.test_examples,
        test=test,
        beta=model["objective"]["beta"],
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

    # Stage 1: SFT until validation accuracy and NLL have both stopped improving (the fit stops itself).
    stage1_runs = protocol.stage1 or (seed_dir / STAGE1,)
    if protocol.stage1 is None:
        _fit(
            fit,
            protocol,
            stage1_runs[0],
            protocol.sft_iterations,
            [
                *common,
                "--model.objective.name=sft",
                f"--model.num_iterations={protocol.sft_iterations}",
                "--data.evaluation.split=validation",
                "--data.evaluation.every_iteration=true",
                f"--data.evaluation.patience={protocol.patience}",
                "--data.evaluation.heldout_reward_pairs=0",
                *(
                    []
                    if protocol.sft_learning_rate is None
                    else [f"--model.optimizer.learning_rate={protocol.sft_learning_rate}"]
                ),
            ],
            group,
            f"seed{seed}_{STAGE1}",
        )
    choice = select_sft_adapter([RunDir(run) for run in stage1_runs], protocol.patience)
    seed_dir.mkdir(parents=True, exist_ok=True)  # (a shared stage 1 has not made it)
    write_text_atomic(seed_dir / "stage1.json", json.dumps(choice, indent=1))
    print(
        f"[compare] seed {seed} stage 1: validation NLL {', '.join(f'{x:.4f}' for x in choice['nll'])}; "
        f"starting every arm from iteration {choice['iteration']} ({choice['adapter']})"
        + ("" if choice["stopped_at"] is not None else "; capped, still improving: raise --sft_iterations")
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
                *arm.flags,
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
                        f"--data.evaluation.max_examples={'null' if protocol.test_examples is None else protocol.test_examples}",
                        "--data.evaluation.heldout_reward_pairs=0",
                        "--trainer.callbacks+=lowrank_spin.compare.EvaluateOnly",
                    ]
                )
    return choice


def select_sft_adapter(run_dirs: list[RunDir], patience: int) -> dict:
    """Stage 1's choice from its per-iteration validation rows: the best iteration by accuracy (ties to
    the lower NLL; by NLL where answers are not checked), counting iterations only until `patience` in a
    row have not improved on it (the rule `data.evaluation.patience` stops a fit by). `run_dirs` are a run
    and its continuations (`--stage1`; usually the run alone), their iterations numbered on in order.

    Returns {"iteration", "adapter" (its folder), "metric", "nll" and "accuracy" (per counted iteration,
    in order), "stopped_at" (the iteration that ended the stage; None if it was still improving at its last)}.
    """
    rows, adapters = [], []  # per stage-1 iteration, in order over the runs
    for run_dir in run_dirs:
        results = run_dir.read_results()
        for i in sorted(i for i in results if i >= 0):
            rows.append(results[i])
            adapters.append(run_dir.iteration(i))
    if not rows:
        raise ValueError(f"stage 1 wrote no per-iteration validation rows ({run_dirs[0].results})")
    results, iterations = dict(enumerate(rows)), list(range(len(rows)))
    metric = "accuracy" if any(results[i].get("accuracy") is not None for i in iterations) else "nll"
    stopped_at = None
    for i in iterations:
        best = best_iteration({t: results[t] for t in iterations if t <= i}, metric)
        if i - best >= patience:
            stopped_at = i
            break
    counted = [t for t in iterations if stopped_at is None or t <= stopped_at]
    return {
        "iteration": best,
        "adapter": str(adapters[best]),
        "metric": metric,
        "nll": [results[t]["nll"] for t in counted],
        "accuracy": [results[t].get("accuracy") for t in counted],
        "stopped_at": stopped_at,
    }


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
    if RunDir(run_dir).finished(iterations):
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
