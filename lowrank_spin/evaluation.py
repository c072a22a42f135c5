"""Held-out evaluation of the policy: gold-response NLL per token, and greedy task accuracy where the
dataset has a checker (the embedded math task)."""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from lowrank_spin.batching import Collator, batches, response_logps
from lowrank_spin.data.chat import response_ids
from lowrank_spin.embedded import task
from lowrank_spin.faults import safe_point
from lowrank_spin.generation import generate_responses
from lowrank_spin.opponent import Opponent
from lowrank_spin.settings import SamplingSettings


def evaluate(
    model, tokenizer, examples: list[dict], check_answers: bool, sampling: SamplingSettings, max_new_tokens: int
) -> tuple[dict, list[dict]]:
    """Greedy answers and gold NLL of `model` (the policy) on `examples` (dicts with prompt_ids, real_ids, ...).

    Returns (metrics, samples): metrics `nll` (per token), `generated_tokens`, `unfinished_fraction`,
    `accuracy` (None without a checker) with its Wilson interval and per number of steps; one sample
    (prompt, real, generated, finished, correct) per example.
    """
    greedy = replace(sampling, temperature=0.0, max_new_tokens=max_new_tokens, best_of=1)
    generated, _ = generate_responses(model, tokenizer, [e["prompt_ids"] for e in examples], greedy, desc="evaluate")
    nll, tokens = gold_nll(model, examples, Collator(tokenizer.pad_token_id, ("real",)), sampling.batch_size)
    metrics = {
        "nll": nll / max(tokens, 1),
        "generated_tokens": sum(g.num_tokens for g in generated) / len(generated),
        "unfinished_fraction": sum(not g.finished for g in generated) / len(generated),
        "accuracy": None,
    }
    samples = [
        {"prompt": e["prompt"], "real": e["response"], "generated": g.text, "finished": g.finished}
        for e, g in zip(examples, generated)
    ]
    if check_answers:
        correct = [task.is_correct(g.text, e["answer"]) for e, g in zip(examples, generated)]
        metrics["accuracy"] = sum(correct) / len(correct)
        metrics["accuracy_ci_low"], metrics["accuracy_ci_high"] = wilson_interval(sum(correct), len(correct))
        metrics["num_examples"] = len(correct)
        # a 135M model gains first on one-step problems: report accuracy per number of reasoning steps
        for steps in sorted({e["num_steps"] for e in examples}):
            hits = [ok for e, ok in zip(examples, correct) if e["num_steps"] == steps]
            metrics[f"accuracy_{steps}_steps"] = sum(hits) / len(hits)
        for sample, ok in zip(samples, correct):
            sample["correct"] = ok
    return metrics, samples


@torch.no_grad()
def heldout_rewards(
    model, opponent: Opponent, examples: list[dict], samples: list[dict], iteration: int, beta: float, batch_size: int
) -> dict[str, float]:
    """Reward accuracy and margin of the policy `model` against `opponent` on held-out pairs:
    real = the gold response, generated = `samples` (the opponent's answers to the same prompts).

    Returns `reward_accuracy`, `reward_margin`, `reward_real`, `reward_generated` (empty without pairs).
    """
    tokenizer = opponent.tokenizer
    pairs = [
        {**e, "generated_ids": response_ids(tokenizer, s["generated"], s.get("finished", True), e["prompt"])}
        for e, s in zip(examples, samples)
        if s["prompt"] == e["prompt"]
    ]
    if not pairs:
        return {}
    collate = opponent.collator(("real", "generated"))
    was_training = model.training
    real_rewards, generated_rewards = [], []
    try:
        for _, batch in batches(pairs, collate, batch_size, opponent.device):
            model.eval()
            policy = response_logps(model, batch, average=opponent.objective.length_normalize)
            rewards = beta * (policy - opponent.logps(batch, iteration))
            real, generated = rewards.chunk(2)
            real_rewards += real.tolist()
            generated_rewards += generated.tolist()
    finally:
        model.train(was_training)
    margins = [r - g for r, g in zip(real_rewards, generated_rewards)]
    return {
        "reward_accuracy": sum(m > 0 for m in margins) / len(margins),
        "reward_margin": sum(margins) / len(margins),
        "reward_real": sum(real_rewards) / len(real_rewards),
        "reward_generated": sum(generated_rewards) / len(generated_rewards),
    }


def best_iteration(results: dict[int, dict], metric: str) -> int | None:
    """The evaluated iteration with the best `metric` (`accuracy`: highest, ties to the lower nll;
    `nll`: lowest), ties to the earlier iteration; None when no row has the metric."""
    rows = {t: row for t, row in results.items() if row.get(metric) is not None}
    if not rows:
        return None
    if metric == "accuracy":
        return min(rows, key=lambda t: (-rows[t]["accuracy"], rows[t].get("nll", math.inf), t))
    return min(rows, key=lambda t: (rows[t][metric], t))


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """(low, high): the 95% Wilson score interval of a binomial proportion (sane at 0 and n, unlike the normal one)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, center - half), min(1.0, center + half)


def paired_difference(a: list[bool], b: list[bool], z: float = 1.96) -> tuple[float, float, float]:
    """(mean, low, high): accuracy of a minus accuracy of b on the same problems, with its 95% interval.

    Pairing by problem removes the problems both get right or both get wrong from the noise, so it
    resolves far smaller differences than two independent Wilson intervals would. Normal
    approximation on the per-problem differences (fine from a few dozen problems on).
    """
    if len(a) != len(b) or not a:
        raise ValueError(f"paired_difference: needs two equal, non-empty lists, got {len(a)} and {len(b)}")
    diffs = [float(x) - float(y) for x, y in zip(a, b)]
    n = len(diffs)
    mean = sum(diffs) / n
    var = sum((d - mean) ** 2 for d in diffs) / (n - 1) if n > 1 else 0.0
    half = z * math.sqrt(var / n)
    return mean, mean - half, mean + half


@torch.no_grad()
def gold_nll(model, examples: list[dict], collate, batch_size: int) -> tuple[float, int]:
    """(summed NLL of the real responses, their token count) under `model` as it is (eval mode)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    try:
        for _, batch in batches(examples, collate, batch_size, device):
            safe_point("evaluation_batch")  # a SIGTERM abandons the evaluation here (callbacks.py)
            # chunked over the scored positions: no [batch, seq, vocab] float32 logits (GBs at 49k words)
            total += -response_logps(model, batch).sum().item()
            tokens += int(batch["response_lengths"].sum())
    finally:
        model.train(was_training)
    return total, tokens
