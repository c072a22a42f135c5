"""The LightningModule's schedule: each iteration trains like a fresh run (new optimizer state, its own
warm-up and linear decay), as the SPIN recipe does."""

from __future__ import annotations

import pytest
import torch
from test_cli import read_metrics, run_tiny

from lowrank_spin import module as module_lib
from lowrank_spin.settings import OptimizerSettings


def test_linear_schedule_by_hand():
    """10 steps, warm-up ratio 0.2 -> 2 warm-up steps: (s+1)/2 for s < 2, then (10 - s) / 8."""
    settings = OptimizerSettings(schedule="linear", warmup_ratio=0.2)
    factors = [settings.lr_factor(s, 10) for s in range(10)]
    assert factors == pytest.approx([0.5, 1.0, 1.0, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8])
    assert [OptimizerSettings(schedule="constant").lr_factor(s, 10) for s in range(10)] == [1.0] * 10
    assert OptimizerSettings(warmup_ratio=0.0).lr_factor(0, 4) == 1.0, "no warm-up: decay from the peak"


def test_clearing_the_optimizer_state_forgets_adams_moments():
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([param], lr=0.1)
    param.grad = torch.ones(3)
    optimizer.step()
    assert optimizer.state[param]["step"] == 1
    module_lib._clear_optimizer_state(optimizer)
    assert not optimizer.state
    optimizer.step()
    assert optimizer.state[param]["step"] == 1, "the next step starts Adam afresh"


@pytest.mark.slow
@pytest.mark.parametrize("reset", [True, False])
def test_every_iteration_restarts_its_schedule_and_optimizer(tmp_path, cache_dir, monkeypatch, reset):
    cleared = []
    real = module_lib._clear_optimizer_state
    monkeypatch.setattr(module_lib, "_clear_optimizer_state", lambda opt: (cleared.append(bool(opt.state)), real(opt)))
    run_tiny(
        tmp_path, "--model.optimizer.warmup_ratio", "0.5", "--model.optimizer.reset_each_iteration", str(reset).lower()
    )
    # the tiny config: 16 pairs in batches of 4 -> 4 steps per iteration, 2 warm-up steps, peak 1e-3
    lrs = [(int(float(r["iteration"])), float(r["train/lr"])) for r in read_metrics(tmp_path) if r.get("train/lr")]
    expected = [1e-3 * f for f in (0.5, 1.0, 1.0, 0.5)]
    assert [lr for it, lr in lrs if it == 0] == pytest.approx(expected)
    assert [lr for it, lr in lrs if it == 1] == pytest.approx(expected), "iteration 1 warms up again"
    # cleared before iteration 0 (nothing to clear yet) and before iteration 1 (iteration 0's moments)
    assert cleared == ([False, True] if reset else [])


@pytest.mark.slow
def test_accumulated_micro_batches_step_like_whole_batches(tmp_path, monkeypatch):
    """Micro-batches of 2 accumulated 2 at a time (as configs/smollm2_spin.yaml trains 4 x 2 to halve a
    step's activations) take the optimizer steps, at the learning rates, of whole batches of 4."""
    steps = {}
    real = module_lib.SelfPlayLoRA.on_before_optimizer_step

    def record(self, optimizer):
        steps.setdefault(str(self.trainer.default_root_dir), []).append(
            (self.iteration, optimizer.param_groups[0]["lr"])
        )
        return real(self, optimizer)

    monkeypatch.setattr(module_lib.SelfPlayLoRA, "on_before_optimizer_step", record)
    whole, micro = tmp_path / "whole", tmp_path / "micro"
    run_tiny(whole, "--model.optimizer.warmup_ratio", "0.5")
    run_tiny(
        micro,
        "--model.optimizer.warmup_ratio",
        "0.5",
        "--data.batch_size",
        "2",
        "--trainer.accumulate_grad_batches",
        "2",
    )
    # 16 pairs: 4 optimizer steps per iteration either way, 2 of them warm-up
    expected = [1e-3 * f for f in (0.5, 1.0, 1.0, 0.5)] * 2
    for run, message in ((whole, "batches of 4"), (micro, "one optimizer step per 2 micro-batches, same schedule")):
        assert [it for it, _ in steps[str(run)]] == [0] * 4 + [1] * 4, message
        assert [lr for _, lr in steps[str(run)]] == pytest.approx(expected), message
