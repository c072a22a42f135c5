"""The opponent's scoring pass: on CUDA out of memory it halves the batch and scores the same values."""

from __future__ import annotations

import logging

import torch

from lowrank_spin import models
from lowrank_spin.data.chat import render_prompt, response_ids
from lowrank_spin.opponent import Opponent
from lowrank_spin.settings import LoRASettings, ObjectiveSettings


def _opponent(tiny_model_dir, tokenizer) -> Opponent:
    model = models.attach_lora(models.load_base_model(tiny_model_dir), LoRASettings(rank=4))
    return Opponent(
        model,
        tokenizer,
        ObjectiveSettings(name="spin"),
        share_prompt=True,
        precompute_logps=True,
        logps_from_generation=False,
        starts_as_base=True,
        elapsed_seconds=lambda: 0.0,
    )


def _examples(tokenizer, n: int = 6) -> list[dict]:
    return [
        {
            "prompt_ids": render_prompt(tokenizer, f"Question {i}" + "?" * i),
            "real_ids": response_ids(tokenizer, f"answer {i}", True),
            "generated_ids": response_ids(tokenizer, "no" * (i + 1), True),
        }
        for i in range(n)
    ]


def test_scoring_halves_the_batch_on_out_of_memory(tiny_model_dir, tokenizer, monkeypatch, caplog):
    opponent = _opponent(tiny_model_dir, tokenizer)
    expected = _examples(tokenizer)
    opponent.score(expected, ("real", "generated"), 0, batch_size=2)

    logps, sizes = Opponent.logps, []

    def logps_or_run_out_of_memory(self, batch, iteration, num_responses=2):
        sizes.append(batch["num_examples"])
        if batch["num_examples"] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (fake)")
        return logps(self, batch, iteration, num_responses)

    monkeypatch.setattr(Opponent, "logps", logps_or_run_out_of_memory)
    got = _examples(tokenizer)
    with caplog.at_level(logging.WARNING, logger="lowrank_spin.opponent"):
        opponent.score(got, ("real", "generated"), 0, batch_size=4)
    assert sizes == [4, 2, 2, 2], "halved once, then kept for the rest of the pass"
    assert "set data.batch_size to 2" in caplog.text
    for want, have in zip(expected, got):
        for name in ("opponent_real_logps", "opponent_generated_logps"):
            assert abs(have[name] - want[name]) < 1e-4 * abs(want[name]), name
