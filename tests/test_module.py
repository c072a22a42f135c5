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


@pytest.mark.parametrize("share_prompt", [False, True])
def test_a_batch_split_into_parts_scores_like_the_whole(tiny_model_dir, tokenizer, share_prompt):
    """`split_examples` in both layouts: the parts' log-probs, in order, are the whole batch's."""
    from conftest import randomize_lora

    from lowrank_spin import batching, models
    from lowrank_spin.settings import LoRASettings

    model = models.attach_lora(models.load_base_model(tiny_model_dir, dtype="float32"), LoRASettings(rank=4))
    randomize_lora(model)
    ids = tokenizer("What is 2 plus 3? The answer is 5 and not 7, says the tiny model.").input_ids
    examples = [
        {"prompt_ids": ids[: 3 + i], "real_ids": ids[5 : 9 + i], "generated_ids": ids[2 : 4 + 2 * i]} for i in range(5)
    ]
    for e, value in zip(examples, range(5)):
        e["opponent_real_logps"], e["opponent_generated_logps"] = -float(value), -2.0 * value
    batch = batching.collator(tokenizer.pad_token_id, ("real", "generated"), share_prompt)(examples)
    parts = batching.split_examples(batch, 2)
    assert [p["num_examples"] for p in parts] == [3, 2]
    whole = batching.response_logps(model, batch).view(2, 5)
    split = torch.cat([batching.response_logps(model, p).view(2, -1) for p in parts], dim=1)
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-5)
    assert torch.equal(torch.cat([p["opponent_generated_logps"] for p in parts]), batch["opponent_generated_logps"])
    assert torch.equal(
        torch.cat([p["response_lengths"].view(2, -1) for p in parts], 1).view(-1), batch["response_lengths"]
    )


@pytest.mark.slow
def test_out_of_memory_in_a_training_step_splits_the_micro_batch(tmp_path, cache_dir, monkeypatch, caplog):
    """A training step that runs out of memory runs its micro-batch of 4 as 2 parts of 2, then every later
    step too, with a warning: the same optimizer steps, losses and, within float rounding, weights as
    whole batches (each part's loss weighted by its share: of real tokens for SFT's token mean in
    iteration 0, of examples for SPIN's mean over examples in iteration 1)."""
    from safetensors.torch import load_file

    sizes, steps = [], []
    real_logps, real_step = module_lib.response_logps, module_lib.SelfPlayLoRA.on_before_optimizer_step

    def response_logps(model, batch, **kwargs):
        sizes.append(batch["num_examples"])
        if sizes.count(4) == 1 and batch["num_examples"] == 4:  # the first whole-batch forward
            raise torch.OutOfMemoryError("CUDA out of memory (fake)")
        return real_logps(model, batch, **kwargs)

    def count_step(self, optimizer):
        steps.append(self.trainer.global_step)
        return real_step(self, optimizer)

    options = ["--model.objective.name", "[sft, spin]", "--data.evaluation.max_examples", "2"]
    monkeypatch.setattr(module_lib.SelfPlayLoRA, "on_before_optimizer_step", count_step)
    run_tiny(tmp_path / "whole", *options)
    whole_steps, steps[:] = list(steps), []
    monkeypatch.setattr(module_lib, "response_logps", response_logps)
    with caplog.at_level("WARNING", logger=module_lib.__name__):
        run_tiny(tmp_path / "split", *options)

    assert "CUDA out of memory in a training step" in caplog.text and "2 parts of up to 2" in caplog.text
    # 16 examples in batches of 4, 2 iterations: the failed forward, then 8 steps of 2 parts of 2, never 4 again
    assert sizes == [4] + [2] * 16
    assert steps == whole_steps == list(range(8)), "the same optimizer steps"
    losses = {
        run: [float(r["train/loss_step"]) for r in read_metrics(tmp_path / run) if r.get("train/loss_step")]
        for run in ("whole", "split")
    }
    assert losses["split"] == pytest.approx(losses["whole"], rel=1e-5)
    for iteration in (0, 1):
        want = load_file(tmp_path / "whole" / f"iter_{iteration}" / "adapter_model.safetensors")
        have = load_file(tmp_path / "split" / f"iter_{iteration}" / "adapter_model.safetensors")
        assert want.keys() == have.keys()
        assert max(v.abs().max().item() for k, v in have.items() if "lora_B" in k) > 0, "the policy trained"
        for name in want:
            torch.testing.assert_close(have[name], want[name], rtol=1e-5, atol=1e-6, msg=name)
