"""Batched synthetic-response generation behind one small interface (`Engine`), no_grad, eval mode.

The prompts are sorted by length and cut into flush units (`sampling.prompts_per_flush`, default one
batch). Each unit is seeded from (seed, unit index) and the units are fixed by the length order, so a
resumed generation equals an uninterrupted one; each unit is appended to a jsonl progress file and
flushed, so a run killed mid-generation loses at most one unit. Under DDP each rank generates its share
of the units. The engines (`sampling.engine`):

- `HFEngine` (default): transformers' `generate`, left-padded, per batch; also the fallback wherever
  `static` does not apply (DeepSpeed ZeRO-3, sliding-window or non-attention caches, flash_attention_2).
- `StaticEngine`: our own decode loop over a pre-allocated KV cache of `batch_size` rows. A row whose
  response ends takes the next waiting prompt of its unit (its prefill written into the row), so the
  batch stays full instead of padding finished rows to the longest; optionally the decode step is
  `torch.compile`d. Measured on CPU at batch 16 (benchmarks/RESULTS.md): 0.94-1.06x HF `generate`,
  1.05x with refill and compile in bf16, slower compiled in float32. A 135M model's decode step on CPU
  is bound by per-operator overhead, not by the cache or padding, so it stays an option.
- `VLLMEngine` (optional, CUDA): vLLM serving the base with the opponent's LoRA adapter, saved per call.

On CUDA out of memory a unit is retried with half the rows at a time, with a warning.
"""

from __future__ import annotations

import collections
import contextlib
import inspect
import itertools
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList
from transformers.cache_utils import Cache

from lowrank_spin import models
from lowrank_spin.faults import safe_point
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
    """Generate one response per prompt; returns them in prompt order, plus timing statistics
    (`seconds`, `new_tokens`, `tokens_per_second`, `batches`: the flush units generated here, `engine`).

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
        longest_prompt=max((len(prompt_ids[i]) for _, unit in pending for i in unit), default=1),
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
                outputs, rows = _generate_unit(
                    engine, [prompt_ids[i] for i in unit], seed * 1_000_003 + unit_index, rows
                )
                for i, generated in zip(unit, outputs):
                    done[i] = generated
                    new_tokens += generated.num_tokens
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


def _generate_unit(engine: Engine, prompts: list[list[int]], seed: int, rows: int) -> tuple[list[Generated], int]:
    """One flush unit, seeded by `seed` alone, `rows` prompts at a time; on CUDA out of memory the unit
    is generated again from its seed with half the rows. Returns the responses and the rows that fit."""
    while True:
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return engine.generate(prompts, seed, rows), rows
        except OUT_OF_MEMORY:
            if rows == 1:
                raise
            rows = halved_after_out_of_memory(rows, log, "generating", "data.sampling.batch_size")


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
    longest_prompt: int = 1,
    adapter_dir: Path | None = None,
) -> Engine:
    """The engine `sampling.engine` names over `model`; `static` falls back to `hf`, with an info line
    naming why, where it does not apply (`static_unsupported`). Returns the engine."""
    stop_ids = end_of_turn_ids(tokenizer, _inner_model(model).generation_config)
    if sampling.engine == "vllm":
        return VLLMEngine(model, tokenizer, sampling, stop_ids, adapter_dir)
    if sampling.engine == "static":
        reason = "DeepSpeed ZeRO-3 needs every rank to run the same forwards" if zero3 else None
        reason = reason or static_unsupported(model, longest_prompt + sampling.max_new_tokens)
        if reason is None:
            return StaticEngine(model, tokenizer, sampling, stop_ids, longest_prompt)
        log.info("data.sampling.engine static: %s; generating with hf instead", reason)
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


class StaticEngine(Engine):
    """Our decode loop over a KV cache allocated once per call: `rows` slots of `length` positions.

    A unit's prompts wait in length order; whenever a quarter of the rows (or all) are free, the next
    waiting prompts are prefilled together, left-padded, and written into the free rows; every step then
    decodes one token for all rows, each at its own position. A row that ends (end of turn or
    `max_new_tokens`) is free at once, so rows are not kept stepping until the longest one of a batch
    ends. Sampling, stop ids and log-probs are the HF engine's (`Sampler`). The row layout is HF's own
    (left padding, positions counted from the first real token), so greedy answers equal `generate`'s.
    """

    name = "static"

    def __init__(self, model, tokenizer, sampling: SamplingSettings, stop_ids: list[int], longest_prompt: int):
        self.model, self.tokenizer, self.sampling = model, tokenizer, sampling
        self.stop_ids = stop_ids
        # one length for the whole call (a multiple of 64): the compiled step sees one shape
        self.length = -(-(longest_prompt + sampling.max_new_tokens) // 64) * 64
        self.additive_mask = _inner_model(model).config._attn_implementation == "eager"
        self.step = _compiled_decode_step() if sampling.compile else _decode_step

    def session(self):
        return _without_model_logits_processors(self.model)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], seed: int, rows: int) -> list[Generated]:
        rows = rows if self.sampling.compile else min(rows, len(prompts))  # compiled: one batch shape
        sampler = Sampler(self.sampling.temperature, self.sampling.top_k, self.sampling.top_p)
        device = next(self.model.parameters()).device
        cache = SlotCache(rows, self.length, device)
        stops = set(self.stop_ids)
        pad_id = self.tokenizer.pad_token_id
        waiting = collections.deque(range(len(prompts)))
        slots: list[_Row | None] = [None] * rows
        results: list[Generated | None] = [None] * len(prompts)
        refill_at = max(1, rows // 4)

        def take(row: int, token: int, logp: float) -> None:
            state = slots[row]
            state.tokens.append(token)
            state.logp += logp
            if token in stops or len(state.tokens) == self.sampling.max_new_tokens:
                results[state.index] = _generated(self.tokenizer, state.tokens, state.logp, stops)
                slots[row] = None

        while waiting or any(slots):
            free = [row for row, state in enumerate(slots) if state is None]
            if waiting and (len(free) >= refill_at or len(free) == rows):
                filled = free[: len(waiting)]
                batch = [waiting.popleft() for _ in filled]
                logits = self._prefill(cache, filled, [prompts[i] for i in batch], pad_id, device)
                chosen, logps = _choose(sampler, logits)
                for row, i, token, logp in zip(filled, batch, chosen, logps):
                    slots[row] = _Row(i)
                    take(row, token, logp)
                continue
            active = [row for row, state in enumerate(slots) if state is not None]
            tokens = torch.full((rows, 1), pad_id, dtype=torch.long)
            for row in active:
                tokens[row, 0] = slots[row].tokens[-1]
            write = cache.advance(active)
            logits = self.step(self.model, cache, tokens.to(device), *cache.decode_inputs(write, self.additive_mask))
            chosen, logps = _choose(sampler, logits)
            for row in active:
                take(row, chosen[row], logps[row])
        return results

    def _prefill(
        self, cache: SlotCache, rows: list[int], prompts: list[list[int]], pad_id: int, device
    ) -> torch.Tensor:
        """Prompts into the cache rows `rows`, left-padded as HF pads them; the next-token logits [k, vocab]."""
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        starts = torch.tensor([width - len(p) for p in prompts])
        for k, ids in enumerate(prompts):
            input_ids[k, width - len(ids) :] = torch.tensor(ids)
        cache.start_prefill(rows, starts, width)
        positions = (torch.arange(width)[None, :] - starts[:, None]).clamp(min=0)
        ar = torch.arange(width)
        # causal, real tokens only; a padding query sees itself (a fully masked row would give NaN)
        allowed = (ar[None, None, :] <= ar[None, :, None]) & (ar[None, None, :] >= starts[:, None, None])
        allowed = (allowed | torch.eye(width, dtype=torch.bool))[:, None]
        try:
            out = self.model(
                input_ids=input_ids.to(device),
                position_ids=positions.to(device),
                attention_mask=_mask(allowed.to(device), self.additive_mask, cache.dtype_hint(self.model)),
                use_cache=True,
                logits_to_keep=1,
                **{_cache_keyword(self.model): cache},
            )
        finally:
            cache.end_prefill()
        return out.logits[:, -1]


@dataclass
class _Row:
    index: int  # of the prompt in the unit
    tokens: list[int] = field(default_factory=list)  # drawn so far
    logp: float = 0.0  # their log-prob at temperature 1


class SlotCache(Cache):
    """A KV cache of `rows` rows x `length` positions, allocated on first write, in which every row is
    at its own position: a prefill writes new prompts into some rows (and attends only to itself), a
    decode step writes each row's new key/value at that row's own next position (`advance`)."""

    def __init__(self, rows: int, length: int, device):
        super().__init__(layers=[])
        self.rows, self.length, self.device = rows, length, device
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.starts = torch.full((rows,), length - 1, dtype=torch.long)  # first real position per row
        self.next = torch.full((rows,), length - 1, dtype=torch.long)  # where the row's next token goes
        self._prefill: tuple[torch.Tensor, int] | None = None
        self.write_index = torch.zeros(rows, dtype=torch.long, device=device)

    # ---- what the driver calls ---------------------------------------------------------------------

    def start_prefill(self, rows: list[int], starts: torch.Tensor, width: int) -> None:
        """The next forward writes `width` positions of `rows`, whose real tokens begin at `starts`."""
        index = torch.tensor(rows, dtype=torch.long)
        self.starts[index], self.next[index] = starts, width
        self._prefill = (index.to(self.device), width)

    def end_prefill(self) -> None:
        self._prefill = None

    def advance(self, active: list[int]) -> torch.Tensor:
        """Where this step writes (each active row at its next position, idle rows at the last one, which
        a row overwrites before it ever attends to it); moves the active rows on. Returns the indices."""
        write = torch.full((self.rows,), self.length - 1, dtype=torch.long)
        if active:
            index = torch.tensor(active, dtype=torch.long)
            write[index] = self.next[index]
            self.next[index] += 1
        return write

    def decode_inputs(self, write: torch.Tensor, additive: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Position ids [rows, 1] and the attention mask [rows, 1, 1, length] of a decode step writing at `write`."""
        idle = write == self.length - 1
        starts = torch.where(idle, write, self.starts)
        ar = torch.arange(self.length)
        allowed = (ar[None, :] >= starts[:, None]) & (ar[None, :] <= write[:, None])
        self.write_index.copy_(write)
        positions = (write - starts)[:, None]
        dtype = self.keys[0].dtype if self.keys else torch.float32
        return positions.to(self.device), _mask(allowed[:, None, None].to(self.device), additive, dtype)

    def dtype_hint(self, model) -> torch.dtype:
        return self.keys[0].dtype if self.keys else next(model.parameters()).dtype

    # ---- what the attention layers call ------------------------------------------------------------

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if len(self.keys) <= layer_idx:
            rows, heads, _, dim = key_states.shape
            self.keys.append(key_states.new_zeros(self.rows, heads, self.length, dim))
            self.values.append(
                value_states.new_zeros(self.rows, value_states.shape[1], self.length, value_states.shape[-1])
            )
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if self._prefill is not None:
            rows, width = self._prefill
            keys[rows, :, :width] = key_states
            values[rows, :, :width] = value_states
            return key_states, value_states
        index = self.write_index.view(-1, 1, 1, 1)
        keys.scatter_(2, index.expand(-1, keys.shape[1], 1, keys.shape[-1]), key_states)
        values.scatter_(2, index.expand(-1, values.shape[1], 1, values.shape[-1]), value_states)
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions are given per row; nothing asks for one length

    def get_max_length(self) -> int:
        return self.length

    def __len__(self) -> int:
        return len(self.keys)


def _decode_step(model, cache: SlotCache, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor):
    """One token for every row: the next-token logits [rows, vocab]."""
    out = model(
        input_ids=tokens, position_ids=positions, attention_mask=mask, use_cache=True, **{_cache_keyword(model): cache}
    )
    return out.logits[:, -1]


_COMPILED = {}


def _compiled_decode_step():
    """`_decode_step` under torch.compile, made once per process (its graphs are reused across calls)."""
    if "step" not in _COMPILED:
        _COMPILED["step"] = torch.compile(_decode_step, dynamic=False)
    return _COMPILED["step"]


def _choose(sampler: Sampler, logits: torch.Tensor) -> tuple[list[int], list[float]]:
    """Draw each row's next token; returns the tokens and their log-probs at temperature 1."""
    logits = logits.float()
    chosen = sampler.choose(logits)
    logps = (logits.gather(-1, chosen) - logits.logsumexp(-1, keepdim=True)).squeeze(-1).double()
    return chosen.squeeze(-1).tolist(), logps.tolist()


def _mask(allowed: torch.Tensor, additive: bool, dtype: torch.dtype) -> torch.Tensor:
    """A boolean attention mask as sdpa takes it, or the additive float mask eager attention adds."""
    if not additive:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)


def _cache_keyword(model) -> str:
    """transformers 5 renamed `past_key_values` to `cache` (5.2x); the name this version takes."""
    inner = _inner_model(model)
    if "cache" not in _CACHE_KEYWORD:
        _CACHE_KEYWORD["cache"] = (
            "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"
        )
    return _CACHE_KEYWORD["cache"]


_CACHE_KEYWORD: dict[str, str] = {}


def static_unsupported(model: torch.nn.Module, length: int) -> str | None:
    """Why the `static` engine cannot run `model` (None when it can): it needs every layer to be full
    attention reading the whole cache (no sliding window shorter than `length`, no recurrent state)
    through sdpa or eager attention."""
    config = _inner_model(model).config.get_text_config(decoder=True)
    attention = getattr(config, "_attn_implementation", None)
    if attention not in ("sdpa", "eager"):
        return f"model.attn_implementation {attention} takes no per-row attention mask"
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    if layer_types != {"full_attention"}:
        return f"the model has {sorted(layer_types - {'full_attention'})} layers"
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) and window < length:
        return f"the model attends through a sliding window ({window} < {length} positions)"
    return None


def _generated(tokenizer, tokens: list[int], logp: float, stops: set[int]) -> Generated:
    """A response from its drawn tokens (the end-of-turn token last when it finished)."""
    finished = bool(tokens) and tokens[-1] in stops
    text_tokens = tokens[:-1] if finished else tokens
    return Generated(tokenizer.decode(text_tokens, skip_special_tokens=True), len(text_tokens), finished, tokens, logp)


class VLLMEngine(Engine):
    """vLLM (optional; CUDA) serving the base with the active peft adapter of `model` as a LoRA.

    The adapter (the opponent's, at this iteration) is saved to `adapter_dir` once per call and sent with
    every request as a `LoRARequest` under a new id, so vLLM loads this iteration's weights, not a cached
    older one; with adapters disabled (the opponent of iteration 0 without an initial adapter) the bare
    base answers. One engine per process, on this rank's GPU: under DDP each rank serves its own units
    (vLLM's `external_launcher` backend, as TRL's colocated mode). Each request is seeded from the unit's
    seed and its place in the unit, so a unit is reproducible; vLLM returns the log-prob of each drawn
    token before temperature/top-k/top-p (its default `raw_logprobs`): the temperature-1 log-prob the other
    engines record. The model's shipped generation_config is ignored (`generation_config="vllm"`), as in
    the other engines.
    """

    name = "vllm"
    _ids = itertools.count(1)

    def __init__(self, model, tokenizer, sampling: SamplingSettings, stop_ids: list[int], adapter_dir: Path | None):
        try:
            from vllm import SamplingParams
            from vllm.lora.request import LoRARequest
        except ImportError as err:
            raise ImportError(
                "data.sampling.engine: vllm needs the vllm package (pip install 'lowrank_spin[vllm]'); use static or hf"
            ) from err
        self.tokenizer, self.sampling, self.stop_ids = tokenizer, sampling, stop_ids
        self._sampling_params = SamplingParams
        inner = _inner_model(model)
        self.llm = _vllm_llm(
            inner.config._name_or_path,
            str(inner.dtype).removeprefix("torch."),
            max_lora_rank=_lora_rank(model),
            gpu_memory_utilization=sampling.vllm_gpu_memory_utilization,
        )
        folder = save_active_adapter(model, adapter_dir)
        lora_id = next(self._ids)
        self.lora_request = None if folder is None else LoRARequest(f"adapter_{lora_id}", lora_id, str(folder))

    def generate(self, prompts: list[list[int]], seed: int, rows: int) -> list[Generated]:
        top_k = self.sampling.top_k if self.sampling.top_k > 0 else -1  # vLLM: -1 = every token
        params = [
            self._sampling_params(
                temperature=self.sampling.temperature,
                top_k=top_k,
                top_p=self.sampling.top_p,
                max_tokens=self.sampling.max_new_tokens,
                stop_token_ids=list(self.stop_ids),
                logprobs=0,  # the drawn token's own log-prob only
                seed=seed + k,
            )
            for k in range(len(prompts))
        ]
        outputs = self.llm.generate(
            [{"prompt_token_ids": list(p)} for p in prompts], params, lora_request=self.lora_request, use_tqdm=False
        )
        stops = set(self.stop_ids)
        results = []
        for output in outputs:
            completion = output.outputs[0]
            tokens = list(completion.token_ids)
            logp = sum(step[token].logprob for step, token in zip(completion.logprobs or [], tokens))
            results.append(_generated(self.tokenizer, tokens, float(logp), stops))
        return results


_VLLM: dict[tuple, object] = {}


def _vllm_llm(base: str, dtype: str, *, max_lora_rank: int, gpu_memory_utilization: float):
    """One `vllm.LLM` per process and base (building one takes a minute), with LoRA enabled."""
    key = (base, dtype, max_lora_rank)
    if key not in _VLLM:
        from vllm import LLM

        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        _VLLM[key] = LLM(
            model=base,
            dtype=dtype,
            enable_lora=True,
            max_lora_rank=max_lora_rank,
            max_loras=1,
            gpu_memory_utilization=gpu_memory_utilization,
            generation_config="vllm",  # not the shipped sampling defaults (e.g. a repetition penalty)
            # under DDP: one engine per rank on that rank's GPU, no worker processes of its own
            **({"distributed_executor_backend": "external_launcher"} if distributed else {}),
        )
    return _VLLM[key]


def _lora_rank(model: torch.nn.Module) -> int:
    """The rank of the active adapter (vLLM rounds its `max_lora_rank` up to one it supports)."""
    config = getattr(model, "peft_config", {}).get(getattr(model, "active_adapter", None))
    rank = getattr(config, "r", 16)
    return next((r for r in (8, 16, 32, 64, 128, 256, 320, 512) if r >= rank), rank)


def save_active_adapter(model: torch.nn.Module, folder: Path | None) -> Path | None:
    """Save the active peft adapter of `model` (for vLLM) under `folder`; returns the adapter folder,
    or None when the adapters are disabled or there are none (the base alone answers)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if not hasattr(model, "peft_config"):
        return None
    if any(m.disable_adapters for m in model.modules() if isinstance(m, BaseTunerLayer)):
        return None
    if folder is None:
        import tempfile

        folder = Path(tempfile.mkdtemp(prefix="lowrank_spin_adapter_"))
    name = model.active_adapter
    model.save_pretrained(str(folder), selected_adapters=[name])
    # peft saves an adapter not named `default` in a subfolder of its name
    return folder if name == "default" else folder / name


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
        chosen = self.choose(logits)
        if self._stop_ids is not None:
            self._record(logits, chosen)
        return torch.full_like(logits, float("-inf")).scatter_(-1, chosen, 0.0)

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        """The next token of each row of float `logits` [rows, vocab], drawn as the class says: [rows, 1]."""
        return logits.argmax(-1, keepdim=True) if self.temperature == 0 else self._draw(logits / self.temperature)

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
        log.warning("%s: its last line was cut off (a kill mid-write): dropped, that prompt is generated again", path)
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        index = row.pop("index")
        done[index] = Generated(**row)
    return done
