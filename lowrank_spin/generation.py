"""Batched synthetic-response generation: no_grad, eval mode, length-sorted, left-padded, KV-cached.

Progress is appended to a jsonl file and flushed per batch, so a run killed mid-generation resumes
without regenerating finished prompts. Each batch is seeded from (seed, batch index) and batches are
fixed by the length order, so a resumed generation equals an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from lowrank_spin import models
from lowrank_spin.faults import safe_point
from lowrank_spin.settings import SamplingSettings
from lowrank_spin.templates import end_of_turn_ids


@dataclass
class Generated:
    text: str  # decoded without the end-of-turn token
    num_tokens: int  # new tokens before the end of turn
    finished: bool  # False when max_new_tokens was hit before an end-of-turn token (`end_of_turn_ids`)
    # The sampled tokens, closed with the end-of-turn token drawn when finished: what training scores
    # (re-tokenising `text` need not give them back). None in progress files written before they were kept.
    token_ids: list[int] | None = None
    # log p(token_ids | prompt) under the generating model at temperature 1, summed over the tokens
    logp: float | None = None


def generate_responses(
    model: torch.nn.Module,
    tokenizer,
    prompt_ids: list[list[int]],
    sampling: SamplingSettings,
    *,
    seed: int = 0,
    progress_path: str | Path | None = None,
    desc: str = "generate",
    shard: tuple[int, int] = (0, 1),
) -> tuple[list[Generated | None], dict[str, float]]:
    """Generate one response per prompt; returns them in prompt order, plus timing statistics.

    `sampling` says how (`Sampler`; temperature 0 is greedy) and how many prompts go in a batch.
    A response ends at the first of `end_of_turn_ids(tokenizer, model's generation_config)` it draws.
    `shard=(rank, world_size)` generates only the batches
    b with b % world_size == rank (None for the other prompts): batches and their seeds are the
    same for any world size, so the shards gathered equal a single-process generation.

    Under DeepSpeed ZeRO-3 every forward gathers each layer's weights from all ranks, so all ranks
    must run the same forwards: there every rank generates every batch (same seeds, same answers)
    with `synced_gpus`, and `shard` is ignored.
    """
    zero3 = models.zero3_partitioned(model)
    rank, world_size = (0, 1) if zero3 else shard
    done = _read_progress(progress_path) if progress_path else {}
    order = sorted(range(len(prompt_ids)), key=lambda i: (len(prompt_ids[i]), i))
    batches = [order[i : i + sampling.batch_size] for i in range(0, len(order), sampling.batch_size)]
    mine = [(b, batch) for b, batch in enumerate(batches) if b % world_size == rank]
    pending = [(b, batch) for b, batch in mine if not all(i in done for i in batch)]
    stop_ids = end_of_turn_ids(tokenizer, _inner_model(model).generation_config)

    was_training = model.training
    model.eval()
    new_tokens, start = 0, time.perf_counter()
    log = open(progress_path, "a") if progress_path else None
    try:
        with _without_model_logits_processors(model):
            total = sum(len(batch) for _, batch in mine)
            bar = tqdm(
                total=total,
                initial=total - sum(len(b) for _, b in pending),
                desc=desc,
                unit="prompt",
                disable=shard[0] > 0,
            )
            for batch_index, batch in pending:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed * 1_000_003 + batch_index)
                    outputs = _generate_batch(
                        model, tokenizer, [prompt_ids[i] for i in batch], sampling, stop_ids, zero3
                    )
                for i, generated in zip(batch, outputs):
                    done[i] = generated
                    new_tokens += generated.num_tokens
                    if log:
                        log.write(json.dumps({"index": i, **asdict(generated)}) + "\n")
                if log:
                    log.flush()
                    os.fsync(log.fileno())
                bar.update(len(batch))
                # a stop here loses nothing: the batch is on disk (without a progress file: cheap to redo)
                safe_point("generation_batch" if log else "unsaved_generation_batch")
            bar.close()
    finally:
        if log:
            log.close()
        model.train(was_training)
    seconds = time.perf_counter() - start
    stats = {
        "seconds": seconds,
        "new_tokens": new_tokens,
        "tokens_per_second": new_tokens / max(seconds, 1e-9),
        "batches": len(pending),
    }
    return [done.get(i) for i in range(len(prompt_ids))], stats


def _inner_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a peft wrapper (whose generation_config peft copies from it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@contextlib.contextmanager
def _without_model_logits_processors(model: torch.nn.Module):
    """For the block, the model's generation_config keeps only its special tokens.

    generate() fills whatever it is not told from that config, and a shipped config may add logits
    processors (Qwen2.5-Instruct's has repetition_penalty 1.05). They would change the distribution the
    responses are drawn from and the log-probs the sampler records. Without them a response is the
    model's own sample under the temperature / top_k / top_p given here, as SPIN's opponent data is.
    """
    inner = _inner_model(model)
    shipped = inner.generation_config
    inner.generation_config = GenerationConfig(
        bos_token_id=shipped.bos_token_id, eos_token_id=shipped.eos_token_id, pad_token_id=shipped.pad_token_id
    )
    try:
        yield
    finally:
        inner.generation_config = shipped


@torch.no_grad()
def _generate_batch(
    model, tokenizer, prompts: list[list[int]], sampling: SamplingSettings, stop_ids: list[int], synced_gpus: bool
) -> list[Generated]:
    pad_id = tokenizer.pad_token_id
    width = max(len(p) for p in prompts)
    device = next(model.parameters()).device
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):  # left padding: every prompt ends where generation starts
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
        attention_mask[row, width - len(ids) :] = 1
    # sampling happens in the processor list; generate() itself only takes the argmax (see Sampler)
    sampler = Sampler(sampling.temperature, sampling.top_k, sampling.top_p, eos_token_id=stop_ids)
    output = model.generate(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        max_new_tokens=sampling.max_new_tokens,
        pad_token_id=pad_id,
        eos_token_id=stop_ids,  # a row ends at any end of turn
        use_cache=True,
        synced_gpus=synced_gpus,  # ranks keep stepping until all have finished (ZeRO-3 collectives)
        do_sample=False,
        logits_processor=LogitsProcessorList([sampler]),
    )
    results = []
    logps = sampler.logps.tolist() if sampler.logps is not None else [0.0] * len(prompts)  # None: no step ran
    stops = set(stop_ids)
    for row, logp in zip(output[:, width:].tolist(), logps):
        end = next((i for i, token in enumerate(row) if token in stops), None)
        finished = end is not None
        tokens = row[:end] if finished else row
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        results.append(Generated(text, len(tokens), finished, row[: end + 1] if finished else tokens, logp))
    return results


class Sampler(LogitsProcessor):
    """Draws the next token from softmax(logits / temperature) restricted to the `top_k` most likely
    tokens (0 = all) and to the nucleus `top_p` (temperature 0: the most likely token), and returns
    scores that are -inf except at the drawn token, so that greedy selection in generate() picks it.

    generate()'s own sampling draws from the full-vocabulary probabilities with torch.multinomial, which
    makes one exponential variate per vocabulary entry and step: 16 ms of a ~95 ms decode step for 16
    rows x 49k tokens on a 2-core CPU, even though top-k leaves 50 candidates. Drawing among the top-k
    candidates only gives the same distribution for a few hundred variates.

    With `eos_token_id` (one id or a list: every end of turn), `logps` also sums, per row, log p(drawn
    token) under the unmodified logits (temperature 1, no top-k/top-p) up to and including the row's
    first end-of-turn token: the generating model's log-prob of the response, which SPIN otherwise
    recomputes with a scoring forward.
    """

    def __init__(
        self, temperature: float, top_k: int = 50, top_p: float = 1.0, eos_token_id: int | list[int] | None = None
    ):
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.eos_token_id = eos_token_id
        self._stop_ids = None if eos_token_id is None else torch.tensor(eos_token_id, dtype=torch.long).reshape(-1)
        self.logps: torch.Tensor | None = None  # [batch] float64, once called
        self._finished: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        logits = scores.float()
        chosen = logits.argmax(-1, keepdim=True) if self.temperature == 0 else self._draw(logits / self.temperature)
        if self._stop_ids is not None:
            self._record(logits, chosen)
        return torch.full_like(logits, float("-inf")).scatter_(-1, chosen, 0.0)

    def _draw(self, scores: torch.Tensor) -> torch.Tensor:
        if self.top_k and self.top_k < scores.shape[-1]:
            candidates, tokens = scores.topk(self.top_k, dim=-1)  # sorted, most likely first
        elif self.top_p < 1:
            candidates, tokens = scores.sort(dim=-1, descending=True)
        else:
            candidates, tokens = scores, None
        probs = candidates.softmax(-1)
        if self.top_p < 1:
            # keep the smallest prefix whose mass reaches top_p: drop a token once the mass before it does
            probs = probs.masked_fill(probs.cumsum(-1) - probs >= self.top_p, 0.0)
        choice = torch.multinomial(probs, 1)  # renormalises what is left
        return choice if tokens is None else tokens.gather(-1, choice)

    def _record(self, logits: torch.Tensor, chosen: torch.Tensor) -> None:
        if self.logps is None:
            self.logps = torch.zeros(logits.shape[0], dtype=torch.float64, device=logits.device)
            self._finished = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
        token_logps = (logits.gather(-1, chosen) - logits.logsumexp(-1, keepdim=True)).squeeze(-1)
        self.logps += token_logps.double().masked_fill(self._finished, 0.0)  # nothing after a row's end of turn
        self._finished |= torch.isin(chosen.squeeze(-1), self._stop_ids.to(chosen.device))


def _read_progress(path: str | Path) -> dict[int, Generated]:
    """Rows of a progress file; a torn last line (killed mid-write) is ignored and regenerated."""
    done: dict[int, Generated] = {}
    path = Path(path)
    if not path.exists():
        return done
    text = path.read_text()
    if text and not text.endswith("\n"):  # drop the torn tail so appended rows start on a fresh line
        text = text[: text.rfind("\n") + 1]
        path.write_text(text)
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        index = row.pop("index")
        done[index] = Generated(**row)
    return done
