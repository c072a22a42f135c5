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
from pathlib import Path

import pytest
from conftest import REPO, TINY, fit_args, fit_command, subprocess_env
from safetensors.torch import load_file

from lowrank_spin.cli import build_cli

pytest.importorskip("deepspeed")
CPU_DEEPSPEED = "deepspeed_cpu.CPUDeepSpeedStrategy"


def _fit(run_dir, cache_dir, *overrides: str, kill_at: str | None = None) -> subprocess.CompletedProcess:
    env = subprocess_env(
        cache_dir,
        PYTHONPATH=os.pathsep.join([os.path.join(REPO, "tests"), os.environ.get("PYTHONPATH", "")]),
        **({"LOWRANK_SPIN_KILL_AT": kill_at} if kill_at else {}),
    )
    # HF generate everywhere: ZeRO-3 generates with it (every rank the same forwards), and the runs'
    # samples are compared with the single process's draw for draw
    args = fit_command(fit_args(run_dir, "--data.sampling.engine", "hf", *overrides))
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    if kill_at:
        assert done.returncode == -9, f"the fault point was not reached: {done.stderr[-3000:]}"
    else:
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


def _zero(devices: int, stage: int) -> tuple[str, ...]:
    """ZeRO-`stage` in `devices` processes, with a step checkpoint every optimizer step that is not an
    epoch's last (the tiny config trains 16 pairs per iteration, 4 per process and step)."""
    return (
        *("--trainer.strategy", CPU_DEEPSPEED, "--trainer.strategy.stage", str(stage)),
        *("--trainer.devices", str(devices), "--step_checkpoint.every_n_train_steps", "1"),
    )


@pytest.fixture(scope="module")
def uninterrupted_zero_run(tmp_path_factory, cache_dir):
    """The run directory of an uninterrupted run of `_zero(devices, stage)`, made once for each."""
    runs = {}

    def run(devices: int, stage: int):
        if (devices, stage) not in runs:
            runs[devices, stage] = tmp_path_factory.mktemp(f"zero{stage}_{devices}")
            _fit(runs[devices, stage], cache_dir, *_zero(devices, stage))
        return runs[devices, stage]

    return run


@pytest.mark.slow
@pytest.mark.parametrize(
    "devices, stage, kill_at, steps_left",
    [(1, 2, "train_step:7", 2), (1, 3, "train_step:7", 2), (2, 3, "train_step:4", 1)],
)
def test_killed_zero_run_resumes_from_its_checkpoint_folder(
    tmp_path, cache_dir, tiny_model_dir, uninterrupted_zero_run, devices, stage, kill_at, steps_left
):
    """A ZeRO-2/3 run SIGKILLed in iteration 1, at step 7 of 8 (1 process) or 4 of 4 (2 processes),
    resumes with `--ckpt_path last` from the previous step's DeepSpeed checkpoint folder, which holds the
    adapters and their optimizer state and not the frozen base: it trains only the steps left, generates
    nothing, and ends with the adapters, opponent (its held-out rewards) and synthetic data of an
    uninterrupted run, as a single-process resume does (tests/test_resume.py, whose counting this uses)."""
    import torch
    from test_resume import _work_done

    from lowrank_spin.cli import last_good_checkpoint

    options = _zero(devices, stage)
    _fit(tmp_path, cache_dir, *options, kill_at=kill_at)
    assert not (tmp_path / "iter_1" / "adapter_model.safetensors").exists()
    checkpoints, killed_at = tmp_path / "checkpoints", int(kill_at.split(":")[1])
    folder = checkpoints / f"step-{killed_at - 1}.ckpt"
    assert folder.is_dir(), "DeepSpeed writes a folder"
    assert last_good_checkpoint(checkpoints) == str(folder)

    # what the folder holds: the policy adapter (module; ZeRO-3: placeholders of its partitions), each rank's
    # ZeRO optimizer partition, the opponent adapter and Lightning's state (client state); no base weight
    files = list(folder.rglob("*.pt"))
    assert sum("optim_states" in f.name for f in files) == devices
    for model_states in (f for f in files if f.name.endswith("model_states.pt")):
        state = torch.load(model_states, map_location="cpu", weights_only=False)
        assert state["module"] and all(".lora_" in k and ".policy." in k for k in state["module"]), "trainable only"
        assert not state.get("frozen_param_fragments"), "no frozen weights"
        assert state["opponent_adapter"] and all(".opponent." in k for k in state["opponent_adapter"])
        assert state["global_step"] == killed_at - 1
    adapter = load_file(tmp_path / "iter_0" / "adapter_model.safetensors")
    adapter_bytes = sum(v.numel() * v.element_size() for v in adapter.values())
    base_bytes = sum(f.stat().st_size for f in Path(tiny_model_dir).glob("*.safetensors"))
    saved = sum(f.stat().st_size for f in files)
    # per process: the policy's weights, their fp32 copy and Adam's two moments, the opponent, Lightning's state
    assert saved < devices * (6 * adapter_bytes + 64 * 1024) < 2 * base_bytes, (saved, adapter_bytes, base_bytes)

    _fit(tmp_path, cache_dir, *options, "--ckpt_path", "last")
    assert _work_done(tmp_path, version=1) == (steps_left, 0), "the resumed run redid finished work"
    expected = uninterrupted_zero_run(devices, stage)
    for iteration in (0, 1):
        assert _synthetic(tmp_path, iteration) == _synthetic(expected, iteration)
        want = load_file(expected / f"iter_{iteration}" / "adapter_model.safetensors")
        have = load_file(tmp_path / f"iter_{iteration}" / "adapter_model.safetensors")
        assert want.keys() == have.keys()
        for name in want:
            torch.testing.assert_close(have[name], want[name], rtol=1e-5, atol=1e-6, msg=name)
    # held-out rewards of iteration 1 are the policy against the opponent restored from the checkpoint
    have, want = _results(tmp_path), _results(expected)
    assert sorted(have) == sorted(want) == [-1, 0, 1]
    for key in ("nll", "reward_accuracy", "reward_margin"):
        assert have[1][key] == pytest.approx(want[1][key], rel=1e-4, abs=1e-5), key


def test_a_deepspeed_checkpoint_folder_that_does_not_load_is_passed_over(tmp_path, caplog):
    """`last_good_checkpoint` reads a DeepSpeed folder's step from its model states (every rank's file,
    and one optimizer partition per rank, must load); a torn or incomplete folder is named and passed over."""
    import torch

    from lowrank_spin.cli import last_good_checkpoint

    def folder(name: str, step: int, ranks: int = 2, partitions: int = 2, torn: bool = False) -> None:
        tag = tmp_path / name / "checkpoint"
        tag.mkdir(parents=True)
        (tmp_path / name / "latest").write_text("checkpoint")
        torch.save({"module": {}, "global_step": step, "dp_world_size": ranks}, tag / "mp_rank_00_model_states.pt")
        for rank in range(partitions):
            torch.save({"optimizer_state_dict": {}}, tag / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
        if torn:
            path = tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
            path.write_bytes(path.read_bytes()[:100])

    folder("step-2.ckpt", 2)
    folder("last.ckpt", 4)
    assert last_good_checkpoint(tmp_path) == str(tmp_path / "last.ckpt")
    folder("step-6.ckpt", 6, torn=True)
    folder("step-8.ckpt", 8, partitions=1)
    with caplog.at_level("WARNING"):
        assert last_good_checkpoint(tmp_path) == str(tmp_path / "last.ckpt")
    assert "step-6.ckpt does not load" in caplog.text
    assert "step-8.ckpt does not load" in caplog.text and "1 optimizer partitions" in caplog.text
