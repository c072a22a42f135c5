"""The opponent θ0 + Δθt behind one narrow interface: generate responses, score them, snapshot.

The LightningModule builds one `Opponent` over its model and hands it to the DataModule once; the
DataModule generates and scores through it and never sees the policy, the module or the trainer's
model. The adapter toggling lives here: the opponent is the same frozen base under the `opponent`
LoRA adapter (or with adapters off while Δθ0 = 0), never a second copy of the model.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

import torch

from lowrank_spin import batching, models
from lowrank_spin.generation import OUT_OF_MEMORY, Generated, generate_responses
from lowrank_spin.memory import halved_after_out_of_memory
from lowrank_spin.settings import ObjectiveSettings, SamplingSettings

log = logging.getLogger(__name__)


class Opponent:
    """The previous iteration's policy, as the data layer sees it.

    Args:
        model: the peft model holding the `policy` and `opponent` adapters.
        tokenizer: its tokenizer (the DataModule renders prompts with it).
        objective: what the training batches of each iteration hold (`objective.responses_at`) and whether
            the opponent's log-probs are needed (SPIN's reference; T-SPIN and SFT need none).
        share_prompt: batch several responses of a prompt in one row (`batching.SharedPromptCollator`).
        precompute_logps: score with the opponent once per iteration, right after generation; off, the
            module scores on the fly every step and `score` does nothing.
        logps_from_generation: take the opponent's log-probs of its generated responses from the
            generation pass (same weights, eval mode, the drawn tokens) instead of a scoring forward.
            HF generation only: the vllm engine records none (another implementation of the model),
            so its responses are scored by this model, with a warning saying so.
        starts_as_base: no initial adapter, so the opponent of iteration 0 is the bare base (Δθ0 = 0).
        elapsed_seconds: the run's wall clock, shared with the module's step logs.
    """

    def __init__(
        self,
        model: models.PeftModel,
        tokenizer,
        objective: ObjectiveSettings,
        *,
        share_prompt: bool,
        precompute_logps: bool,
        logps_from_generation: bool,
        starts_as_base: bool,
        elapsed_seconds: Callable[[], float],
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.objective = objective
        self.share_prompt = share_prompt
        self.precompute_logps = precompute_logps
        self.logps_from_generation = logps_from_generation
        self.starts_as_base = starts_as_base
        self.elapsed_seconds = elapsed_seconds
        self._warned_vllm_scores = False

    # Every call that depends on the iteration takes it: the opponent of iteration t is the policy at the
    # end of iteration t-1 (the last `snapshot`), the bare base at t = 0 without an initial adapter.

    def is_base(self, iteration: int) -> bool:
        """At iteration 0 without an initial adapter Δθ0 = 0: the opponent is the base, adapters off."""
        return iteration == 0 and self.starts_as_base

    def responses(self, iteration: int) -> tuple[str, ...]:
        """What a training example of `iteration` holds: ("real",) for SFT, else the opponent's too."""
        return self.objective.responses_at(iteration)

    def collator(self, responses: tuple[str, ...]) -> batching.Collator | batching.SharedPromptCollator:
        """The batch layout for `responses` (the prompt shared where the model's attention allows it)."""
        return batching.collator(self.tokenizer.pad_token_id, responses, self.share_prompt)

    # ---- the three things the DataModule asks for ----------------------------------------------------

    def generate(
        self,
        prompt_ids: list[list[int]],
        sampling: SamplingSettings,
        iteration: int,
        *,
        seed: int,
        progress_path: Path,
        desc: str,
        shard: tuple[int, int],
    ) -> tuple[list[Generated | None], dict[str, float]]:
        """One response per prompt from the opponent, in prompt order, and the timing statistics
        (`generation.generate_responses`)."""
        if sampling.engine == "vllm" and self.logps_from_generation and not self._warned_vllm_scores:
            log.warning(
                "model.opponent_logps_from_generation is off with data.sampling.engine vllm: the opponent's "
                "log-probs of its generated responses come from a scoring forward of the training model, as "
                "the real ones do, not from vLLM, whose kernels (and nf4 layers) are another implementation "
                "of the model, not measured to agree with it (scripts/vllm_check.py measures the gap)"
            )
            self._warned_vllm_scores = True
        with self.active(iteration):
            return generate_responses(
                self.model,
                self.tokenizer,
                prompt_ids,
                sampling,
                seed=seed,
                progress_path=progress_path,
                desc=desc,
                shard=shard,
            )

    def score_for_training(
        self, examples: list[dict], generated: list[Generated], iteration: int, batch_size: int
    ) -> None:
        """Put in `examples` what the objective of `iteration` needs from its opponent: SPIN's reference
        log-probs (`opponent_real_logps`, `opponent_generated_logps`); nothing for sft and tspin. Returns None."""
        if self.objective.name_at(iteration) != "spin":
            return
        responses = ("real", "generated")
        if self.logps_from_generation and all(g.logp is not None for g in generated):
            # the opponent drew these tokens in eval mode: its log-probs of them came with them
            for example, gen in zip(examples, generated):
                average = self.objective.length_normalize
                example["opponent_generated_logps"] = gen.logp / max(len(gen.token_ids), 1) if average else gen.logp
            responses = ("real",)
        self.score(examples, responses, iteration, batch_size)

    def score(self, examples: list[dict], responses: tuple[str, ...], iteration: int, batch_size: int) -> None:
        """Opponent (of `iteration`) log-probs of the `responses` of `examples`, in place (`opponent_<name>_logps`);
        nothing when they are computed on the fly instead. On CUDA out of memory the batch is halved
        for the rest of the pass, with a warning. Returns None."""
        if not self.precompute_logps:
            return
        # scoring order is free: similar lengths together waste the least padding
        by_length = sorted(
            examples, key=lambda e: len(e["prompt_ids"]) + sum(len(e[f"{name}_ids"]) for name in responses)
        )
        collate = self.collator(responses)
        start = 0
        while start < len(by_length):
            chunk = by_length[start : start + batch_size]
            try:
                (_, batch), *_ = batching.batches(chunk, collate, len(chunk), self.device)
                logps = self.logps(batch, iteration, num_responses=len(responses)).view(len(responses), len(chunk))
            except OUT_OF_MEMORY:
                if batch_size == 1:
                    raise
                batch_size = halved_after_out_of_memory(batch_size, log, "scoring with the opponent", "data.batch_size")
                continue
            for name, values in zip(responses, logps.tolist()):
                for example, value in zip(chunk, values):
                    example[f"opponent_{name}_logps"] = value
            start += len(chunk)

    # ---- for the module and the boundary callback ----------------------------------------------------

    @torch.no_grad()
    def logps(self, batch: dict, iteration: int, num_responses: int = 2) -> torch.Tensor:
        """Log-probs of the first `num_responses` responses of `batch` ([real; generated] by default)
        under the opponent of `iteration`, θ0 + Δθt (eval mode); the model is left as it was."""
        was_training = self.model.training
        self.model.eval()
        try:
            with self.active(iteration):
                return batching.response_logps(
                    self.model, batch, average=self.objective.length_normalize, num_responses=num_responses
                )
        finally:
            self.model.train(was_training)

    def snapshot(self) -> None:
        """θ0 + Δθt: the policy at the end of iteration t becomes the opponent of iteration t+1. Returns None."""
        models.snapshot_opponent(self.model)

    @contextlib.contextmanager
    def active(self, iteration: int):
        """The model as the opponent of `iteration`, θ0 + Δθt, for the block; the policy again after it."""
        with models.opponent(self.model, adapters_disabled=self.is_base(iteration)):
            yield self.model

    @property
    def device(self) -> torch.device:
        """Where the model's weights are (batches go there)."""
        return next(self.model.parameters()).device
