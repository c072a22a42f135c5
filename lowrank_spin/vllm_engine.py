"""The optional vLLM engine (CUDA): vLLM serving the base with the opponent's LoRA adapter.

`generation.make_engine` imports this module only when `data.sampling.engine` is `vllm`, and vllm
itself is imported only when the engine is made. This module sits below `generation` (which picks it),
so it does not import `generation`: `make_engine` hands it `respond`, which turns a response's drawn
tokens and their log-prob into a `generation.Generated`, and the engine has `generation.Engine`'s shape
(`name`, `generate`, `session`).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable
from pathlib import Path

import torch

from lowrank_spin.settings import SamplingSettings


class VLLMEngine:
    """vLLM serving the base with the active peft adapter of `model` as a LoRA.

    The adapter (the opponent's, at this iteration) is saved to `adapter_dir` once per call and sent with
    every request as a `LoRARequest` under a new id, so vLLM loads this iteration's weights, not a cached
    older one; with adapters disabled (the opponent of iteration 0 without an initial adapter) the bare
    base answers. One engine per process, on this rank's GPU: under DDP each rank serves its own units
    (vLLM's `external_launcher` backend, as TRL's colocated mode). Each request is seeded from the unit's
    seed and its place in the unit, so a unit is reproducible; vLLM returns the log-prob of each drawn
    token before temperature/top-k/top-p (its default `raw_logprobs`): the temperature-1 log-prob the HF
    engine records. The model's shipped generation_config is ignored (`generation_config="vllm"`), as in
    the HF engine.
    """

    name = "vllm"
    _ids = itertools.count(1)

    def __init__(
        self,
        model: torch.nn.Module,
        sampling: SamplingSettings,
        stop_ids: list[int],
        adapter_dir: Path | None,
        respond: Callable[[list[int], float], object],
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
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.llm = _vllm_llm(
            inner.config._name_or_path,
            str(inner.dtype).removeprefix("torch."),
            max_lora_rank=_lora_rank(model),
            gpu_memory_utilization=sampling.vllm_gpu_memory_utilization,
        )
        folder = save_active_adapter(model, adapter_dir)
        lora_id = next(self._ids)
        self.lora_request = None if folder is None else LoRARequest(f"adapter_{lora_id}", lora_id, str(folder))

    def generate(self, prompts: list[list[int]], seed: int, rows: int) -> list:
        """One `generation.Generated` per prompt (`respond`'s), in order; vLLM batches them itself."""
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
        results = []
        for output in outputs:
            completion = output.outputs[0]
            tokens = list(completion.token_ids)
            logp = sum(step[token].logprob for step, token in zip(completion.logprobs or [], tokens))
            results.append(self.respond(tokens, float(logp)))
        return results

    def session(self):
        return contextlib.nullcontext()


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
