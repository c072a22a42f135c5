"""`lowrank-spin compare`: SFT vs SPIN vs T-SPIN from the same start, one command.

    lowrank-spin compare --config configs/smollm2_spin.yaml --output runs/compare
    lowrank-spin compare --config configs/tiny_spin.yaml --data_fractions 0.25 0.5 1.0 --output runs/scarcity

Each arm is an ordinary `lowrank-spin fit` of the same config with only `model.objective` changed
(and, for the data-scarcity study, `data.max_samples`), so every arm starts from the same model and
`model.init_adapter` and trains the same epochs per iteration. At fraction 1.0 an arm trains on the data
as the config gives it; below, on that fraction of its training rows, counted once beforehand (a user
dataset's held-out share is drawn before `max_samples`, so every fraction scores the same held-out rows). The arms' `results.json` and metrics
CSV are then collected into `comparison.md` / `comparison.csv` and PNG plots.

Every arm starts from the same model and scores the same evaluation split, so the "before" evaluation is
run once and copied into the other arms. Arms below 100% of the data evaluate only before the first and
after the last iteration (`data.eval_every_iteration false`; pass `--data.eval_every_iteration true` to
override). W&B runs (when the config logs to W&B) share one group, the output folder's name, unless
`WANDB_RUN_GROUP` is set; each run is named after its arm and fraction.
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
from collections.abc import Callable
from pathlib import Path

from lowrank_spin.evaluation import paired_difference
from lowrank_spin.files import RunDir, write_text_atomic

ARMS = ("sft", "spin", "tspin")


def main(argv: list[str], fit: Callable[[list[str]], object]) -> None:
    """Run every arm with `fit` (the `fit` CLI over a list of arguments), then write and print the report."""
    parser = argparse.ArgumentParser(prog="lowrank-spin compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="a fit config; every arm uses it")
    parser.add_argument("--output", default="runs/compare", help="one sub-folder per arm and data fraction")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--data_fractions", nargs="+", type=float, default=[1.0])
    parser.add_argument(
        "--num_train",
        type=int,
        default=None,
        help="annotated examples at fraction 1.0 (default: all the config's data, as given)",
    )
    args, overrides = parser.parse_known_args(argv)  # anything else goes to every arm's `fit`
    bad = [f for f in args.data_fractions if not 0 < f <= 1]
    if bad:
        parser.error(f"--data_fractions: each must be in (0, 1], got {bad}")
    output = Path(args.output)
    runs = run_arms(fit, args.config, output, args.arms, args.data_fractions, args.num_train, overrides)
    rows = collect(runs)
    write_report(rows, runs, output)
    print((output / "comparison.md").read_text())


def run_arms(
    fit: Callable[[list[str]], object],
    config: str,
    output: Path,
    arms,
    fractions,
    num_train: int | None,
    overrides: list[str],
) -> dict:
    """Run (or reuse) one `fit` per arm and data fraction; returns {(arm, fraction): run folder}.

    At fraction 1.0 an arm trains on the data as the config (and `overrides`) give it; below, on that
    fraction of its training rows (`data.max_samples`). `num_train`, when given, is the rows at 1.0.
    """
    sizes = _training_sizes(config, overrides, fractions, num_train)
    group = os.environ.get("WANDB_RUN_GROUP") or output.resolve().name
    runs = {}
    for fraction in fractions:
        for arm in arms:
            name = f"{arm}_{int(round(fraction * 100))}pct"
            run_dir = output / name
            args = [
                "fit",
                "--config",
                config,
                "--model.objective.name",
                arm,
                "--trainer.default_root_dir",
                str(run_dir),
                "--trainer.logger.init_args.save_dir",
                str(run_dir),
                *([] if fraction == 1 else ["--data.evaluation.every_iteration", "false"]),
                *overrides,
                # after the overrides: a `--data.max_samples` among them is the data at 1.0, and sizes the fractions
                *([] if sizes[fraction] is None else ["--data.max_samples", str(sizes[fraction])]),
            ]
            if (run_dir / "results.json").exists() and _finished(run_dir, config):
                print(f"[compare] {run_dir} already finished: reusing it")
            else:
                if runs:
                    _share_before_evaluation(next(iter(runs.values())), run_dir)
                print(f"[compare] {arm} at {fraction:.0%} of the data -> {run_dir}")
                with _environment(WANDB_RUN_GROUP=group, WANDB_NAME=name):  # W&B reads these
                    fit(
                        args + (["--ckpt_path", "last"] if (RunDir(run_dir).checkpoints / "last.ckpt").exists() else [])
                    )
            runs[(arm, fraction)] = run_dir
    return runs


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


def collect(runs: dict) -> list[dict]:
    """One row per (arm, fraction, iteration): eval metrics, training rewards and wall times."""
    rows = []
    for (arm, fraction), run_dir in runs.items():
        metrics = _read_metrics(run_dir)
        for result in json.loads((run_dir / "results.json").read_text()):
            iteration = result["iteration"]
            steps = [
                m
                for m in metrics
                if m.get("rewards/accuracy") not in (None, "") and _float(m.get("iteration")) == iteration
            ]
            train = [m for m in metrics if m.get("time/train_epoch_seconds") not in (None, "")]
            generation = [
                m
                for m in metrics
                if m.get("generation/iteration") not in (None, "") and _float(m["generation/iteration"]) == iteration
            ]
            epochs = [m for m in train if _float(m["time/iteration"]) == iteration]
            rows.append(
                {
                    "arm": arm,
                    "data_fraction": fraction,
                    "iteration": "before" if iteration < 0 else iteration,
                    "accuracy": result.get("accuracy"),
                    "accuracy_ci_low": result.get("accuracy_ci_low"),
                    "accuracy_ci_high": result.get("accuracy_ci_high"),
                    **{k: v for k, v in result.items() if k.startswith("accuracy_") and k.endswith("_steps")},
                    "nll": result["nll"],
                    "generated_tokens": result["generated_tokens"],
                    # held-out pairs (gold vs the opponent's answers), and the training pairs of the iteration
                    "reward_accuracy": result.get("reward_accuracy"),
                    "reward_margin": result.get("reward_margin"),
                    "train_reward_accuracy": _mean(steps, "rewards/accuracy"),
                    "train_reward_margin": _mean(steps, "rewards/margin"),
                    "train_seconds": sum(_float(m["time/train_epoch_seconds"]) for m in epochs)
                    if iteration >= 0
                    else None,
                    "generation_seconds": sum(_float(m["generation/seconds"]) for m in generation)
                    if iteration >= 0
                    else None,
                }
            )
    _add_paired_differences(rows, runs)
    return rows


def _add_paired_differences(rows: list[dict], runs: dict) -> None:
    """Each arm's accuracy minus SFT's at the same data fraction and iteration, paired by problem."""

    def correct(arm, fraction, iteration):
        """Per-problem correctness of one arm's evaluation, or None where it was not evaluated."""
        run_dir = runs.get((arm, fraction))
        path = run_dir / f"iter_{iteration}" / "eval_samples.json" if run_dir else None
        return [bool(s.get("correct")) for s in json.loads(path.read_text())] if path and path.exists() else None

    for row in rows:
        if row["iteration"] == "before" or row["arm"] == "sft" or row["accuracy"] is None:
            continue
        mine, sft = (
            correct(row["arm"], row["data_fraction"], row["iteration"]),
            correct("sft", row["data_fraction"], row["iteration"]),
        )
        if mine and sft and len(mine) == len(sft):
            row["vs_sft"], row["vs_sft_ci_low"], row["vs_sft_ci_high"] = paired_difference(mine, sft)


def write_report(rows: list[dict], runs: dict, output: Path) -> None:
    """Write comparison.csv, comparison.md and the plots into `output`; returns None."""
    output.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(output / "comparison.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        "| arm | data | iteration | accuracy [95% CI] | minus SFT, paired [95% CI] | gold NLL/token | gen. tokens | held-out reward acc. / margin | train reward acc. / margin | train s | generate s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
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
            f"| {r['arm']} | {r['data_fraction']:.0%} | {r['iteration']} | {accuracy} | {versus} | {r['nll']:.3f} | {r['generated_tokens']:.1f} "
            f"| {_fmt(r['reward_accuracy'])} / {_fmt(r['reward_margin'])} | {_fmt(r['train_reward_accuracy'])} / {_fmt(r['train_reward_margin'])} "
            f"| {_fmt(r['train_seconds'], 0)} | {_fmt(r['generation_seconds'], 0)} |"
        )
    (output / "comparison.md").write_text("\n".join(lines) + "\n")
    plot(rows, runs, output)


def plot(rows: list[dict], runs: dict, output: Path) -> None:
    """Write the PNG plots of `rows` (and the runs' loss curves) into `output`; returns None."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fractions = sorted({r["data_fraction"] for r in rows})
    full = [r for r in rows if r["data_fraction"] == fractions[-1]]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "accuracy", "accuracy"), (axes[1], "nll", "gold NLL / token")):
        for arm in dict.fromkeys(r["arm"] for r in full):
            points = [r for r in full if r["arm"] == arm and r[key] is not None]
            xs = [-1 if r["iteration"] == "before" else r["iteration"] for r in points]
            ax.plot(xs, [r[key] for r in points], marker="o", label=arm)
            if key == "accuracy":
                ax.fill_between(
                    xs, [r["accuracy_ci_low"] for r in points], [r["accuracy_ci_high"] for r in points], alpha=0.15
                )
        ax.set_xlabel("iteration (-1: before)")
        ax.set_ylabel(label)
        ax.legend()
    fig.tight_layout()
    fig.savefig(output / "metrics_vs_iteration.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(10, 4))
    for (arm, fraction), run_dir in runs.items():
        if fraction != fractions[-1]:
            continue
        metrics = _read_metrics(run_dir)
        steps = [m for m in metrics if m.get("train/loss_step") not in (None, "")]
        ax.plot(
            [_float(m["time/elapsed_seconds"]) for m in steps], [_float(m["train/loss_step"]) for m in steps], label=arm
        )
        for m in metrics:  # generation phases of this arm, shaded
            if m.get("generation/seconds") not in (None, ""):
                end = _float(m["generation/end_elapsed_seconds"])
                ax.axvspan(end - _float(m["generation/seconds"]), end, alpha=0.08, color="gray")
                ax.text(
                    end,
                    ax.get_ylim()[1] if ax.has_data() else 0,
                    f" iter {int(_float(m['generation/iteration']))} generate_data",
                    fontsize=6,
                    rotation=90,
                    va="top",
                )
    ax.set_xlabel("wall-clock seconds (shaded: generation)")
    ax.set_ylabel("train/loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(output / "loss_vs_time.png", dpi=100)
    plt.close(fig)

    if len(fractions) > 1:
        fig, ax = plt.subplots(figsize=(5, 4))
        for arm in dict.fromkeys(r["arm"] for r in rows):
            finals = []
            for fraction in fractions:
                arm_rows = [
                    r for r in rows if r["arm"] == arm and r["data_fraction"] == fraction and r["iteration"] != "before"
                ]
                finals.append(arm_rows[-1]["accuracy"] if arm_rows else math.nan)
            ax.plot(fractions, finals, marker="o", label=arm)
        ax.set_xlabel("fraction of annotated data")
        ax.set_ylabel("final accuracy")
        ax.legend()
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


def _training_sizes(config: str, overrides: list[str], fractions, num_train: int | None) -> dict:
    """`data.max_samples` per data fraction (None: the data as given), printed with where it came from."""
    if num_train is None and all(f == 1 for f in fractions):
        print("[compare] every arm trains on the config's data as given")
        return {f: None for f in fractions}
    if num_train is not None:
        total, what = num_train, f"--num_train {num_train}"
    else:
        total, what = _training_rows(_data_section(config, overrides))
    sizes = {f: None if f == 1 and num_train is None else max(1, int(round(total * f))) for f in fractions}
    shown = ", ".join(f"{f:.0%}: " + ("as given" if n is None else f"data.max_samples {n}") for f, n in sizes.items())
    print(f"[compare] data fractions of {total} training rows ({what}): {shown}")
    return sizes


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


def _data_section(config: str, overrides: list[str]) -> dict:
    """The config's flat `data` settings with the `--data.<name> value` overrides every arm gets applied."""
    import yaml

    data = dict((yaml.safe_load(Path(config).read_text()) or {}).get("data") or {})
    i = 0
    while i < len(overrides):
        name, equals, value = overrides[i].removeprefix("--data.").partition("=")
        if overrides[i].startswith("--data.") and "." not in name:
            if not equals and i + 1 < len(overrides):
                i, value = i + 1, overrides[i + 1]
            data[name] = yaml.safe_load(value)
        i += 1
    return data


def _finished(run_dir: Path, config: str) -> bool:
    import yaml

    iterations = int(((yaml.safe_load(Path(config).read_text()) or {}).get("model") or {}).get("num_iterations", 2))
    return (run_dir / f"iter_{iterations - 1}" / "adapter_model.safetensors").exists()


def _read_metrics(run_dir: Path) -> list[dict]:
    rows = []
    for path in sorted(run_dir.glob("logs/version_*/metrics.csv")):
        with open(path) as f:
            rows += list(csv.DictReader(f))
    return rows


def _float(value) -> float:
    return float(value) if value not in (None, "") else math.nan


def _mean(rows: list[dict], key: str) -> float | None:
    values = [_float(r[key]) for r in rows]
    return sum(values) / len(values) if values else None


def _fmt(value, digits: int = 3) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"
