"""`lowrank-spin compare` on the tiny config: every arm runs, and the table and plots come out."""

from __future__ import annotations

import csv

import pytest

from lowrank_spin.cli import main
from test_cli import TINY


@pytest.mark.slow
def test_compare_arms_and_data_fractions(tmp_path, cache_dir, capsys):
    main(["compare", "--config", TINY, "--output", str(tmp_path), "--data_fractions", "0.5", "1.0", "--model.num_iterations", "1"])
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
    sft = [r for r in rows if r["arm"] == "sft" and r["iteration"] == "0"][0]
    assert sft["generation_seconds"] in ("", "0", "0.0")
    for name in ("metrics_vs_iteration.png", "loss_vs_time.png", "accuracy_vs_data_fraction.png"):
        assert (tmp_path / name).stat().st_size > 1000
    assert "| spin | 100% | 0 |" in capsys.readouterr().out
