"""Reading user data, rendering prompts, batching, and resumable generation."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import randomize_lora
from lowrank_spin import models
from lowrank_spin.data import (
    Collator,
    SelfPlayDataModule,
    SharedPromptCollator,
    length_grouped_order,
    read_pairs,
    render_prompt,
    response_ids,
)
from lowrank_spin.generation import Sampler, generate_responses
from lowrank_spin.losses import IGNORE_INDEX
from lowrank_spin.validation import ConfigError


def test_collator_layout_and_masks(tokenizer):
    examples = [
        {"prompt_ids": [5, 6, 7], "real_ids": [8, 9, 2], "generated_ids": [10, 2]},
        {"prompt_ids": [5, 6], "real_ids": [11, 2], "generated_ids": [12, 13, 14, 15]},
    ]
    batch = Collator(0, ("real", "generated"))(examples)
    assert batch["num_responses"] == 2
    # rows: [real_0, real_1, generated_0, generated_1], right-padded to the longest (6)
    assert batch["input_ids"].tolist() == [
        [5, 6, 7, 8, 9, 2],
        [5, 6, 11, 2, 0, 0],
        [5, 6, 7, 10, 2, 0],
        [5, 6, 12, 13, 14, 15],
    ]
    I = IGNORE_INDEX
    assert batch["labels"].tolist() == [
        [I, I, I, 8, 9, 2],
        [I, I, 11, 2, I, I],
        [I, I, I, 10, 2, I],
        [I, I, 12, 13, 14, 15],
    ]
    assert batch["attention_mask"].sum(-1).tolist() == [6, 4, 5, 6]


def test_shared_prompt_collator_layout():
    examples = [
        {"prompt_ids": [5, 6, 7], "real_ids": [8, 9, 2], "generated_ids": [10, 2]},
        {"prompt_ids": [5, 6], "real_ids": [11, 2], "generated_ids": [12, 13, 14, 15]},
    ]
    batch = SharedPromptCollator(0, ("real", "generated"))(examples)
    # one row per example: [prompt; real; generated], right-padded to the longest (8)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 2, 10, 2], [5, 6, 11, 2, 12, 13, 14, 15]]
    # each response's positions continue from its prompt, as in a row of its own
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 3, 4], [0, 1, 2, 3, 2, 3, 4, 5]]
    assert batch["segments"].tolist() == [[0, 0, 0, 1, 1, 1, 2, 2], [0, 0, 1, 1, 2, 2, 2, 2]]
    I = IGNORE_INDEX
    # the last prompt token predicts the first token of both responses; a response's last token nothing
    assert batch["targets"].tolist() == [
        [[I, I, 8, 9, 2, I, I, I], [I, 11, 2, I, I, I, I, I]],
        [[I, I, 10, I, I, I, 2, I], [I, 12, I, I, 13, 14, 15, I]],
    ]
    assert batch["response_lengths"].tolist() == [3, 2, 2, 4]
    assert batch["num_examples"] == 2 and batch["num_responses"] == 2


def test_prompt_rendering_uses_chat_template(tokenizer):
    ids = render_prompt(tokenizer, "What is 2 + 2?", system_prompt="Be brief.")
    text = tokenizer.decode(ids)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n"
    assert response_ids(tokenizer, "4", finished=True)[-1] == tokenizer.eos_token_id
    assert tokenizer.eos_token_id not in response_ids(tokenizer, "4", finished=False)


def _write(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_read_pairs_jsonl_json_and_messages(tmp_path):
    jsonl = _write(tmp_path / "d.jsonl", [{"q": "a?", "a": "b"}, {"q": "c?", "a": "d"}, {"q": "a?", "a": "b"}])
    assert read_pairs(jsonl, "train", "q", "a") == [{"prompt": "a?", "response": "b"}, {"prompt": "c?", "response": "d"}]
    (tmp_path / "d.json").write_text(json.dumps([{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "x"}]}]))
    assert read_pairs(str(tmp_path / "d.json"), "train", "prompt", "response") == [{"prompt": "hi", "response": "hello"}]
    assert len(read_pairs(jsonl, "train", "q", "a", max_samples=1)) == 1


def test_read_pairs_reports_every_bad_row(tmp_path):
    path = _write(tmp_path / "bad.jsonl", [{"prompt": "ok", "response": "ok"}, {"prompt": "x"}, {"prompt": "", "response": "y"}, {"prompt": 3, "response": "z"}])
    with pytest.raises(ConfigError) as info:
        read_pairs(path, "train", "prompt", "response")
    message = str(info.value)
    assert "bad.jsonl: row 2: missing field 'response'" in message
    assert "row 3: field 'prompt' must be a non-empty string" in message
    assert "row 4: field 'prompt' must be a non-empty string" in message


def test_read_pairs_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        read_pairs(str(tmp_path / "missing.jsonl"), "train", "prompt", "response")
    (tmp_path / "broken.jsonl").write_text('{"prompt": "a", "response": "b"}\n{"prompt": \n')
    with pytest.raises(ValueError, match="broken.jsonl' row 2 is not valid JSON"):
        read_pairs(str(tmp_path / "broken.jsonl"), "train", "prompt", "response")


def test_generation_resumes_without_regenerating_or_duplicating(tiny_model_dir, tokenizer, tmp_path):
    model = models.attach_lora(models.load_base_model(tiny_model_dir), lora_rank=4)
    prompts = [render_prompt(tokenizer, f"Question number {i}" + "?" * (i % 3)) for i in range(10)]
    kwargs = dict(batch_size=4, max_new_tokens=6, temperature=1.0, seed=3)
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
    model = models.attach_lora(models.load_base_model(tiny_model_dir), lora_rank=4, lora_alpha=8)
    randomize_lora(model)
    model.get_base_model().generation_config.repetition_penalty = 3.0
    eos = tokenizer.eos_token_id
    if temperature > 0:  # EOS made likelier (in generation and scoring alike): some rows finish early
        boost = torch.zeros(len(tokenizer)).index_fill(0, torch.tensor([eos]), 1.0)
        model.get_output_embeddings().register_forward_hook(lambda module, args, out: out + boost)
    prompts = [render_prompt(tokenizer, f"Question {i}" + "?" * (i % 3)) for i in range(6)]
    generated, _ = generate_responses(model, tokenizer, prompts, batch_size=4, max_new_tokens=16, temperature=temperature, seed=1)
    if temperature > 0:
        assert {g.finished for g in generated} == {True, False}, "finished and unfinished rows are covered"
    for g in generated:
        assert g.token_ids[-1] == eos if g.finished else eos not in g.token_ids
        assert len(g.token_ids) == g.num_tokens + g.finished
    examples = [{"prompt_ids": p, "generated_ids": g.token_ids} for p, g in zip(prompts, generated)]
    model.eval()
    with torch.no_grad():
        scored = models.response_logps(model, Collator(tokenizer.pad_token_id, ("generated",))(examples))
    torch.testing.assert_close(torch.tensor([g.logp for g in generated], dtype=torch.float32), scored, rtol=1e-4, atol=1e-4)
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
        "top-3 renormalised, then nucleus 0.9": ((), {"top_k": 3, "top_p": 0.9}, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0]),
        "temperature 2: p^(1/2) renormalised": ((2.0,), {"top_k": 0}, [0.379, 0.293, 0.208, 0.120]),
    }
    for name, (args, kwargs, probs) in expected.items():
        torch.testing.assert_close(frequencies(*args, **kwargs), torch.tensor(probs), atol=0.015, rtol=0, msg=name)


def test_sampling_with_top_k_1_is_greedy(tiny_model_dir, tokenizer):
    """The sampler really drives generate(): keeping one candidate reproduces greedy decoding."""
    model = models.attach_lora(models.load_base_model(tiny_model_dir), lora_rank=4)
    prompts = [render_prompt(tokenizer, p) for p in ("What is 2 + 3?", "Hi", "Name a colour.")]
    greedy, _ = generate_responses(model, tokenizer, prompts, max_new_tokens=8, temperature=0.0)
    top_1, _ = generate_responses(model, tokenizer, prompts, max_new_tokens=8, temperature=1.0, top_k=1, seed=5)
    sampled, _ = generate_responses(model, tokenizer, prompts, max_new_tokens=8, temperature=1.0, top_k=0, seed=5)
    assert top_1 == greedy
    assert sampled != greedy
    for prompt, ours in zip(prompts, greedy):  # and temperature 0 is transformers' own greedy decoding
        reference = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        assert reference[0, len(prompt) :].tolist()[: len(ours.token_ids)] == ours.token_ids


def test_length_grouped_order_batches_similar_lengths():
    lengths = torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(0)).tolist()

    def batches(window, seed=1, n=64, batch_size=8):
        order = length_grouped_order(lengths[:n], batch_size, window, torch.Generator().manual_seed(seed))
        assert sorted(order) == list(range(n)), "a permutation"
        return [order[k : k + batch_size] for k in range(0, n, batch_size)]

    def ranks(batch, n):  # positions of the batch's examples among the first n sorted by length
        rank = {i: r for r, i in enumerate(sorted(range(n), key=lambda i: lengths[i]))}
        return sorted(rank[i] for i in batch)

    # one window over the whole epoch: every batch is a run of consecutive lengths
    for batch in batches(window=8):
        assert ranks(batch, 64) == list(range(ranks(batch, 64)[0], ranks(batch, 64)[0] + 8))
    padding = lambda bs: sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in bs)
    assert padding(batches(window=4)) < 0.5 * padding(batches(window=1))
    assert batches(window=4) == batches(window=4) and batches(window=4) != batches(window=4, seed=2), "seeded"
    # 30 examples in batches of 8, one window: the short batch (the 6 longest) stays last, so cutting
    # the order every 8 examples still gives runs of consecutive lengths
    cut = batches(window=4, n=30)
    assert ranks(cut[-1], 30) == list(range(24, 30))
    assert sorted(ranks(b, 30) for b in cut[:-1]) == [list(range(k, k + 8)) for k in (0, 8, 16)]


def test_length_grouped_batches_must_be_positive():
    with pytest.raises(ConfigError, match="data.length_grouped_batches: must be >= 1"):
        SelfPlayDataModule(length_grouped_batches=0)
