"""Two real CPU processes (DDP, gloo): each rank generates its share of the batches, every rank
trains on the gathered set, and the data equal a single-process run's."""

from __future__ import annotations

import csv
import json
import subprocess

import pytest
from conftest import fit_args, fit_command, subprocess_env


def _fit(run_dir, cache_dir, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        fit_command(fit_args(run_dir, *overrides)),
        env=subprocess_env(cache_dir),
        capture_output=True,
        text=True,
        timeout=600,
    )


def _rows(run_dir, iteration):
    return [json.loads(line) for line in (run_dir / f"iter_{iteration}" / "synthetic.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_process_ddp_generates_shards_and_trains_on_all(tmp_path, cache_dir, tiny_model_dir):
    single = _fit(tmp_path / "single", cache_dir)
    assert single.returncode == 0, single.stderr[-2000:]
    ddp = _fit(tmp_path / "ddp", cache_dir, "--trainer.devices", "2", "--trainer.strategy", "ddp")
    assert ddp.returncode == 0, ddp.stderr[-2000:]

    # iteration 0 starts from the same model: the gathered shards equal the single-process generation
    assert _rows(tmp_path / "ddp", 0) == _rows(tmp_path / "single", 0)
    for iteration in (0, 1):
        rows = _rows(tmp_path / "ddp", iteration)
        assert len(rows) == 16 and len({r["prompt"] for r in rows}) == 16, "every prompt exactly once"
        assert all(r["generated"] is not None for r in rows)
        assert not list((tmp_path / "ddp" / f"iter_{iteration}").glob("*.partial*")), "shard progress files cleaned up"
        assert (tmp_path / "ddp" / f"iter_{iteration}" / "adapter_model.safetensors").exists()
    # 16 pairs per epoch split over 2 ranks with batch 4: 2 optimizer steps per epoch, 4 in all
    [metrics] = list((tmp_path / "ddp").glob("logs/version_*/metrics.csv"))
    with open(metrics) as f:
        steps = [r for r in csv.DictReader(f) if r.get("train/loss_step")]
    assert len(steps) == 4
