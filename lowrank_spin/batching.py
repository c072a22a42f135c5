"""Batches of responses and their log-probs: the one place that knows the batch layouts.

Two layouts, the same log-probs (tested at float32):
- `Collator`: one right-padded row per (example, response), laid out [response_1; response_2; ...];
- `SharedPromptCollator`: one row per example, the prompt once and every response after it under a
  block attention mask (`shared_prompt_mask`), with position ids that restart after the prompt.
`response_logps` takes either and returns [K*batch] sequence log-probs, [response_1; response_2; ...].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def collator(pad_token_id: int, responses: tuple[str, ...], share_prompt: bool) -> Collator | SharedPromptCollator:
    """The batch layout for `responses`: the prompt shared where there are several and `share_prompt`."""
    shared = share_prompt and len(responses) > 1
    return (SharedPromptCollator if shared else Collator)(pad_token_id, responses)


class Collator:
    """Right-padded [response_1; response_2; ...] batches: each response follows its prompt, and
    labels mask the prompt and padding with IGNORE_INDEX so log-probs cover response tokens only."""

    def __init__(self, pad_token_id: int, responses: tuple[str, ...]):
        self.pad_token_id = pad_token_id
        self.responses = responses

    def __call__(self, examples: list[dict]) -> dict:
        sequences, labels = [], []
        for name in self.responses:
            for e in examples:
                sequences.append(e["prompt_ids"] + e[f"{name}_ids"])
                labels.append([IGNORE_INDEX] * len(e["prompt_ids"]) + e[f"{name}_ids"])
        width = max(len(s) for s in sequences)
        batch = {
            "input_ids": torch.tensor([s + [self.pad_token_id] * (width - len(s)) for s in sequences]),
            "attention_mask": torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences]),
            "labels": torch.tensor([l + [IGNORE_INDEX] * (width - len(l)) for l in labels]),
        }
        return batch | _batch_info(examples, self.responses)


class SharedPromptCollator:
    """One right-padded row per example, the prompt once: [prompt; response_1; response_2; ...].

    The math task's prompts are about half of the tokens of a [real; generated] batch, so running
    them once per example instead of once per response saves about a quarter of the forward's tokens
    (more for T-SPIN's three responses). `segments` (0 prompt, k response k, -1 padding) give
    `shared_prompt_mask`, which lets each response attend to the prompt and to itself only;
    `position_ids` restart after the prompt for every response. `targets[k]` holds, at each position,
    the token it predicts for response k: the last prompt position predicts the first token of all.
    """

    def __init__(self, pad_token_id: int, responses: tuple[str, ...]):
        self.pad_token_id = pad_token_id
        self.responses = responses

    def __call__(self, examples: list[dict]) -> dict:
        rows, positions, segments, targets = [], [], [], []
        for e in examples:
            prompt = e["prompt_ids"]
            ids, position, segment = list(prompt), list(range(len(prompt))), [0] * len(prompt)
            row_targets = []
            for k, name in enumerate(self.responses, start=1):
                response = e[f"{name}_ids"]
                # position len(prompt) - 1 predicts response[0]; response[j] predicts response[j + 1]
                predictors = [len(prompt) - 1] + [len(ids) + j for j in range(len(response) - 1)]
                row_targets.append(dict(zip(predictors, response)))
                ids += response
                position += range(len(prompt), len(prompt) + len(response))
                segment += [k] * len(response)
            rows.append(ids)
            positions.append(position)
            segments.append(segment)
            targets.append(row_targets)
        width = max(len(r) for r in rows)
        batch = {
            "input_ids": torch.tensor([r + [self.pad_token_id] * (width - len(r)) for r in rows]),
            "position_ids": torch.tensor([p + [0] * (width - len(p)) for p in positions]),
            "segments": torch.tensor([s + [-1] * (width - len(s)) for s in segments]),
            "targets": torch.tensor(
                [
                    [[row[k].get(i, IGNORE_INDEX) for i in range(width)] for row in targets]
                    for k in range(len(self.responses))
                ]
            ),
        }
        return batch | _batch_info(examples, self.responses)


def _batch_info(examples: list[dict], responses: tuple[str, ...]) -> dict:
    """What both layouts carry besides the tokens: sizes, response lengths, precomputed opponent log-probs."""
    info = {
        "num_responses": len(responses),
        "num_examples": len(examples),
        # scored tokens per response, laid out [response_1; response_2; ...] like the log-probs
        "response_lengths": torch.tensor([len(e[f"{name}_ids"]) for name in responses for e in examples]),
    }
    for key in ("opponent_real_logps", "opponent_generated_logps"):
        if all(key in e for e in examples):
            info[key] = torch.tensor([e[key] for e in examples], dtype=torch.float32)
    return info


def batches(examples: list[dict], collate: Collator, batch_size: int, device):
    """(examples, collated batch on `device`) in order, `batch_size` examples at a time."""
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        yield chunk, {k: v.to(device) if torch.is_tensor(v) else v for k, v in collate(chunk).items()}


def length_grouped_order(lengths: list[int], batch_size: int, window: int, generator: torch.Generator) -> list[int]:
    """A random order of the examples in which consecutive `batch_size` runs have similar lengths.

    Shuffle; sort each window of `window` batches by length and cut it into batches; shuffle the full
    batches. A short last batch stays last, so cutting the order every `batch_size` gives these batches.
    """
    shuffled = torch.randperm(len(lengths), generator=generator).tolist()
    batches = []
    for start in range(0, len(shuffled), window * batch_size):
        group = sorted(shuffled[start : start + window * batch_size], key=lambda i: lengths[i])
        batches += [group[k : k + batch_size] for k in range(0, len(group), batch_size)]
    last = [batches.pop()] if batches and len(batches[-1]) < batch_size else []
    return [i for b in torch.randperm(len(batches), generator=generator).tolist() for i in batches[b]] + [
        i for b in last for i in b
    ]


def response_logits(
    model: torch.nn.Module, batch: dict, rows: slice = slice(None)
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits from the last prompt token on, and the labels aligned with them.

    Prompt positions predict nothing that is scored, and the lm_head over SmolLM2's 49k vocabulary is
    about a fifth of the model's FLOPs while its float32 logits dominate activation memory: skipping
    the common prompt prefix with `logits_to_keep` saves both without changing any log-prob.
    """
    input_ids, attention_mask, labels = batch["input_ids"][rows], batch["attention_mask"][rows], batch["labels"][rows]
    width = labels.shape[1]
    first = _first_scored_position(labels != IGNORE_INDEX)
    keep = min(width, width - first + 1)  # position first - 1 predicts the first response token
    logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep).logits
    return logits, labels[:, width - keep :]


def response_logps(
    model: torch.nn.Module, batch: dict, average: bool = False, num_responses: int | None = None
) -> torch.Tensor:
    """Log-probs of the responses of `batch`, laid out [response_1; response_2; ...] along dim 0.

    Takes either layout: one row per (example, response) with `labels` (`Collator`), or
    one row per example with the prompt once and every response after it (`SharedPromptCollator`).
    `num_responses` scores only the first n responses of each example (e.g. real and generated of a
    T-SPIN batch, which also holds proto).
    """
    if "targets" not in batch:
        rows = slice(0, None if num_responses is None else num_responses * batch["num_examples"])
        return sequence_logps(*response_logits(model, batch, rows=rows), average=average)
    targets = batch["targets"][:num_responses]
    first = _first_scored_position((targets != IGNORE_INDEX).any(0))
    keep = targets.shape[-1] - first  # positions from the earliest last-prompt-token on predict response tokens
    mask = shared_prompt_mask(batch["segments"], model)
    logits = model(
        input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=mask, logits_to_keep=keep
    ).logits
    return shared_prompt_logps(logits, targets[..., first:], average=average)


def _first_scored_position(scored: torch.Tensor) -> int:
    """The earliest column of [batch, seq] `scored` that is True in any row (the last one if none is)."""
    if not scored.any():
        return scored.shape[-1] - 1
    return int(scored.float().argmax(-1)[scored.any(-1)].min())


def shared_prompt_mask(segments: torch.Tensor, model: torch.nn.Module) -> torch.Tensor:
    """The [batch, 1, seq, seq] attention mask of the shared-prompt layout.

    segments: [batch, seq], 0 for prompt tokens, k for response k, -1 for padding. A token attends
    causally to the prompt and to its own response, never to another response: with position ids
    that restart after the prompt for every response, each response sees exactly the context it has
    in a row of its own. Padding sees the prompt and itself (no row of the mask is empty, so no NaN)
    and is never scored. sdpa takes the boolean mask; eager attention adds it, so it gets 0 / the
    dtype's minimum instead.
    """
    width = segments.shape[-1]
    query, key = segments[:, :, None], segments[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool, device=segments.device).tril()
    diagonal = torch.eye(width, dtype=torch.bool, device=segments.device)
    allowed = (causal & (key >= 0) & ((key == 0) | (key == query))) | diagonal
    allowed = allowed[:, None]
    if getattr(model.config, "_attn_implementation", "sdpa") == "sdpa":
        return allowed
    dtype = model.get_input_embeddings().weight.dtype
    return torch.zeros(allowed.shape, dtype=dtype, device=segments.device).masked_fill(~allowed, torch.finfo(dtype).min)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, average: bool = False) -> torch.Tensor:
    """Sum (or mean) of log p(label_t | prefix) over the positions where labels != IGNORE_INDEX.

    logits: [batch, seq, vocab] predicting the *next* token; labels: [batch, seq] aligned with the
    inputs (prompt and padding set to IGNORE_INDEX). Returns [batch] in float32.
    """
    logits = logits[:, :-1, :]
    labels = labels[:, 1:]
    mask = labels != IGNORE_INDEX
    # cross_entropy avoids materialising the full [batch, seq, vocab] log-softmax a second time.
    token_logps = -F.cross_entropy(logits.float().transpose(1, 2), labels.masked_fill(~mask, 0), reduction="none")
    token_logps = token_logps * mask
    summed = token_logps.sum(-1)
    if average:
        return summed / mask.sum(-1).clamp(min=1)
    return summed


def shared_prompt_logps(logits: torch.Tensor, targets: torch.Tensor, average: bool = False) -> torch.Tensor:
    """Sequence log-probs of K responses that share one row (and one prompt) per example.

    logits: [batch, seq, vocab]; targets: [K, batch, seq], the token that position s predicts for
    response k (IGNORE_INDEX where it predicts nothing of response k). The last prompt position
    predicts the first token of every response, so one position can serve several k. Returns [K*batch]
    in float32, laid out [response_1; response_2; ...] like `sequence_logps` over the unshared layout.
    """
    num_responses, batch = targets.shape[:2]
    k, row, position = (targets != IGNORE_INDEX).nonzero(as_tuple=True)
    # log p = logit of the token − logsumexp over the vocabulary, computed once per position
    normaliser = torch.logsumexp(logits.float(), dim=-1)
    token_logps = logits[row, position, targets[k, row, position]].float() - normaliser[row, position]
    slot = k * batch + row
    summed = torch.zeros(num_responses * batch, device=logits.device).index_add(0, slot, token_logps)
    if average:
        counts = torch.zeros_like(summed).index_add(0, slot, torch.ones_like(token_logps))
        return summed / counts.clamp(min=1)
    return summed
