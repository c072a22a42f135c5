"""The report of `lowrank-spin compare`: what the runs of every seed wrote (their `results.json`,
evaluation samples and `metrics.csv`), read into rows per seed, arm, split and iteration; the statistics
over seeds (spread, paired differences to continued SFT); and the files written from them:
`results.json`, `summary.csv`, `comparison.csv`, `comparison.md` (the tables) and the PNG plots."""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

from lowrank_spin.compare.protocol import BASELINE, START, Arm, Protocol
from lowrank_spin.evaluation import paired_difference
from lowrank_spin.files import RunDir, write_text_atomic
from lowrank_spin.settings import per_iteration

# a judge's win rates (judge.py): of each arm's answers against the gold responses and against the
# run's initial model, which for a stage-2 arm is the stage-1 start
WIN_RATES = tuple(
    f"win_rate_vs_{reference}{suffix}" for reference in ("gold", "initial") for suffix in ("", "_ci_low", "_ci_high")
)


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
            "variants": {arm.name: [arm.objective, *arm.flags] for arm in protocol.arms if arm.label},
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
        # judged by the reward model `data.evaluation.judge`, when one was named (judge.py)
        **{k: result.get(k) for k in WIN_RATES if k in result},
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
            **{
                f"{key}_mean": _mean_of([r.get(key) for r in finals])
                for key in ("win_rate_vs_gold", "win_rate_vs_initial")
                if any(r.get(key) is not None for r in finals)
            },
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
    if protocol.get("variants"):
        lines += ["", "Variants: " + "; ".join(f"{name} = {' '.join(v)}" for name, v in protocol["variants"].items())]
    judged = any(r.get("win_rate_vs_gold") is not None for r in report["rows"])
    if judged:
        lines += _final_win_rate_table(protocol, summary)
    lines += [
        "",
        "### Validation, per iteration (model selection reads these, never the test split)",
        "",
        "| seed | arm | data | iteration | accuracy [95% CI] | minus SFT, paired [95% CI] | gold NLL/token | gen. tokens | held-out reward acc. / margin | train reward acc. / margin | steps | train s | generate s |"
        + (" judge win rate vs gold; vs start [95% CI] |" if judged else ""),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if judged else ""),
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
            + (f" {_win_rate(r, 'gold')}; {_win_rate(r, 'initial')} |" if judged else "")
        )
    lines += [
        "",
        f"### Stage 1: SFT-LoRA to its plateau, validation per iteration (patience {protocol['patience']})",
        "",
        "| seed | accuracy per iteration | NLL/token per iteration | start of stage 2 (best by) | stopped at |",
        "|---|---|---|---|---|",
    ]
    for seed, choice in report["stage1"].items():
        accuracy = ", ".join("n/a" if x is None else f"{x:.3f}" for x in choice.get("accuracy", []))
        nll = ", ".join(f"{x:.4f}" for x in choice["nll"])
        stopped = (
            f"capped at {len(choice['nll'])}, still improving"
            if choice["stopped_at"] is None
            else str(choice["stopped_at"])
        )
        lines.append(
            f"| {seed} | {accuracy or 'n/a'} | {nll} | {choice['iteration']} ({choice.get('metric', 'nll')}) | {stopped} |"
        )
    capped = [seed for seed, choice in report["stage1"].items() if choice["stopped_at"] is None]
    if capped:
        lines.insert(
            0,
            f"**Stage 1 was capped, not converged** (seed {', '.join(capped)}): SFT was still improving at "
            f"its last iteration ({', '.join(str(len(report['stage1'][seed]['nll'])) for seed in capped)} SFT iterations), "
            "so stage 2 did not start from a plateau.\n",
        )
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


def _final_win_rate_table(protocol: dict, summary: list[dict]) -> list[str]:
    """The judge's verdict on the final answers (judge.py): per arm, the mean over seeds of its win rate
    against the gold responses and against the stage-1 start (a tie counts half; 0.5 = no better)."""
    return [
        "",
        f"### Judge win rates on the {protocol['final_split']} split, final iteration (reward model "
        "`data.evaluation.judge`; a tie counts half, 0.5 = as good as the reference)",
        "",
        "| arm | data | vs gold responses, mean over seeds | vs the stage-1 start, mean over seeds |",
        "|---|---|---|---|",
        *(
            f"| {'start (stage-1 SFT)' if s['arm'] == START else s['arm']} | {s['data_fraction']:.0%} "
            f"| {_fmt(s.get('win_rate_vs_gold_mean'))} | {_fmt(s.get('win_rate_vs_initial_mean'))} |"
            for s in summary
        ),
    ]


def _win_rate(row: dict, reference: str) -> str:
    """`row`'s win rate against `reference` (gold or initial) with its 95% interval, or blank."""
    key = f"win_rate_vs_{reference}"
    if row.get(key) is None:
        return ""
    return f"{row[key]:.2f} [{row[key + '_ci_low']:.2f}, {row[key + '_ci_high']:.2f}]"


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
