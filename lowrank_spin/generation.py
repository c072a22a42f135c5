"""Batched synthetic-response generation behind one small interface (`Engine`), no_grad, eval mode.

The prompts are sorted by length and cut into flush units (`sampling.prompts_per_flush`, default one
batch). Each unit is seeded from (seed, unit index) and the units are fixed by the length order, so a
resumed generation equals an uninterrupted one; each unit is appended to a jsonl progress file and
flushed, so a run killed mid-generation loses at most one unit; a SIGTERM stops a batch at its next
token (`UntilSigterm`) and the run before the next unit. Under DDP each rank generates its share
of the units. The engines (`sampling.engine`):

- `HFEngine` (default): transformers' `generate`, left-padded, per batch, drawing with our `Sampler`.
- `vllm_engine.VLLMEngine` (optional, CUDA): vLLM serving the policy's own base (nf4 for a 4-bit one)
  with the opponent's LoRA adapter, saved per call, awake only during the call; its responses carry no
  log-prob (the training model scores them). Imported only when named.

On CUDA out of memory a unit is retried with half the rows at a time, with a warning.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from lowrank_spin import models
from lowrank_spin.faults import safe_point, stop_requested
from lowrank_spin.memory import halved_after_out_of_memory, release_freed_memory
from lowrank_spin.settings import SamplingSettings
from lowrank_spin.templates import end_of_turn_ids

log = logging.getLogger(__name__)
OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)  # torch < 2.5: cuda only


@dataclass
class Generated:
    text: str  # decoded without the end-of-turn token
    num_tokens: int  # new tokens before the end of turn
    finished: bool  # False when max_new_tokens was hit before an end-of-turn token (`end_of_turn_ids`)
    # The sampled tokens, closed with the end-of-turn token drawn when finished: what training scores
    # (re-tokenising `text` need not give them back). None in progress files written before they were kept.
    token_ids: list[int] | None = None
    # log p(token_ids | prompt) under the generating model at temperature 1, summed over the tokens
    # (None from the vllm engine: the training model scores its responses)
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
    """Generate one response per prompt (the most likely of `sampling.best_of` draws); returns them in
    prompt order, plus timing statistics (`seconds`, `new_tokens`: every draw's, `tokens_per_second`,
    `batches`: the flush units generated here, `engine`).

    `sampling` says how (`Sampler`; temperature 0 is greedy), with which engine (`make_engine`) and how
    many prompts go in a batch and in a flush unit. A response ends at the first of
    `end_of_turn_ids(tokenizer, model's generation_config)` it draws. `shard=(rank, world_size)` generates
    only the units u with u % world_size == rank (None for the other prompts): units and their seeds are
    the same for any world size, so the shards gathered equal a single-process generation.

    Under DeepSpeed ZeRO-3 every forward gathers each layer's weights from all ranks, so all ranks
    must run the same forwards: there every rank generates every unit with HF `generate` (same seeds,
    same answers) and `synced_gpus`, and `shard` is ignored.
    """
    zero3 = models.zero3_partitioned(model)
    rank, world_size = (0, 1) if zero3 else shard
    done = _read_progress(progress_path) if progress_path else {}
    order = sorted(range(len(prompt_ids)), key=lambda i: (len(prompt_ids[i]), i))
    size = sampling.prompts_per_flush or sampling.batch_size
    units = [order[i : i + size] for i in range(0, len(order), size)]
    mine = [(u, unit) for u, unit in enumerate(units) if u % world_size == rank]
    pending = [(u, unit) for u, unit in mine if not all(i in done for i in unit)]
    engine = make_engine(
        model,
        tokenizer,
        sampling,
        zero3=zero3,
        adapter_dir=Path(progress_path).with_suffix(".adapter") if progress_path else None,
    )

    was_training = model.training
    model.eval()
    new_tokens, start = 0, time.perf_counter()
    rows = sampling.batch_size  # halved for the rest of the run on CUDA out of memory
    log_file = open(progress_path, "a") if progress_path else None
    try:
        with engine.session():
            total = sum(len(unit) for _, unit in mine)
            bar = tqdm(
                total=total,
                initial=total - sum(len(unit) for _, unit in pending),
                desc=desc,
                unit="prompt",
                disable=shard[0] > 0,
            )
            for unit_index, unit in pending:
                outputs, rows, drawn = _generate_unit(
                    engine, [prompt_ids[i] for i in unit], seed * 1_000_003 + unit_index, rows, sampling.best_of
                )
                new_tokens += drawn
                if stop_requested():  # SIGTERM during the unit: it may have been cut short (`UntilSigterm`)
                    safe_point("generation_batch" if log_file else "unsaved_generation_batch")
                for i, generated in zip(unit, outputs):
                    done[i] = generated
                    if log_file:
                        log_file.write(json.dumps({"index": i, **asdict(generated)}) + "\n")
                if log_file:
                    log_file.flush()
                    os.fsync(log_file.fileno())
                bar.update(len(unit))
                # a stop here loses nothing: the unit is on disk (without a progress file: cheap to redo)
                safe_point("generation_batch" if log_file else "unsaved_generation_batch")
            bar.close()
    finally:
        if log_file:
            log_file.close()
        model.train(was_training)
        release_freed_memory()  # the KV caches and logits of every batch
    seconds = time.perf_counter() - start
    stats = {
        "seconds": seconds,
        "new_tokens": new_tokens,
        "tokens_per_second": new_tokens / max(seconds, 1e-9),
        "batches": len(pending),
        "engine": engine.name,
    }
    return [done.get(i) for i in range(len(prompt_ids))], stats


def _generate_unit(
    engine: Engine, prompts: list[list[int]], seed: int, rows: int, best_of: int = 1
) -> tuple[list[Generated], int, int]:
    """One flush unit, seeded by `seed` alone, `rows` sequences at a time: `best_of` draws per prompt,
    of which the one with the highest log-prob per token is kept (`most_likely`). On CUDA out of memory
    the unit is generated again from its seed with half the rows. Returns the responses, the rows that
    fit and the new tokens drawn (every draw's)."""
    while True:
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                drawn = engine.generate([p for p in prompts for _ in range(best_of)], seed, rows)
            kept = [most_likely(drawn[i : i + best_of]) for i in range(0, len(drawn), best_of)]
            return kept, rows, sum(g.num_tokens for g in drawn)
        except OUT_OF_MEMORY:
            if rows == 1:
                raise
            rows = halved_after_out_of_memory(rows, log, "generating", "data.sampling.batch_size")


def most_likely(draws: list[Generated]) -> Generated:
    """Of one prompt's draws, the one the generating model finds most likely per token (the first of
    equals): its answer rather than a sampling accident, a harder negative for SPIN (`sampling.best_of`)."""
    if len(draws) == 1:
        return draws[0]
    if any(g.logp is None for g in draws):
        raise ValueError("best_of needs each draw's log-prob, and this engine records none")
    return max(draws, key=lambda g: g.logp / max(len(g.token_ids or ()), 1))


class Engine:
    """What the driver asks of a generation engine: one flush unit at a time.

    `generate(prompts, seed, rows)` returns one `Generated` per prompt, in order, drawing with torch's
    global RNG (seeded by the driver from `seed`, which an engine with its own RNG uses instead) and
    holding at most `rows` sequences in memory at once. `session()` wraps a whole call of
    `generate_responses` (e.g. the model's generation_config set aside).
    """

    name = "engine"

    def generate(self, prompts: list[list[int]], seed: int, rows: int) -> list[Generated]:
        raise NotImplementedError

    @contextlib.contextmanager
    def session(self):
        yield


def make_engine(
    model: torch.nn.Module,
    tokenizer,
    sampling: SamplingSettings,
    *,
    zero3: bool = False,
    adapter_dir: Path | None = None,
) -> Engine:
    """The engine `sampling.engine` names over `model` (`adapter_dir`: where vLLM's adapter is saved)."""
    stop_ids = end_of_turn_ids(tokenizer, _inner_model(model).generation_config)
    if sampling.engine == "vllm":
        from lowrank_spin.vllm_engine import VLLMEngine  # optional (CUDA): imported only when named

        # it sits below this module, so it is handed how drawn tokens become a `Generated`
        respond = functools.partial(_generated, tokenizer, set(stop_ids))
        return VLLMEngine(model, sampling, stop_ids, adapter_dir, respond)
    return HFEngine(model, tokenizer, sampling, stop_ids, synced_gpus=zero3)


class HFEngine(Engine):
    """transformers' `generate`, `rows` left-padded prompts at a time, with a dynamic KV cache."""

    name = "hf"

    def __init__(self, model, tokenizer, sampling: SamplingSettings, stop_ids: list[int], synced_gpus: bool = False):
        self.model, self.tokenizer, self.sampling = model, tokenizer, sampling
        self.stop_ids, self.synced_gpus = stop_ids, synced_gpus

    def generate(self, prompts: list[list[int]], seed: int, rows: int) -> list[Generated]:
        return [
            generated
            for start in range(0, len(prompts), rows)
            for generated in _generate_batch(
                self.model,
                self.tokenizer,
                prompts[start : start + rows],
                self.sampling,
                self.stop_ids,
                self.synced_gpus,
            )
        ]

    def session(self):
        return _without_model_logits_processors(self.model)


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
        stopping_criteria=StoppingCriteriaList([UntilSigterm()]),
    )
    logps = sampler.logps.tolist() if sampler.logps is not None else [0.0] * len(prompts)  # None: no step ran
    stops = set(stop_ids)
    results = []
    for row, logp in zip(output[:, width:].tolist(), logps):  # a finished row is padded after its end of turn
        end = next((i + 1 for i, token in enumerate(row) if token in stops), len(row))
        results.append(_generated(tokenizer, stops, row[:end], logp))
    return results


class UntilSigterm(StoppingCriteria):
    """Ends every row of a `generate` call at the next token once SIGTERM has arrived (faults.py): a batch
    of long answers can take minutes, and a preempted machine gives seconds. The driver drops that batch."""

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), stop_requested(), dtype=torch.bool, device=input_ids.device)


def _generated(tokenizer, stops: set[int], tokens: list[int], logp: float | None) -> Generated:
    """A response from its drawn tokens (the end-of-turn token last when it finished) and their log-prob
    under the generating model (None: not recorded, to be scored)."""
    finished = bool(tokens) and tokens[-1] in stops
    text_tokens = tokens[:-1] if finished else tokens
    return Generated(tokenizer.decode(text_tokens, skip_special_tokens=True), len(text_tokens), finished, tokens, logp)


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

    Why not `generate(output_scores=True, return_dict_in_generate=True)` + `compute_transition_scores`
    (tests/test_generation.py measures each point on the tiny model):
    - with this sampler the scores `generate` returns are its output (0 at the drawn token, -inf
      elsewhere), so their log-softmax is 0 for every token;
    - with generate()'s own sampling instead, the drawn tokens change (for the same seed whenever top-k
      cuts anything) and the scores are the processed ones (divided by the temperature, -inf outside the
      top-k), so they give log-probs of that narrowed distribution, not at temperature 1 (e.g. -63.7 vs
      -85.8 nats for one response at temperature 1, top_k 50);
    - `output_logits=True` (the raw logits, the very tensor this sampler gets) with
      `normalize_logits=True` gives temperature-1 log-probs within 1e-6 per token (3e-6 per response),
      but not bit-identical: `log_softmax` rounds differently from `x - logsumexp` (about half the
      tokens differ in the last bit), so stored log-probs would change. It also keeps every step's
      [rows, vocab] logits until generate() returns (16 x 49k x 128 steps x 4 bytes = 400 MB for
      SmolLM2, 1.2 GB at Qwen2.5's 152k vocab) where the sum below keeps one float per row, and it
      still needs the mask after each row's end of turn that `_record` applies.
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


def _inner_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a peft wrapper (whose generation_config peft copies from it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


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
        log.warning("%s: its last line was cut off (a kill mid-write): dropped, that prompt is generated again", path)
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        index = row.pop("index")
        done[index] = Generated(**row)
    return done
