"""W&B offline: a run records locally with no account and no network, and holds the logged metrics,
the samples tables and the full config."""

from __future__ import annotations

import json

import pytest

from test_cli import run_tiny


@pytest.mark.slow
def test_wandb_offline_run_records_metrics_samples_and_config(tmp_path, cache_dir, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    run_tiny(
        tmp_path,
        "--trainer.logger=lightning.pytorch.loggers.WandbLogger",
        "--trainer.logger.init_args.offline=true",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--trainer.logger.init_args.project=lowrank_spin_test",
        "--trainer.logger.init_args.group=compare-1",
        "--trainer.logger.init_args.job_type=spin",
    )
    [run] = list((tmp_path / "wandb").glob("offline-run-*"))
    # wandb >= 0.2x keeps history, summary and config in the run's protobuf log (run-*.wandb), ready
    # for `wandb sync`; its keys and string values are stored verbatim.
    [log] = list(run.glob("run-*.wandb"))
    data = log.read_bytes()
    for key in ("train/loss_step", "rewards/margin", "eval/accuracy", "eval/nll", "eval/iteration", "generation/tokens_per_second"):
        assert key.encode() in data, key
    assert b"tiny-random-llama" in data and b"num_iterations" in data, "the full config"
    assert b"compare-1" in data, "the W&B group"
    tables = sorted(p.name for p in (run / "files" / "media" / "table" / "samples").glob("*.table.json"))
    assert len(tables) == 2 and tables[0].startswith("iter_0")
    table = json.loads(next((run / "files" / "media" / "table" / "samples").glob("iter_1*.table.json")).read_text())
    assert table["columns"] == ["prompt", "real", "generated", "iteration", "generated_correct"]
    assert len(table["data"]) == 16 and all(row[3] == 1 for row in table["data"])
    assert all(row[4] in (True, False) for row in table["data"])
    assert b"WANDB_API_KEY" not in data
