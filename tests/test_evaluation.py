"""Evaluation numbers match a direct computation."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_lora

from lowrank_spin import evaluation, models
from lowrank_spin.batching import Collator
from lowrank_spin.data.chat import render_prompt, response_ids
from lowrank_spin.generation import Generated
from lowrank_spin.settings import LoRASettings, SamplingSettings


def _examples(tokenizer):
    rows = [
        ("What is 2 + 3?", "2 + 3 = 5.\nThe answer is 5.", 5, 1),
        ("A much longer question about 7 apples?", "7.\nThe answer is 7.", 7, 2),
    ]
    return [
        {
            "prompt": p,
            "response": r,
            "answer": a,
            "num_steps": n,
            "prompt_ids": render_prompt(tokenizer, p),
            "real_ids": response_ids(tokenizer, r, True),
        }
        for p, r, a, n in rows
    ]


def test_gold_nll_equals_unbatched_direct_computation(tiny_model_dir, tokenizer):
    model = models.attach_lora(models.load_base_model(tiny_model_dir), LoRASettings(rank=4))
    randomize_lora(model)
    examples = _examples(tokenizer)
    total, tokens = evaluation.gold_nll(model, examples, Collator(tokenizer.pad_token_id, ("real",)), batch_size=2)
    expected, expected_tokens = 0.0, 0
    model.eval()
    with torch.no_grad():
        for e in examples:  # one unpadded sequence at a time, log-softmax by hand
            ids = torch.tensor([e["prompt_ids"] + e["real_ids"]])
            logprobs = model(input_ids=ids).logits[0].float().log_softmax(-1)
            start = len(e["prompt_ids"])
            for position in range(start, ids.shape[1]):
                expected -= logprobs[position - 1, ids[0, position]].item()
            expected_tokens += len(e["real_ids"])
    assert tokens == expected_tokens
    assert total == pytest.approx(expected, rel=1e-4)


def test_accuracy_per_step_and_interval(tokenizer, monkeypatch):
    answers = [Generated("2 + 3 = 5. The answer is 5.", 12, True), Generated("I think 8", 4, False)]
    monkeypatch.setattr(evaluation, "generate_responses", lambda *a, **k: (answers, {}))
    monkeypatch.setattr(evaluation, "gold_nll", lambda *a, **k: (6.0, 3))

    metrics, samples = evaluation.evaluate(
        None,
        tokenizer,
        _examples(tokenizer),
        check_answers=True,
        sampling=SamplingSettings(batch_size=2),
        max_new_tokens=8,
    )
    assert metrics["accuracy"] == 0.5
    assert metrics["accuracy_1_steps"] == 1.0 and metrics["accuracy_2_steps"] == 0.0
    assert metrics["nll"] == 2.0 and metrics["generated_tokens"] == 8.0 and metrics["unfinished_fraction"] == 0.5
    assert [s["correct"] for s in samples] == [True, False]


@pytest.mark.parametrize("k, n, low, high", [(0, 10, 0.0, 0.2775), (5, 10, 0.2366, 0.7634), (100, 100, 0.9630, 1.0)])
def test_wilson_interval_known_values(k, n, low, high):
    got = evaluation.wilson_interval(k, n)
    assert got == pytest.approx((low, high), abs=1e-4)


def test_paired_difference_by_hand():
    # per-problem differences [0, 1, 0, 0]: mean 0.25, sample variance 0.25, standard error 0.25
    assert evaluation.paired_difference([1, 1, 0, 0], [1, 0, 0, 0]) == pytest.approx((0.25, 0.25 - 0.49, 0.25 + 0.49))
    # the same answers on every problem: no difference and no noise, however many problems
    assert evaluation.paired_difference([1, 0, 1], [1, 0, 1]) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="paired_difference: needs two equal"):
        evaluation.paired_difference([1, 0], [1])
