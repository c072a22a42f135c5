"""Batched, resumable generation and its sampler."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import randomize_lora

from lowrank_spin import batching, models
from lowrank_spin.batching import Collator
from lowrank_spin.data.chat import render_prompt
from lowrank_spin.generation import Sampler, generate_responses
from lowrank_spin.settings import LoRASettings, SamplingSettings


def test_generation_resumes_without_regenerating_or_duplicating(tiny_model_dir, tokenizer, tmp_path):
    model = models.attach_lora(models.load_base_model(tiny_model_dir), LoRASettings(rank=4))
    prompts = [render_prompt(tokenizer, f"Question number {i}" + "?" * (i % 3)) for i in range(10)]
    sampling = SamplingSettings(batch_size=4, max_new_tokens=6, temperature=1.0)
    kwargs = dict(sampling=sampling, seed=3)
    full, stats = generate_responses(model, tokenizer, prompts, **kwargs)
    assert stats["new_tokens"] == sum(g.num_tokens for g in full)

    progress = tmp_path / "progress.jsonl"
    generate_responses(model, tokenizer, prompts, **kwargs, progress_path=progress)
    rows = progress.read_text().splitlines()
    progress.write_text("\n".join(rows[:4]) + "\n" + rows[4][:10])  # killed while writing the second batch
    torch.manual_seed(123)  # a resumed process has another global RNG state: batches are seeded themselves
    resumed, resumed_stats = generate_responses(model, tokenizer, prompts, **kwargs, progress_path=progress)
    assert [g.text for g in resumed] == [g.text for g in full]
    finished_first_batch = sum(json.loads(r)["num_tokens"] for r in rows[:4])
    assert resumed_stats["new_tokens"] == stats["new_tokens"] - finished_first_batch  # batch 1 not regenerated
    indices = [json.loads(line)["index"] for line in progress.read_text().splitlines()]
    assert sorted(indices) == list(range(10)), "every prompt exactly once"


@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_generation_logps_equal_a_scoring_forward(tiny_model_dir, tokenizer, temperature):
    """The log-probs the sampler sums while generating are the model's log-probs of the drawn tokens
    (temperature 1, up to and including EOS): what a scoring forward over prompt + tokens gives, even
    when the model's shipped generation_config asks generate() for a repetition penalty."""
    model = models.attach_lora(models.load_base_model(tiny_model_dir), LoRASettings(rank=4, alpha=8))
    randomize_lora(model)
    model.get_base_model().generation_config.repetition_penalty = 3.0
    eos = tokenizer.eos_token_id
    if temperature > 0:  # EOS made likelier (in generation and scoring alike): some rows finish early
        boost = torch.zeros(len(tokenizer)).index_fill(0, torch.tensor([eos]), 1.0)
        model.get_output_embeddings().register_forward_hook(lambda module, args, out: out + boost)
    prompts = [render_prompt(tokenizer, f"Question {i}" + "?" * (i % 3)) for i in range(6)]
    generated, _ = generate_responses(
        model, tokenizer, prompts, SamplingSettings(batch_size=4, max_new_tokens=16, temperature=temperature), seed=1
    )
    if temperature > 0:
        assert {g.finished for g in generated} == {True, False}, "finished and unfinished rows are covered"
    for g in generated:
        assert g.token_ids[-1] == eos if g.finished else eos not in g.token_ids
        assert len(g.token_ids) == g.num_tokens + g.finished
    examples = [{"prompt_ids": p, "generated_ids": g.token_ids} for p, g in zip(prompts, generated)]
    model.eval()
    with torch.no_grad():
        scored = batching.response_logps(model, Collator(tokenizer.pad_token_id, ("generated",))(examples))
    torch.testing.assert_close(
        torch.tensor([g.logp for g in generated], dtype=torch.float32), scored, rtol=1e-4, atol=1e-4
    )
    assert model.get_base_model().generation_config.repetition_penalty == 3.0, "the shipped config is put back"


def test_sampler_draws_from_the_top_k_nucleus_distribution():
    """20k draws from p = (0.5, 0.3, 0.15, 0.05): frequencies within 0.015 (4 standard errors)."""
    torch.manual_seed(0)
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().repeat(20_000, 1)

    def frequencies(temperature=1.0, **kwargs):
        scores = Sampler(temperature, **kwargs)(None, logits)
        assert torch.isinf(scores).sum(-1).eq(3).all(), "exactly one finite score per row: greedy picks it"
        return scores.argmax(-1).bincount(minlength=4).float() / len(logits)

    expected = {
        "all": ((), {"top_k": 0}, [0.5, 0.3, 0.15, 0.05]),
        "top-2": ((), {"top_k": 2}, [0.625, 0.375, 0, 0]),
        "nucleus 0.7 keeps 0.5 + 0.3": ((), {"top_k": 0, "top_p": 0.7}, [0.625, 0.375, 0, 0]),
        "top-3 renormalised, then nucleus 0.9": (
            (),
            {"top_k": 3, "top_p": 0.9},
            [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0],
        ),
        "temperature 2: p^(1/2) renormalised": ((2.0,), {"top_k": 0}, [0.379, 0.293, 0.208, 0.120]),
    }
    for name, (args, kwargs, probs) in expected.items():
        torch.testing.assert_close(frequencies(*args, **kwargs), torch.tensor(probs), atol=0.015, rtol=0, msg=name)


def test_sampling_with_top_k_1_is_greedy(tiny_model_dir, tokenizer):
    """The sampler really drives generate(): keeping one candidate reproduces greedy decoding."""
    model = models.attach_lora(models.load_base_model(tiny_model_dir), LoRASettings(rank=4))
    prompts = [render_prompt(tokenizer, p) for p in ("What is 2 + 3?", "Hi", "Name a colour.")]
    greedy, _ = generate_responses(model, tokenizer, prompts, SamplingSettings(max_new_tokens=8, temperature=0.0))
    top_1, _ = generate_responses(
        model, tokenizer, prompts, SamplingSettings(max_new_tokens=8, temperature=1.0, top_k=1), seed=5
    )
    sampled, _ = generate_responses(
        model, tokenizer, prompts, SamplingSettings(max_new_tokens=8, temperature=1.0, top_k=0), seed=5
    )
    assert top_1 == greedy
    assert sampled != greedy
    for prompt, ours in zip(prompts, greedy):  # and temperature 0 is transformers' own greedy decoding
        reference = model.generate(
            input_ids=torch.tensor([prompt]), max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
        assert reference[0, len(prompt) :].tolist()[: len(ours.token_ids)] == ours.token_ids


def test_sampler_log_probs_stop_at_any_end_of_turn_id():
    """Stop ids (3, 4): row 0 draws 3 at step 1, row 1 draws 4 at step 2; nothing is added after.
    Each step's logits are log-probs (logsumexp 0), so a row's sum is the drawn tokens' log-probs."""
    probs = {
        1: [[0.1, 0.1, 0.1, 0.6, 0.1], [0.5, 0.2, 0.1, 0.1, 0.1]],  # row 0 draws 3 (stop), row 1 draws 0
        2: [[0.7, 0.1, 0.1, 0.05, 0.05], [0.1, 0.1, 0.1, 0.1, 0.6]],  # row 1 draws 4 (stop)
        3: [[0.6, 0.1, 0.1, 0.1, 0.1], [0.6, 0.1, 0.1, 0.1, 0.1]],
    }
    sampler = Sampler(0.0, eos_token_id=[3, 4])
    drawn = [sampler(None, torch.tensor(p).log()).argmax(-1).tolist() for p in probs.values()]
    assert drawn == [[3, 0], [0, 4], [0, 0]]
    expected = torch.tensor([0.6, 0.5 * 0.6], dtype=torch.float64).log()
    torch.testing.assert_close(sampler.logps, expected)
