"""The two batch layouts, length-grouped batches, and the response log-probs computed from them."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import chat_batch, randomize_lora

from lowrank_spin import batching, models
from lowrank_spin.batching import (
    IGNORE_INDEX,
    Collator,
    SharedPromptCollator,
    length_grouped_order,
    sequence_logps,
    shared_prompt_logps,
)
from lowrank_spin.settings import LoRASettings

PROMPTS = ["What is 12 + 7?", "Tom has 3 apples and buys 4 more. How many apples does he have?"]
RESPONSES = ["12 + 7 = 19.\nThe answer is 19.", "3 + 4 = 7.\nThe answer is 7."]


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


def test_response_logits_give_the_full_log_probs(tiny_model_dir, tokenizer):
    """Skipping the shared prompt prefix in the lm_head changes no log-prob (prompts of different lengths)."""
    model = models.attach_lora(models.load_base_model(tiny_model_dir), LoRASettings(rank=4))
    randomize_lora(model)
    batch = chat_batch(tokenizer, ["Hi?", "A much longer prompt than the first one?"], ["Hello.", "Yes."])
    model.eval()
    with torch.no_grad():
        full = sequence_logps(
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"]
        )
        logits, labels = batching.response_logits(model, batch)
        trimmed = sequence_logps(logits, labels)
    assert logits.shape[1] < batch["input_ids"].shape[1]
    torch.testing.assert_close(trimmed, full, rtol=1e-5, atol=1e-5)
    first_row_only, _ = batching.response_logits(model, batch, rows=slice(0, 1))
    assert first_row_only.shape[0] == 1


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_shared_prompt_layout_gives_the_same_logps_and_gradients(tiny_model_dir, tokenizer, attn_implementation):
    """Prompt once with a block mask vs one row per response: equal log-probs and LoRA gradients,
    with prompts and responses of different lengths, padding, and an empty proto response."""
    from lowrank_spin.batching import Collator, SharedPromptCollator
    from lowrank_spin.data.chat import render_prompt, response_ids

    base = models.load_base_model(tiny_model_dir, attn_implementation=attn_implementation)
    model = models.attach_lora(base, LoRASettings(rank=4))
    randomize_lora(model)
    texts = [
        ("Hi?", "Hello.", "Hey there, friend.", ""),
        ("A much longer prompt than the first?", "Yes.", "No!", "Maybe so."),
    ]
    examples = [
        {
            "prompt_ids": render_prompt(tokenizer, p),
            "real_ids": response_ids(tokenizer, r, True),
            "generated_ids": response_ids(tokenizer, g, False),
            "proto_ids": tokenizer(y, add_special_tokens=False)["input_ids"],
        }
        for p, r, g, y in texts
    ]
    responses = ("real", "generated", "proto")
    results = {}
    for name, collate in (("rows", Collator), ("shared", SharedPromptCollator)):
        model.zero_grad()
        logps = batching.response_logps(model, collate(tokenizer.pad_token_id, responses)(examples), average=True)
        (logps * torch.arange(1.0, 7.0)).sum().backward()  # a different weight per response
        results[name] = logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    (rows, rows_grads), (shared, shared_grads) = results["rows"], results["shared"]
    assert (
        rows.shape == (6,) and rows[4] == 0
    )  # [real_0, real_1, generated_0, generated_1, proto_0, proto_1]; proto_0 is empty
    torch.testing.assert_close(shared, rows, rtol=1e-5, atol=1e-5)
    assert rows_grads.keys() == shared_grads.keys() and rows_grads
    for name in rows_grads:
        torch.testing.assert_close(shared_grads[name], rows_grads[name], rtol=1e-3, atol=1e-5)
    first_two = batching.response_logps(
        model, SharedPromptCollator(tokenizer.pad_token_id, responses)(examples), num_responses=2
    )
    assert first_two.shape == (4,)


def test_sequence_logps_masks_prompt_and_padding():
    """Vocab 3, uniform logits except where set: the response tokens at positions 2 and 3 are scored
    by the logits at positions 1 and 2; the prompt (0, 1) and padding (4) are ignored."""
    logits = torch.zeros(1, 5, 3)
    logits[0, 1] = torch.tensor([0.0, math.log(2.0), 0.0])  # p(token 1) = 2/4
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 1, 2, IGNORE_INDEX]])
    summed = sequence_logps(logits, labels)
    expected = math.log(0.5) + math.log(1 / 3)
    assert summed.item() == pytest.approx(expected, rel=1e-6)
    assert sequence_logps(logits, labels, average=True).item() == pytest.approx(expected / 2, rel=1e-6)


def test_sequence_logps_of_empty_response_is_zero():
    labels = torch.full((2, 4), IGNORE_INDEX)
    assert torch.equal(sequence_logps(torch.randn(2, 4, 5), labels, average=True), torch.zeros(2))


def test_shared_prompt_logps_by_hand():
    """One row [p0, p1, a0, b0, b1] with responses a = [a0] and b = [b0, b1] after prompt [p0, p1]:
    position 1 (the last prompt token) predicts a0 and b0, position 3 (b0) predicts b1. Vocabulary of
    2 with logits (0, ln 3) at every position: log p(token 0) = ln 1/4, log p(token 1) = ln 3/4."""
    I = IGNORE_INDEX
    logits = torch.tensor([[0.0, math.log(3)]]).expand(5, 2).unsqueeze(0)
    targets = torch.tensor([[[I, 1, I, I, I]], [[I, 0, I, 1, I]]])  # [K=2, batch=1, seq=5]
    summed = shared_prompt_logps(logits, targets)
    assert summed.tolist() == pytest.approx([math.log(3 / 4), math.log(1 / 4) + math.log(3 / 4)])
    averaged = shared_prompt_logps(logits, targets, average=True)
    assert averaged.tolist() == pytest.approx([math.log(3 / 4), (math.log(1 / 4) + math.log(3 / 4)) / 2])


def test_shared_prompt_logps_of_empty_response_is_zero():
    targets = torch.full((2, 3, 4), IGNORE_INDEX)
    targets[0, :, 1] = 0
    logps = shared_prompt_logps(torch.randn(3, 4, 5), targets, average=True)
    assert logps.shape == (6,) and torch.equal(logps[3:], torch.zeros(3))


def _three_response_examples(tokenizer) -> list[dict]:
    from lowrank_spin.data.chat import render_prompt, response_ids

    texts = [
        ("Hi?", "Hello.", "Hey there, friend.", ""),
        ("A much longer prompt than the first?", "Yes.", "No!", "Maybe so."),
    ]
    return [
        {
            "prompt_ids": render_prompt(tokenizer, p),
            "real_ids": response_ids(tokenizer, r, True),
            "generated_ids": response_ids(tokenizer, g, False),
            "proto_ids": tokenizer(y, add_special_tokens=False)["input_ids"],
        }
        for p, r, g, y in texts
    ]


def _logps_and_grads(model, batch, **kwargs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    logps = batching.response_logps(model, batch, **kwargs)
    (logps * torch.arange(1.0, logps.shape[0] + 1)).sum().backward()  # a different weight per response
    return logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("layout", [Collator, SharedPromptCollator])
@pytest.mark.parametrize("trainable_head", [False, True])
def test_chunked_logps_equal_the_full_logits_ones(tiny_model_dir, tokenizer, layout, trainable_head):
    """The lm_head in chunks of 3 scored positions vs the full logits: equal log-probs and gradients
    (float32), with a frozen head (LoRA: the gradient taken in the forward) and a trainable one
    (every parameter trained: chunks under checkpointing, the tied embedding's gradient included)."""
    base = models.load_base_model(tiny_model_dir, dtype="float32")
    if trainable_head:
        model = base.requires_grad_(True)
        assert model.get_output_embeddings().weight.requires_grad
    else:
        model = models.attach_lora(base, LoRASettings(rank=4))
        randomize_lora(model)
    model.eval()  # the same forward twice (no dropout); gradients still flow
    batch = layout(tokenizer.pad_token_id, ("real", "generated", "proto"))(_three_response_examples(tokenizer))
    for kwargs in ({}, {"average": True}, {"num_responses": 2}):
        full, full_grads = _logps_and_grads(model, batch, chunk_size=None, **kwargs)
        chunked, chunked_grads = _logps_and_grads(model, batch, chunk_size=3, **kwargs)
        torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-5)
        assert chunked_grads.keys() == full_grads.keys() and full_grads
        for name, full_grad in full_grads.items():  # float32 summation order: 1e-5 of the gradient's scale
            torch.testing.assert_close(chunked_grads[name], full_grad, rtol=1e-5, atol=1e-5 * full_grad.abs().max())
        with torch.no_grad():  # scoring: the chunks without a graph
            unscored = batching.response_logps(model, batch, chunk_size=3, **kwargs)
        torch.testing.assert_close(unscored, full, rtol=1e-5, atol=1e-5)
    if trainable_head:
        assert "model.embed_tokens.weight" in full_grads, "the tied lm_head/embedding gets its gradient"


@pytest.mark.parametrize("layout", [Collator, SharedPromptCollator])
def test_chunked_logps_keep_no_vocabulary_sized_activations(tiny_model_dir, tokenizer, layout):
    """What the backward keeps: with LoRA's frozen head no [positions, vocab] logits at all (the full
    logits path saves [batch, seq, vocab] ones); at most `chunk_size` positions in the forward."""
    model = models.attach_lora(models.load_base_model(tiny_model_dir, dtype="float32"), LoRASettings(rank=4))
    randomize_lora(model)
    vocab = model.get_output_embeddings().weight.shape[0]
    batch = layout(tokenizer.pad_token_id, ("real", "generated"))(_three_response_examples(tokenizer))
    scored_positions = int((batch["labels" if layout is Collator else "targets"] != IGNORE_INDEX).sum())
    assert scored_positions > 3

    def vocabulary_sized_saved(**kwargs) -> int:
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
            logps = batching.response_logps(model, batch, **kwargs)
        logps.sum().backward()
        return max((s.numel() for s in saved if len(s) and s[-1] == vocab), default=0)

    assert vocabulary_sized_saved(chunk_size=None) >= scored_positions * vocab
    assert vocabulary_sized_saved(chunk_size=3) == 0
