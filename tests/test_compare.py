"""`lowrank-spin compare` on the tiny config: every arm runs, and the table and plots come out."""

from __future__ import annotations

import csv
import json
import os

import pytest
from conftest import TINY

from lowrank_spin.cli import main


@pytest.mark.slow
def test_compare_arms_and_data_fractions(tmp_path, cache_dir, capsys):
    main(
        [
            "compare",
            "--config",
            TINY,
            "--output",
            str(tmp_path),
            "--data_fractions",
            "0.5",
            "1.0",
            "--model.num_iterations",
            "1",
        ]
    )
    for arm in ("sft", "spin", "tspin"):
        for pct in (50, 100):
            assert (tmp_path / f"{arm}_{pct}pct" / "iter_0" / "adapter_model.safetensors").exists()
    assert len((tmp_path / "spin_50pct" / "data" / "train.jsonl").read_text().splitlines()) == 8
    with open(tmp_path / "comparison.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * 2 * 2  # arms x fractions x (before, iter 0)
    spin = [r for r in rows if r["arm"] == "spin" and r["iteration"] == "0" and r["data_fraction"] == "1.0"][0]
    assert float(spin["train_seconds"]) > 0 and float(spin["generation_seconds"]) > 0
    assert spin["reward_margin"] and spin["train_reward_margin"]
    assert -1 <= float(spin["vs_sft_ci_low"]) <= float(spin["vs_sft"]) <= float(spin["vs_sft_ci_high"]) <= 1, (
        "paired with SFT"
    )
    sft = [r for r in rows if r["arm"] == "sft" and r["iteration"] == "0"][0]
    assert sft["generation_seconds"] in ("", "0", "0.0")
    for name in ("metrics_vs_iteration.png", "loss_vs_time.png", "accuracy_vs_data_fraction.png"):
        assert (tmp_path / name).stat().st_size > 1000
    assert "| spin | 100% | 0 |" in capsys.readouterr().out


def test_arms_share_one_w_and_b_group_and_the_before_evaluation(tmp_path, monkeypatch):
    """Without training: each arm's `fit` sees the comparison's W&B group and its own run name, later
    arms start with the first arm's evaluation of the common initial model, and fractions below 100%
    evaluate only at the end."""
    from lowrank_spin import compare

    seen = []

    def fake_fit(args):
        run_dir = tmp_path / "out" / args[args.index("--trainer.default_root_dir") + 1].split("/")[-1]
        seen.append(
            (os.environ["WANDB_RUN_GROUP"], os.environ["WANDB_NAME"], args, (run_dir / "results.json").exists())
        )
        (run_dir / "before").mkdir(parents=True, exist_ok=True)
        (run_dir / "before" / "eval_samples.json").write_text("[]")
        if not (run_dir / "results.json").exists():
            (run_dir / "results.json").write_text(json.dumps([{"iteration": -1, "accuracy": 0.25}]))

    monkeypatch.delenv("WANDB_RUN_GROUP", raising=False)
    compare.run_arms(fake_fit, TINY, tmp_path / "out", ["sft", "spin"], [1.0, 0.5], None, [])
    assert [(group, name) for group, name, _, _ in seen] == [
        ("out", "sft_100pct"),
        ("out", "spin_100pct"),
        ("out", "sft_50pct"),
        ("out", "spin_50pct"),
    ]
    assert [seeded for *_, seeded in seen] == [False, True, True, True], (
        "only the first arm evaluates the initial model"
    )
    assert json.loads((tmp_path / "out" / "spin_50pct" / "results.json").read_text()) == [
        {"iteration": -1, "accuracy": 0.25}
    ]
    every_iteration = ["--data.evaluation.every_iteration" in args for _, _, args, _ in seen]
    assert every_iteration == [False, False, True, True]
    assert "WANDB_RUN_GROUP" not in os.environ, "the environment is restored"
