"""End to end through the real CLI, in-process, on the tiny config."""

from __future__ import annotations

import csv
import json
import math
import re
import sys
import warnings

import lightning as L
import pytest
import torch
from conftest import chat_batch, fit_args
from peft import PeftModel

from lowrank_spin import models
from lowrank_spin.batching import response_logps
from lowrank_spin.cli import build_cli, main
from lowrank_spin.compare.protocol import _share_before_evaluation
from lowrank_spin.files import RunDir, read_jsonl


def run_tiny(tmp_path, *overrides: str):
    return build_cli(fit_args(tmp_path, *overrides))


def read_metrics(run_dir) -> list[dict]:
    [path] = list(run_dir.glob("logs/version_*/metrics.csv"))
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_two_spin_iterations_end_to_end(tmp_path, cache_dir, capsys):
    run_tiny(tmp_path)
    for iteration in (0, 1):
        folder = tmp_path / f"iter_{iteration}"
        assert (folder / "adapter_model.safetensors").exists() and (folder / "adapter_config.json").exists()
        rows = [json.loads(line) for line in (folder / "synthetic.jsonl").read_text().splitlines()]
        assert len(rows) == 16 and len({r["prompt"] for r in rows}) == 16
        assert {"prompt", "response", "generated", "proto", "opponent_real_logps", "opponent_generated_logps"} <= rows[
            0
        ].keys()
        assert all(r["iteration"] == iteration for r in rows)
    iter_0 = [json.loads(line) for line in (tmp_path / "iter_0" / "synthetic.jsonl").read_text().splitlines()]
    iter_1 = [json.loads(line) for line in (tmp_path / "iter_1" / "synthetic.jsonl").read_text().splitlines()]
    assert [r["proto"] for r in iter_1] == [r["generated"] for r in iter_0], "proto responses are iteration 0's"
    assert [r["generated"] for r in iter_1] != [r["generated"] for r in iter_0], "iteration 1 regenerated"

    base = models.load_base_model(str(models.resolve_model_path(models.TINY_LLAMA)))
    PeftModel.from_pretrained(base, tmp_path / "iter_1")
    adapter_config = (tmp_path / "iter_1" / "adapter_config.json").read_text()
    assert json.loads(adapter_config)["base_model_name_or_path"] == "tiny-random-llama", "portable: the model's name"
    assert cache_dir not in adapter_config, "never the local cache folder"

    metrics = read_metrics(tmp_path)
    keys = set(metrics[0])
    for key in [
        "train/loss_step",
        "rewards/real",
        "rewards/generated",
        "rewards/margin",
        "rewards/accuracy",
        "logps/real",
        "logps/generated",
        "iteration",
        "eval/accuracy",
        "eval/nll",
        "generation/tokens_per_second",
    ]:
        assert key in keys, key
    assert {float(r["iteration"]) for r in metrics if r["iteration"]} == {0.0, 1.0}
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["iteration"] for r in results] == [-1, 0, 1]
    for row in results[1:]:  # held-out pairs: gold vs the opponent's own greedy answers
        assert 0 <= row["reward_accuracy"] <= 1 and math.isfinite(row["reward_margin"])
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()
    assert "before" in capsys.readouterr().out


@pytest.mark.slow
def test_precomputed_and_on_the_fly_opponent_logps_agree(tmp_path, cache_dir):
    """Iteration 0 (opponent = base, adapters off) and 1 (opponent adapter) give the same losses either way."""
    run_tiny(tmp_path / "pre")
    run_tiny(tmp_path / "fly", "--model.precompute_opponent_logps", "false")
    assert_same_training_steps(tmp_path / "pre", tmp_path / "fly", rel=1e-4)


def assert_same_training_steps(run_a, run_b, rel: float, steps: int = 8) -> None:
    """Both runs logged `steps` training steps with equal losses and rewards, step by step."""
    a_steps = [r for r in read_metrics(run_a) if r["train/loss_step"]]
    b_steps = [r for r in read_metrics(run_b) if r["train/loss_step"]]
    assert len(a_steps) == len(b_steps) == steps
    for a, b in zip(a_steps, b_steps):
        for key in ("train/loss_step", "rewards/real", "rewards/generated"):
            # abs: rewards are β x differences of summed float32 log-probs of ~100 tokens; where the
            # policy still equals the opponent they are rounding noise (seen: up to 2e-5)
            assert float(a[key]) == pytest.approx(float(b[key]), rel=rel, abs=5e-5), key


@pytest.mark.slow
def test_keep_previous_iterations_trains_on_both(tmp_path, cache_dir):
    run_tiny(tmp_path, "--data.keep_previous_iterations", "true")
    steps = [r for r in read_metrics(tmp_path) if r["train/loss_step"]]
    assert [float(r["iteration"]) for r in steps].count(1.0) == 8, "iteration 1: 16 new + 16 previous pairs, batch 4"


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["sft", "tspin"])
def test_other_objectives_end_to_end(tmp_path, cache_dir, objective):
    run_tiny(tmp_path, "--model.objective.name", objective, "--model.num_iterations", "1")
    assert (tmp_path / "iter_0" / "adapter_model.safetensors").exists()
    metrics = read_metrics(tmp_path)
    assert any(r["train/loss_step"] for r in metrics)
    if objective == "sft":
        assert not (tmp_path / "iter_0" / "synthetic.jsonl").exists(), "SFT generates nothing"
    else:
        assert any(r.get("rewards/historical") for r in metrics)


def test_bad_config_fields_reported_together(tmp_path, cache_dir):
    with pytest.raises(ValueError) as info:
        run_tiny(
            tmp_path,
            "--model.objective.beta",
            "[0.1, 0.2, 0.3]",
            "--model.lora.rank",
            "0",
            "--model.objective.name",
            "ppo",
        )
    message = str(info.value)
    assert "model.objective.beta: has 3 values for 2 iterations" in message
    assert "model.lora.rank: must be > 0" in message
    assert "model.objective.name: must be one of" in message
    assert not (tmp_path / "iter_0").exists(), "fails before any work"


def test_the_command_lines_arguments_draw_no_lightning_warning(tmp_path, cache_dir, monkeypatch):
    """`main` hands the command line on as `args`, which LightningCLI would warn about, printing them all."""
    monkeypatch.setattr(sys, "argv", ["lowrank-spin", *fit_args(tmp_path, "--model.lora.rank", "0")])
    with warnings.catch_warnings(record=True) as caught, pytest.raises(ValueError, match="model.lora.rank"):
        warnings.simplefilter("always")
        main()
    assert [str(w.message) for w in caught if "args parameter" in str(w.message)] == []


class _Recomputation(L.Callback):
    """Per optimizer step: whether the model was in train mode, and how many forwards of the first
    decoder layer's first norm ran inside the backward pass: gradient checkpointing's recomputation.
    (Transformers checkpoints the layer's `forward`, so the layer's own hooks stay outside the replay, and
    the replay stops once it has what the backward needs, so a later child may never run again.)"""

    def on_train_start(self, trainer, module):
        self.calls, self.train_mode, self.in_backward = 0, [], []
        norm = module.model.get_base_model().model.layers[0].input_layernorm
        norm.register_forward_hook(lambda *_: setattr(self, "calls", self.calls + 1))

    def on_before_backward(self, trainer, module, loss):
        self.train_mode.append(all(m.training for m in module.modules()))
        self._before = self.calls

    def on_after_backward(self, trainer, module):
        self.in_backward.append(self.calls - self._before)


@pytest.mark.parametrize("checkpointing", [True, False])
def test_steps_run_in_train_mode_so_checkpointing_recomputes(tmp_path, cache_dir, checkpointing):
    """Models load in eval mode and Lightning keeps each module's mode: the fit itself must switch to train
    mode, or `model.gradient_checkpointing` (applied in train mode only) is silently off. Here nothing
    switches modes before the first step, as in a resumed fit or a compare arm whose start's evaluation is
    shared: an SFT iteration (no generation) with the evaluation before it already done."""
    run_tiny(tmp_path / "first", "--model.objective.name", "sft", "--model.num_iterations", "1")
    _share_before_evaluation(tmp_path / "first", tmp_path / "run")
    options = ["--model.objective.name", "sft", "--model.num_iterations", "1"]
    options += ["--model.gradient_checkpointing", str(checkpointing).lower()]
    cli = build_cli(fit_args(tmp_path / "run", *options)[1:], run=False)
    recorder = _Recomputation()
    cli.trainer.callbacks.append(recorder)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert recorder.train_mode and all(recorder.train_mode)
    assert all(n > 0 for n in recorder.in_backward) if checkpointing else set(recorder.in_backward) == {0}


@pytest.mark.slow
def test_spin_starts_from_an_sft_adapter(tmp_path, cache_dir):
    """The low-rank SPIN pipeline: SFT-LoRA on the data, then SPIN from that adapter."""
    run_tiny(tmp_path / "sft", "--model.objective.name", "sft", "--model.num_iterations", "1")
    run_tiny(
        tmp_path / "spin", "--model.lora.init_adapter", str(tmp_path / "sft" / "iter_0"), "--model.num_iterations", "1"
    )
    results = {r["iteration"]: r for r in json.loads((tmp_path / "spin" / "results.json").read_text())}
    sft_results = {r["iteration"]: r for r in json.loads((tmp_path / "sft" / "results.json").read_text())}
    assert results[-1]["nll"] == pytest.approx(sft_results[0]["nll"], rel=1e-5), "SPIN starts where SFT ended"
    first_step = next(r for r in read_metrics(tmp_path / "spin") if r["train/loss_step"])
    # iteration 0's opponent is the SFT adapter itself, so the first step's rewards are zero
    assert float(first_step["rewards/real"]) == pytest.approx(0.0, abs=1e-4)


@pytest.mark.slow
def test_sft_then_self_play_in_one_fit(tmp_path, cache_dir, capsys):
    """The papers' pipeline in one fit: SFT iterations on the labels, then self-play from the adapter
    they reached. The first self-play iteration's opponent is the policy at the end of the last SFT
    iteration (not the base), and its responses are T-SPIN's proto responses."""
    run_tiny(tmp_path, "--model.num_iterations", "3", "--model.objective.name", "[sft, spin, tspin]")
    assert not (tmp_path / "iter_0" / "synthetic.jsonl").exists(), "an SFT iteration generates nothing"
    iter_1 = read_jsonl(tmp_path / "iter_1" / "synthetic.jsonl")
    iter_2 = read_jsonl(tmp_path / "iter_2" / "synthetic.jsonl")
    assert [r["proto"] for r in iter_2] == [r["generated"] for r in iter_1], "proto: the first self-play iteration's"

    # iteration 1's opponent log-probs of the real responses are those of base + iteration 0's adapter
    tokenizer = models.load_tokenizer(str(models.resolve_model_path(models.TINY_LLAMA)))
    rows = iter_1[:4]
    batch = chat_batch(tokenizer, [r["prompt"] for r in rows], [r["response"] for r in rows])
    logps = {}
    for name, adapter in (("sft", tmp_path / "iter_0"), ("base", None)):
        base = models.load_base_model(str(models.resolve_model_path(models.TINY_LLAMA)))
        model = PeftModel.from_pretrained(base, adapter).eval() if adapter else base.eval()
        with torch.no_grad():
            logps[name] = response_logps(model, batch).tolist()
    stored = [r["opponent_real_logps"] for r in rows]
    assert stored == pytest.approx(logps["sft"], abs=1e-3)
    assert stored != pytest.approx(logps["base"], abs=1e-3), "the opponent moved with the SFT iteration"

    steps = [r for r in read_metrics(tmp_path) if r["train/loss_step"]]
    assert {float(r["iteration"]) for r in steps} == {0.0, 1.0, 2.0}
    assert not any(r.get("rewards/margin") for r in steps if float(r["iteration"]) == 0.0), "iteration 0 is SFT"
    assert any(r.get("rewards/historical") for r in steps if float(r["iteration"]) == 2.0), "iteration 2 is T-SPIN"
    table = capsys.readouterr().out
    assert re.findall(r"^iter (\d)[ *]+(\w+)", table, re.M) == [("0", "sft"), ("1", "spin"), ("2", "tspin")]


def test_without_every_iteration_each_stage_end_is_still_evaluated(tmp_path, cache_dir):
    """`data.evaluation.every_iteration: false` (the main command): before, after the last SFT iteration
    and after the last iteration, nothing in between."""
    run_tiny(
        tmp_path,
        "--model.num_iterations",
        "4",
        "--model.objective.name",
        "[sft, sft, spin, spin]",
        "--data.evaluation.every_iteration",
        "false",
    )
    results = RunDir(tmp_path).read_results()
    assert sorted(results) == [RunDir.BEFORE, 1, 3]
    # held-out rewards score the previous iteration's evaluation answers: none was evaluated here
    assert not any("reward_accuracy" in row for row in results.values())


def test_a_per_iteration_objective_needs_one_name_per_iteration(tmp_path, cache_dir):
    with pytest.raises(ValueError, match=r"model.objective.name: has 2 values for 3 iterations"):
        run_tiny(tmp_path, "--model.num_iterations", "3", "--model.objective.name", "[sft, spin]")
    with pytest.raises(ValueError, match=r"model.objective.name: must be one of .* got 'dpo'"):
        run_tiny(tmp_path, "--model.objective.name", "[sft, dpo]")


@pytest.mark.slow
def test_fast_paths_train_like_the_plain_ones(tmp_path, cache_dir):
    """The defaults (the shared-prompt layout, the opponent's log-probs of its own responses taken from
    generation) and the plain paths (one row per response, a scoring forward for real and generated)
    give the same run: same opponent scores, same per-step losses and rewards over both iterations
    (float32 tiny model)."""
    run_tiny(tmp_path / "shared")
    run_tiny(tmp_path / "rows", "--model.share_prompt", "false", "--model.opponent_logps_from_generation", "false")
    assert_same_training_steps(tmp_path / "shared", tmp_path / "rows", rel=1e-3)
    for iteration in (0, 1):
        shared, rows = (
            read_jsonl(tmp_path / run / f"iter_{iteration}" / "synthetic.jsonl") for run in ("shared", "rows")
        )
        for a, b in zip(shared, rows):
            assert a["generated"] == b["generated"]
            assert a["opponent_generated_logps"] == pytest.approx(b["opponent_generated_logps"], rel=1e-4)


@pytest.mark.slow
def test_a_second_fit_into_a_finished_run_is_refused_and_changes_nothing(tmp_path, cache_dir):
    run_tiny(tmp_path, "--model.num_iterations", "1")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match=r"already holds a run \(iter_0/adapter_config.json.*--ckpt_path last"):
        run_tiny(tmp_path, "--model.num_iterations", "1")
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before, "nothing already written is touched"
