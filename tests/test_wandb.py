"""W&B offline: a real `lowrank-spin fit` records locally with no account and no network, and its
run holds the logged metrics, the samples tables, the group and the full config."""

from __future__ import annotations

import json
import subprocess
import time

import pytest
from conftest import fit_args, fit_command, subprocess_env

KEYS = (
    "train/loss_step",
    "rewards/margin",
    "eval/accuracy",
    "eval/nll",
    "eval/iteration",
    "generation/tokens_per_second",
)


@pytest.mark.slow
def test_wandb_offline_run_records_metrics_samples_and_config(tmp_path, cache_dir):
    env = subprocess_env(cache_dir, WANDB_MODE="offline", WANDB_SILENT="true")
    env.pop("WANDB_API_KEY", None)
    args = fit_command(fit_args(tmp_path, csv_logs=False)) + [
        "--trainer.logger=lightning.pytorch.loggers.WandbLogger",
        "--trainer.logger.init_args.offline=true",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--trainer.logger.init_args.project=lowrank_spin_test",
        "--trainer.logger.init_args.group=compare-1",
        "--trainer.logger.init_args.job_type=spin",
    ]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    [run] = list((tmp_path / "wandb").glob("offline-run-*"))
    assert f"W&B run: {run}" in done.stdout, "the main command says where the W&B run is"
    # wandb >= 0.2x keeps history, summary and config in the run's protobuf log (run-*.wandb), ready
    # for `wandb sync`; keys and string values are stored verbatim. Its writer may still be flushing
    # for a moment after the process ends.
    [log] = list(run.glob("run-*.wandb"))
    deadline = time.monotonic() + 30
    while not all(key.encode() in log.read_bytes() for key in KEYS) and time.monotonic() < deadline:
        time.sleep(0.5)
    data = log.read_bytes()
    for key in KEYS:
        assert key.encode() in data, key
    assert b"tiny-random-llama" in data and b"num_iterations" in data, "the full config"
    assert b"compare-1" in data, "the W&B group"
    assert b"WANDB_API_KEY" not in data
    tables = run / "files" / "media" / "table" / "samples"
    assert sorted(p.name[:6] for p in tables.glob("*.table.json")) == ["iter_0", "iter_1"]
    table = json.loads(next(tables.glob("iter_1*.table.json")).read_text())
    assert table["columns"] == ["prompt", "real", "generated", "iteration", "generated_correct"]
    assert len(table["data"]) == 16 and all(row[3] == 1 for row in table["data"])
    assert all(row[4] in (True, False) for row in table["data"])
