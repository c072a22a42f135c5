"""The optional vLLM engine (CUDA): vLLM serving the policy's own base with the opponent's LoRA adapter.

`generation.make_engine` imports this module only when `data.sampling.engine` is `vllm`, and vllm
itself is imported only when the engine is made. This module sits below `generation` (which picks it),
so it does not import `generation`: `make_engine` hands it `respond`, which turns a response's drawn
tokens into a `generation.Generated`, and the engine has `generation.Engine`'s shape (`name`,
`generate`, `session`).

What it serves is the model that trains, as far as vLLM can:
- the same base: a 4-bit base goes to vLLM as `quantization="bitsandbytes"`, which quantizes the same
  checkpoint in flight to nf4 with double quantization, as our bitsandbytes base is; a
  plain base in the policy's dtype. Never a full-precision copy next to an nf4 policy.
- the opponent's adapter, saved at each call and sent as a `LoRARequest` under a new id.
- its log-probs are not used: vLLM's kernels (and its own nf4 layers) are another implementation of
  the model, and no measured check has shown that its log-probs of the drawn tokens agree with the
  training model's. The responses carry no log-prob (`Generated.logp` None), so the opponent scores
  them with the training model (`opponent.Opponent.score_for_training`), as it scores the real ones:
  `model.opponent_logps_from_generation` is off for this engine (the opponent says so in a warning).
  `scripts/vllm_check.py` measures the gap.
- its GPU memory only while it generates: built with sleep mode, it is woken for each call of
  `generation.generate_responses` and put to sleep after it (level 1: the weights go to CPU memory,
  the KV cache is freed), so training and scoring get the memory back.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from lowrank_spin.settings import SamplingSettings


class VLLMEngine:
    """vLLM serving the base of `model` with its active peft adapter as a LoRA.

    The adapter (the opponent's, at this iteration) is saved to `adapter_dir` once per call and sent with
    every request as a `LoRARequest` under a new id, so vLLM loads this iteration's weights, not a cached
    older one; with adapters disabled (the opponent of iteration 0 without an initial adapter) the bare
    base answers. One engine per process, on this rank's GPU: under DDP each rank serves its own units
    (vLLM's `external_launcher` backend, as TRL's colocated mode). Each request is seeded from the unit's
    seed and its place in the unit, so a unit is reproducible. The model's shipped generation_config is
    ignored (`generation_config="vllm"`), as in the HF engine.
    """

    name = "vllm"
    _ids = itertools.count(1)

    def __init__(
        self,
        model: torch.nn.Module,
        sampling: SamplingSettings,
        stop_ids: list[int],
        adapter_dir: Path | None,
        respond: Callable[[list[int], float | None], object],
    ):
        try:
            from vllm import SamplingParams
            from vllm.lora.request import LoRARequest
        except ImportError as err:
            raise ImportError(
                "data.sampling.engine: vllm needs the vllm package (pip install 'lowrank_spin[vllm]'); use hf"
            ) from err
        self.sampling, self.stop_ids, self.respond = sampling, stop_ids, respond
        self._sampling_params = SamplingParams
        self.served = _served(
            served_model(model), max_lora_rank=_lora_rank(model), memory=sampling.vllm_gpu_memory_utilization
        )
        self.llm = self.served.llm
        folder = save_active_adapter(model, adapter_dir)
        lora_id = next(self._ids)
        self.lora_request = None if folder is None else LoRARequest(f"adapter_{lora_id}", lora_id, str(folder))

    def generate(self, prompts: list[list[int]], seed: int, rows: int) -> list:
        """One `generation.Generated` per prompt (`respond`'s), in order, without a log-prob (the training
        model scores the responses); vLLM batches them itself."""
        return [self.respond(tokens, None) for tokens, _ in self.draw(prompts, seed)]

    def draw(self, prompts: list[list[int]], seed: int) -> list[tuple[list[int], list[float]]]:
        """Per prompt, the drawn tokens and vLLM's log-prob of each: its raw (temperature-1) log-probs,
        before temperature/top-k/top-p (vLLM's default `logprobs_mode`). Only `scripts/vllm_check.py`
        reads them, to measure them against the training model's."""
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
        drawn = []
        for output in outputs:
            completion = output.outputs[0]
            tokens = list(completion.token_ids)
            drawn.append((tokens, [step[token].logprob for step, token in zip(completion.logprobs or [], tokens)]))
        return drawn

    @contextlib.contextmanager
    def session(self):
        """vLLM awake for the block (one call of `generate_responses`), asleep after it."""
        self.served.wake_up()
        try:
            yield
        finally:
            self.served.sleep()


def served_model(model: torch.nn.Module) -> dict:
    """What vLLM serves for `model` (under its peft wrapper): `model`, `dtype` and, for a bitsandbytes
    4-bit base, `quantization="bitsandbytes"` (vLLM's in-flight nf4 of the same checkpoint), so the
    responses come from the model that trains, not from a full-precision copy of its base."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    args = {"model": inner.config._name_or_path, "dtype": str(inner.dtype).removeprefix("torch.")}
    if getattr(inner, "is_loaded_in_4bit", False):  # `inner.dtype` is then its compute dtype
        args["quantization"] = "bitsandbytes"
    return args


@dataclass
class _Served:
    """One `vllm.LLM` and whether it sleeps: `wake_up` and `sleep` each act only from the other state."""

    llm: object
    asleep: bool = False

    def wake_up(self) -> None:
        if self.asleep:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # what training freed, back to the device before vLLM takes it
            self.llm.wake_up()
            self.asleep = False

    def sleep(self) -> None:
        if not self.asleep:
            self.llm.sleep(level=1)  # weights to CPU memory (kept for the next wake-up), KV cache freed
            self.asleep = True


_VLLM: dict[tuple, _Served] = {}


def _served(served: dict, *, max_lora_rank: int, memory: float) -> _Served:
    """One `vllm.LLM` per process and base (building one takes a minute; vLLM's sleep mode allows one
    per process), with LoRA and sleep mode enabled; built awake."""
    key = (*sorted(served.items()), max_lora_rank)
    if key not in _VLLM:
        from vllm import LLM

        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        llm = LLM(
            **served,
            enable_lora=True,
            max_lora_rank=max_lora_rank,
            max_loras=1,
            gpu_memory_utilization=memory,
            enable_sleep_mode=True,  # its memory is released while the policy trains (`VLLMEngine.session`)
            generation_config="vllm",  # not the shipped sampling defaults (e.g. a repetition penalty)
            # under DDP: one engine per rank on that rank's GPU, no worker processes of its own
            **({"distributed_executor_backend": "external_launcher"} if distributed else {}),
        )
        _VLLM[key] = _Served(llm)
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
