"""DeepSpeed ZeRO-2 and ZeRO-3 through Lightning's DeepSpeedStrategy, for real, on CPU processes.

Lightning allows DeepSpeed only on CUDA, so these runs use the test-only `CPUDeepSpeedStrategy`
(tests/deepspeed_cpu.py), which drops that check and nothing else: DeepSpeed's engine, its ZeRO
optimizer, ZeRO-3 partitioned weights and their gathering all run as they would on GPUs. Every run is
a subprocess: DeepSpeed sets process-global state (the process group, transformers' ZeRO-3 flag).
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess

import pytest
from conftest import REPO, TINY, fit_args, fit_command, subprocess_env
from safetensors.torch import load_file

from lowrank_spin.cli import build_cli

pytest.importorskip("deepspeed")
CPU_DEEPSPEED = "deepspeed_cpu.CPUDeepSpeedStrategy"


def _fit(run_dir, cache_dir, *overrides: str) -> subprocess.CompletedProcess:
    env = subprocess_env(
        cache_dir, PYTHONPATH=os.pathsep.join([os.path.join(REPO, "tests"), os.environ.get("PYTHONPATH", "")])
    )
    # HF generate everywhere: ZeRO-3 generates with it (every rank the same forwards), and the runs'
    # samples are compared with the single process's draw for draw
    args = fit_command(fit_args(run_dir, "--data.sampling.engine", "hf", *overrides))
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _results(run_dir) -> dict:
    return {row["iteration"]: row for row in json.loads((run_dir / "results.json").read_text())}


def _synthetic(run_dir, iteration: int) -> list[dict]:
    return [json.loads(line) for line in (run_dir / f"iter_{iteration}" / "synthetic.jsonl").read_text().splitlines()]


SCORES = ("opponent_real_logps", "opponent_generated_logps")


def _without_scores(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in SCORES}


def _loss_steps(run_dir) -> list[dict]:
    [path] = list(run_dir.glob("logs/version_*/metrics.csv"))
    with open(path) as f:
        return [r for r in csv.DictReader(f) if r.get("train/loss_step")]


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory, cache_dir):
    run_dir = tmp_path_factory.mktemp("single")
    _fit(run_dir, cache_dir)
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("devices, stage", [(1, 2), (1, 3), (2, 3)])
def test_zero_runs_every_iteration_like_a_single_process(tmp_path, cache_dir, single_process_run, devices, stage):
    _fit(
        tmp_path,
        cache_dir,
        "--trainer.strategy",
        CPU_DEEPSPEED,
        "--trainer.strategy.stage",
        str(stage),
        "--trainer.devices",
        str(devices),
    )
    single = single_process_run

    # the base loads whole into ZeRO-3 partitions and the policy starts at Δθ0 = 0: same initial model
    assert _results(tmp_path)[-1]["nll"] == pytest.approx(_results(single)[-1]["nll"], abs=1e-4)
    # generation with partitioned weights: iteration 0's opponent (the base) answers exactly as without DeepSpeed;
    # its scores come from the full logits there (ZeRO-3) and chunked log-probs here: equal up to float rounding
    for zero, plain in zip(_synthetic(tmp_path, 0), _synthetic(single, 0), strict=True):
        assert _without_scores(zero) == _without_scores(plain)
        for key in SCORES:
            assert zero.get(key) == pytest.approx(plain.get(key), rel=1e-5), key
    for iteration in (0, 1):
        rows = _synthetic(tmp_path, iteration)
        assert len(rows) == 16 and len({r["prompt"] for r in rows}) == 16, "every prompt exactly once"
        # the adapter is gathered whole before saving: same tensors and shapes as a single-process run
        saved = load_file(tmp_path / f"iter_{iteration}" / "adapter_model.safetensors")
        reference = load_file(single / f"iter_{iteration}" / "adapter_model.safetensors")
        assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in reference.items()}
        assert max(v.abs().max().item() for k, v in saved.items() if "lora_B" in k) > 0, "the policy trained"
    steps = _loss_steps(tmp_path)
    assert len(steps) == 2 * 4 // devices  # 16 pairs, batch 4 per rank, 2 iterations
    # the opponent of iteration 1 is a snapshot of the policy: at its first step the two are equal,
    # the SPIN margin is 0 and the loss is exactly log 2
    first_of_iteration_1 = steps[len(steps) // 2]
    assert float(first_of_iteration_1["train/loss_step"]) == pytest.approx(math.log(2), abs=1e-4)
    assert float(steps[0]["train/loss_step"]) == pytest.approx(math.log(2), abs=1e-4)


def test_deepspeed_strategies_are_selected_from_the_config(cache_dir):
    from lightning.pytorch.strategies import DeepSpeedStrategy

    for name, stage, offload in [
        ("deepspeed_stage_2", 2, False),
        ("deepspeed_stage_3", 3, False),
        ("deepspeed_stage_3_offload", 3, True),
    ]:
        cli = build_cli(["--config", TINY, "--trainer.strategy", name], run=False)
        strategy = cli.trainer.strategy
        assert isinstance(strategy, DeepSpeedStrategy)
        zero = strategy.config["zero_optimization"]
        assert zero["stage"] == stage
        assert ("offload_optimizer" in zero) == offload


def test_4bit_base_under_zero3_is_refused_before_any_work(tmp_path, cache_dir):
    from lowrank_spin.settings import ConfigError

    with pytest.raises(
        ConfigError, match="model.load_in_4bit: bitsandbytes 4-bit weights are not partitioned by ZeRO-3"
    ):
        build_cli(
            [
                "fit",
                "--config",
                TINY,
                "--model.load_in_4bit",
                "true",
                "--trainer.strategy",
                CPU_DEEPSPEED,
                "--trainer.strategy.stage",
                "3",
                "--trainer.default_root_dir",
                str(tmp_path),
            ]
        )
    assert not (tmp_path / "iter_0").exists()
