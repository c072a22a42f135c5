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


def split_examples(batch: dict, parts: int) -> list[dict]:
    """`batch` (either layout) as `parts` batches of consecutive examples, as even in size as can be:
    each what its collator makes of those examples, but for columns of padding at the end (which
    change no log-prob). A training step that runs out of memory runs its batch so."""
    n, k = batch["num_examples"], batch["num_responses"]
    known = {"num_examples", "num_responses", "response_lengths", "opponent_real_logps", "opponent_generated_logps"}
    shared = "targets" in batch
    tokens = (
        ("input_ids", "position_ids", "segments", "targets") if shared else ("input_ids", "attention_mask", "labels")
    )
    if unknown := set(batch) - known - set(tokens):
        raise ValueError(f"split_examples does not know the batch fields {sorted(unknown)}")
    sizes = [n // parts + (i < n % parts) for i in range(parts)]
    split, start = [], 0
    for size in filter(None, sizes):
        examples = torch.arange(start, start + size, device=batch["input_ids"].device)
        part = {"num_examples": size, "num_responses": k}
        if shared:  # one row per example; targets [K, batch, seq]
            part |= {key: batch[key][examples] for key in ("input_ids", "position_ids", "segments")}
            part["targets"] = batch["targets"][:, examples]
        else:  # rows [response_1 of every example; response_2 of every example; ...]
            rows = torch.cat([examples + r * n for r in range(k)])
            part |= {key: batch[key][rows] for key in tokens}
        part["response_lengths"] = batch["response_lengths"].view(k, n)[:, start : start + size].reshape(-1)
        for key in ("opponent_real_logps", "opponent_generated_logps"):
            if key in batch:
                part[key] = batch[key][start : start + size]
        split.append(part)
        start += size
    return split


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


# Scored positions per lm_head chunk: [chunk, vocab] float32 logits (~100 MB at SmolLM2's 49k vocabulary)
# instead of [batch, seq, vocab] for the whole batch (with log-softmax and backward copies, ~1 GB each).
LOGITS_CHUNK_SIZE = 512


def response_logps(
    model: torch.nn.Module,
    batch: dict,
    average: bool = False,
    num_responses: int | None = None,
    chunk_size: int | None = LOGITS_CHUNK_SIZE,
) -> torch.Tensor:
    """Log-probs of the responses of `batch`, laid out [response_1; response_2; ...] along dim 0.

    Takes either layout: one row per (example, response) with `labels` (`Collator`), or
    one row per example with the prompt once and every response after it (`SharedPromptCollator`).
    `num_responses` scores only the first n responses of each example (e.g. real and generated of a
    T-SPIN batch, which also holds proto). Returns [K*batch] float32 sums (means with `average`).

    The lm_head runs on the scored positions only, `chunk_size` of them at a time (`chunked_token_logps`),
    so no [batch, seq, vocab] logits exist in the forward or the backward; the log-probs and
    gradients are those of the full logits. `chunk_size=None`, or a model whose logits are more than
    lm_head(decoder output) (`_decoder_and_head`), takes the full logits of the scored span instead.
    """
    if "targets" in batch:
        targets = batch["targets"][:num_responses]
        k, row, position = (targets != IGNORE_INDEX).nonzero(as_tuple=True)
        token_targets, slot = targets[k, row, position], k * targets.shape[1] + row
        num_slots = targets.shape[0] * targets.shape[1]
        inputs = {
            "input_ids": batch["input_ids"],
            "position_ids": batch["position_ids"],
            "attention_mask": shared_prompt_mask(batch["segments"], model),
        }
    else:
        rows = slice(0, None if num_responses is None else num_responses * batch["num_examples"])
        labels = batch["labels"][rows]
        # position t predicts the token at t + 1
        row, position = (labels[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)
        token_targets, slot, num_slots = labels[row, position + 1], row, labels.shape[0]
        inputs = {"input_ids": batch["input_ids"][rows], "attention_mask": batch["attention_mask"][rows]}
    parts = _decoder_and_head(model) if chunk_size else None
    if parts is None:
        return _full_logits_logps(model, batch, inputs, average, num_responses)
    decoder, head = parts
    hidden = decoder(**inputs, use_cache=False).last_hidden_state
    token_logps = chunked_token_logps(hidden[row, position], token_targets, head, chunk_size)
    summed = torch.zeros(num_slots, dtype=token_logps.dtype, device=token_logps.device).index_add(0, slot, token_logps)
    if average:
        counts = torch.zeros_like(summed).index_add(0, slot, torch.ones_like(token_logps))
        return summed / counts.clamp(min=1)
    return summed


def chunked_token_logps(
    hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module, chunk_size: int = LOGITS_CHUNK_SIZE
) -> torch.Tensor:
    """log softmax(head(hidden))[target] per row of hidden [N, d], targets [N]: returns [N] float32.

    At most `chunk_size` rows of logits exist at a time, in the forward and in the backward:
    - a frozen plain `nn.Linear` head (LoRA leaves the lm_head alone): `_FrozenHeadLogps` takes
      d log p / d hidden = W^T (onehot - softmax) per row while it has the logits, so the backward
      is one multiply and costs no more than the full-logits backward did;
    - any other head (trainable, adapted, partitioned): each chunk under activation checkpointing,
      its logits recomputed in the backward (one more lm_head forward over the scored positions).
    """
    if not (torch.is_grad_enabled() and hidden.requires_grad):
        with torch.no_grad():
            return torch.cat([_chunk_logps(head, h, t) for h, t in _chunks(hidden, targets, chunk_size)])
    if _is_frozen_linear(head):
        return _FrozenHeadLogps.apply(hidden, head.weight, head.bias, targets, chunk_size)
    return torch.cat(
        [
            torch.utils.checkpoint.checkpoint(_chunk_logps, head, h, t, use_reentrant=False)
            for h, t in _chunks(hidden, targets, chunk_size)
        ]
    )


def _chunks(hidden: torch.Tensor, targets: torch.Tensor, chunk_size: int):
    if hidden.shape[0] == 0:  # nothing scored: one empty chunk keeps torch.cat and the graph well-formed
        yield hidden, targets
    for start in range(0, hidden.shape[0], chunk_size):
        yield hidden[start : start + chunk_size], targets[start : start + chunk_size]


def _chunk_logps(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) of each row, from float32 logits as the full-logits path computes them."""
    logits = head(hidden).float()
    return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


class _FrozenHeadLogps(torch.autograd.Function):
    """`_chunk_logps` over chunks for a frozen linear head: the gradient w.r.t. the hidden states is
    taken per chunk in the forward (the head's weights need none), so no chunk's logits are kept."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size):
        logps, directions = [], []
        for h, t in _chunks(hidden, targets, chunk_size):
            logits = F.linear(h, weight, bias).float()
            normaliser = torch.logsumexp(logits, dim=-1, keepdim=True)
            logps.append(logits.gather(-1, t[:, None]).squeeze(-1) - normaliser.squeeze(-1))
            # d log p(t) / d logits = onehot(t) - softmax, then through the head: W^T (onehot - softmax),
            # cast to the head's dtype before the matmul as the full-logits backward casts its gradient
            minus_softmax = (
                logits.sub_(normaliser).exp_().neg_().scatter_add_(-1, t[:, None], torch.ones_like(logits[:, :1]))
            )
            directions.append(minus_softmax.to(weight.dtype) @ weight)
        ctx.save_for_backward(torch.cat(directions))
        return torch.cat(logps)

    @staticmethod
    def backward(ctx, grad_logps):
        (directions,) = ctx.saved_tensors
        return (grad_logps[:, None] * directions.float()).to(directions.dtype), None, None, None, None


def _is_frozen_linear(head: torch.nn.Module) -> bool:
    """A plain nn.Linear (not an adapter or quantised wrapper) whose weight and bias need no gradient."""
    return (
        type(head) is torch.nn.Linear
        and not head.weight.requires_grad
        and (head.bias is None or not head.bias.requires_grad)
    )


# Config fields of models whose logits are lm_head(hidden) rescaled or capped (Gemma 2/3, Cohere,
# Granite, Falcon-H1): lm_head(decoder output) alone would not be their logits.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "lm_head_multiplier")


def _decoder_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """(the decoder stack, the lm_head) of a causal LM (under a peft wrapper too: its adapters live
    in the modules), or None where logits are not lm_head(decoder output) or the head is partitioned
    by DeepSpeed ZeRO-3."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(inner, "config", None)
    if config is None or any(getattr(config, name, None) not in (None, 1, 1.0) for name in _LOGIT_TRANSFORMS):
        return None
    if not (hasattr(inner, "get_decoder") and hasattr(inner, "get_output_embeddings")):
        return None
    decoder, head = inner.get_decoder(), inner.get_output_embeddings()
    if decoder is inner or head is None:
        return None
    if hasattr(head.weight, "ds_id"):
        # DeepSpeed ZeRO-3: every rank must call the same modules in the same order, and the number of
        # chunks follows each rank's own batch; the full logits keep one head call per forward
        return None
    return decoder, head


def _full_logits_logps(model, batch: dict, inputs: dict, average: bool, num_responses: int | None) -> torch.Tensor:
    """`response_logps` from the full logits of the scored span (`chunk_size=None`, or models whose
    logits are not lm_head(decoder output))."""
    if "targets" not in batch:
        rows = slice(0, None if num_responses is None else num_responses * batch["num_examples"])
        return sequence_logps(*response_logits(model, batch, rows=rows), average=average)
    targets = batch["targets"][:num_responses]
    first = _first_scored_position((targets != IGNORE_INDEX).any(0))
    keep = targets.shape[-1] - first  # positions from the earliest last-prompt-token on predict response tokens
    logits = model(**inputs, logits_to_keep=keep).logits
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
