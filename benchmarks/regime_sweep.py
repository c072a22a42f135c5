"""Where does self-play pay? `lowrank-spin compare` at settings other than the config's, validation only.

    python benchmarks/regime_sweep.py --base runs/compare_smollm2 --output runs/sweep
    python benchmarks/regime_sweep.py --base runs/compare_smollm2 --output runs/sweep --points n256 spin_nll1
    python benchmarks/regime_sweep.py --base runs/compare_smollm2 --output runs/sweep --test epochs2

Each point is one `lowrank-spin compare --config <--config> --seeds 0 --no-test` run
into `<output>/<point>/` with the point's overrides, evaluated on the validation split only, after the
last iteration (`data.evaluation.every_iteration=false`; the protocol's arms are otherwise unchanged).
A point starts from copies of the `--base` seed-0 runs that its overrides leave as they are (stage 1,
and continued SFT where only a self-play setting changes; `compare` reuses finished runs), so it pays
only for what it changes; the stage-2 learning rate and epochs points re-run continued SFT, and n256
its own stage 1 (on 256 problems). `base` reuses every arm: its seed 0 of the 3-seed comparison, which
evaluated after every iteration. Points run in the order given; a finished point is reused.

The table (`<output>/sweep.md`, printed) holds every point that finished, winners and losers alike:
validation accuracy of each arm and its paired difference against the same point's continued SFT.
Settings are chosen on it; `--test POINT` then evaluates that point's final adapters on the test
split, once (`compare` without `--no-test`, reusing every finished run, and the base's test scores of
the runs the point copied).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import report

SEED = 0


@dataclass(frozen=True)
class Point:
    overrides: tuple[str, ...]
    arms: tuple[str, ...]  # stage-2 arms on all the data; `sft` is always one (the pairing baseline)
    reuse: tuple[str, ...]  # runs of --base's seed 0 that the overrides leave as they are
    note: str


STAGE1 = ("stage1_sft",)
STAGE1_SFT = ("stage1_sft", "sft_100pct")
POINTS = {
    "base": Point(
        (),
        ("sft", "spin", "tspin"),
        (*STAGE1_SFT, "spin_100pct", "tspin_100pct"),
        "the config (β 0.1, lr 5e-5, 1 epoch)",
    ),
    "n256": Point(("--data.num_train=256",), ("sft", "spin", "tspin"), (), "256 annotated problems, own stage 1"),
    "spin_nll1": Point(
        ("--model.objective.nll_weight=1.0",), ("sft", "spin", "tspin"), STAGE1_SFT, "gold-NLL anchor 1.0"
    ),
    "spin_beta0.5": Point(("--model.objective.beta=0.5",), ("sft", "spin"), STAGE1_SFT, "SPIN β (λ) 0.5"),
    "spin_keep_prev": Point(
        ("--data.keep_previous_iterations=true",),
        ("sft", "spin"),
        STAGE1_SFT,
        "iteration 1 also on iteration 0's pairs",
    ),
    "tspin_alpha0.1": Point(("--model.objective.tspin_alpha=0.1",), ("sft", "tspin"), STAGE1_SFT, "T-SPIN α 0.1"),
    "tspin_length_norm": Point(
        ("--model.objective.length_normalize=true",), ("sft", "tspin"), STAGE1_SFT, "T-SPIN on mean token log-probs"
    ),
    "lr1e-4": Point(("--model.optimizer.learning_rate=1.0e-4",), ("sft", "spin"), STAGE1, "stage 2 lr 1e-4"),
    "epochs2": Point(("--model.epochs_per_iteration=2",), ("sft", "spin"), STAGE1, "2 epochs per iteration"),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/smollm2_compare.yaml", help="the fit config of every point")
    parser.add_argument("--base", type=Path, help="a finished `compare` output whose seed 0 the points may reuse")
    parser.add_argument("--output", type=Path, default=Path("runs/sweep"))
    parser.add_argument("--points", nargs="+", choices=list(POINTS), default=list(POINTS))
    parser.add_argument("--test", choices=list(POINTS), help="evaluate this (finished) point on the test split")
    args = parser.parse_args(argv)
    names = [args.test] if args.test else args.points
    for name in names:
        point, folder = POINTS[name], args.output / name
        if point.reuse:
            if args.base is None:
                parser.error(f"--base: point {name!r} reuses {', '.join(point.reuse)} of a finished compare")
            seed_from_base(args.base / f"seed_{SEED}", folder / f"seed_{SEED}", point.reuse, test=bool(args.test))
        compare(args.config, folder, point, test=bool(args.test))
    if args.test:
        return
    table = sweep_table(args.output, args.points)
    (args.output / "sweep.md").write_text(table)
    print(table)


def seed_from_base(base: Path, seed_dir: Path, runs: tuple[str, ...], test: bool) -> None:
    """Copy finished runs of the base's seed into a point's seed folder (once); with `test`, also their
    test evaluations (and the start's, where stage 1 is reused), so only the point's own arms are scored."""
    for name in runs:
        if not (base / name / "results.json").exists():
            sys.exit(f"--base: {base / name} is not a finished run")
        if not (seed_dir / name).exists():
            shutil.copytree(base / name, seed_dir / name)
    if test:
        evaluated = ["start" if name == "stage1_sft" else name for name in runs]
        for name in evaluated:
            source, target = base / "test" / name, seed_dir / "test" / name
            if (source / "results.json").exists() and not target.exists():
                shutil.copytree(source, target)


def compare(config: str, folder: Path, point: Point, test: bool) -> None:
    command = [
        *report.cli_command(),
        "compare",
        *("--config", config, "--seeds", str(SEED), "--output", str(folder)),
        *("--arms", *point.arms, "--fraction_arms"),
        "--test" if test else "--no-test",
        "--data.evaluation.every_iteration=false",
        *point.overrides,
    ]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True)


def sweep_table(output: Path, names: list[str]) -> str:
    """One row per (point, self-play arm): final validation accuracy, and minus the point's continued SFT."""
    lines = [
        "| point | setting | arm | validation accuracy (300) | continued SFT | minus SFT, paired [95% CI] "
        "| train reward acc. (last iteration) | gold NLL/token | answer tokens |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        path = output / name / "results.json"
        if not path.exists():
            continue
        summary = {s["arm"]: s for s in json.loads(path.read_text())["summary"]}
        sft = summary["sft_100pct"]["accuracy_mean"]
        for arm, s in summary.items():
            if arm in ("start", "sft_100pct"):
                continue
            paired = f"{s['vs_sft_pooled']:+.3f} [{s['vs_sft_pooled_ci_low']:+.3f}, {s['vs_sft_pooled_ci_high']:+.3f}]"
            cells = [name, POINTS[name].note, arm, _number(s["accuracy_mean"]), _number(sft), paired]
            cells += [
                _number(s["train_reward_accuracy_mean"], ".2f"),
                _number(s["nll_mean"]),
                _number(s["generated_tokens_mean"], ".1f"),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _number(value: float | None, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


if __name__ == "__main__":
    main()
