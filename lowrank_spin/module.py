"""The LightningModule: a frozen (optionally 4-bit) base with LoRA policy/opponent adapters and the
sft / spin / tspin objectives. One training step runs one forward over the concatenated responses.
"""

from __future__ import annotations

import contextlib
import logging
import time
from functools import cached_property

import lightning as L
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from lowrank_spin import losses, models
from lowrank_spin.callbacks import IterationBoundaries
from lowrank_spin.data import Collator, SharedPromptCollator
from lowrank_spin.losses import IGNORE_INDEX
from lowrank_spin.validation import attention_implementation, validate_module_args

log = logging.getLogger(__name__)


class SelfPlayLoRA(L.LightningModule):
    """Low-rank self-play fine-tuning.

    Args:
        model_name_or_path: an embedded model (`smollm2-135m-instruct`, `tiny-random-llama`), a local
            folder, or a Hugging Face hub id.
        load_in_4bit: nf4 base with double quantisation (bitsandbytes); `compute_dtype` is its matmul dtype.
        dtype: weight dtype of a plain (not 4-bit) base.
            `auto` (both defaults): bf16 where the hardware has it natively, else float32
            (`models.choose_dtype`); the choice is printed when the model loads.
        attn_implementation: `sdpa`, `eager` or `flash_attention_2`; the last falls back to sdpa with a
            warning where flash-attn or a suitable GPU is missing, or fails validation with
            `require_flash_attention`.
        gradient_checkpointing: recompute activations in the backward pass (less memory, ~30% slower).
        optimizer: `adamw` (torch), or bitsandbytes' `paged_adamw_8bit` / `paged_adamw_32bit` (CUDA).
        init_adapter: a peft adapter folder the policy starts from (e.g. an SFT-LoRA run's `iter_0`).
        objective: `sft` (NLL of the real response), `spin`, or `tspin`.
        beta: SPIN's λ, a float or one value per iteration.
        learning_rate: a float or one value per iteration.
        tspin_alpha, tspin_beta: T-SPIN's α (scale) and β (weight of the historical term).
        nll_weight: optional NLL of the real response added to the spin/tspin loss (0 = off).
        length_normalize: average instead of sum the response log-probs.
        precompute_opponent_logps: score real/generated with the opponent once per iteration, right after
            generation (default); otherwise score on the fly through the toggled adapter every step.
        opponent_logps_from_generation: with precompute_opponent_logps, take the opponent's log-probs of
            its generated responses from the generation pass (same weights, eval mode, the drawn tokens)
            instead of a scoring forward, so only the real responses are scored. The two differ by
            float rounding only (a KV cache and other batch shapes): equal to 1e-4 in float32, ~0.4
            nats per response in bf16 (benchmarks/RESULTS.md); off = score both.
        share_prompt: run each prompt once per example in spin/tspin forwards, its responses after it
            under a block attention mask (`data.SharedPromptCollator`): the same log-probs from fewer
            tokens. sdpa and eager attention only; flash_attention_2 takes no custom mask and uses one
            row per response.
        real_drift_warning: warn when, over an epoch, the policy's log-prob of the real responses fell
            this many nats (mean) below the opponent's: the collapse users report (uclaml/SPIN#13).
    """

    def __init__(
        self,
        model_name_or_path: str = models.SMOLLM2,
        load_in_4bit: bool = False,
        dtype: str = models.AUTO,
        compute_dtype: str = models.AUTO,
        attn_implementation: str = "sdpa",
        require_flash_attention: bool = False,
        gradient_checkpointing: bool = False,
        trust_remote_code: bool = False,
        lora_rank: int = 16,
        lora_alpha: int = 32,
        lora_dropout: float = 0.0,
        target_modules: str | list[str] = "all-linear",
        init_adapter: str | None = None,
        objective: str = "spin",
        loss_type: str = "logistic",
        beta: float | list[float] = 0.1,
        tspin_alpha: float = 1.0,
        tspin_beta: float = 0.1,
        nll_weight: float = 0.0,
        length_normalize: bool = False,
        learning_rate: float | list[float] = 1e-4,
        weight_decay: float = 0.0,
        optimizer: str = "adamw",
        num_iterations: int = 2,
        epochs_per_iteration: int = 1,
        precompute_opponent_logps: bool = True,
        opponent_logps_from_generation: bool = True,
        share_prompt: bool = True,
        real_drift_warning: float = 5.0,
        cache_dir: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        validate_module_args(self.hparams)
        self.attn_implementation = attention_implementation(self.hparams)
        self.model: models.PeftModel | None = None
        self._real_drift: list[float] = []
        self._fit_start = time.perf_counter()
        # Checkpoints hold only the LoRA adapters (see on_save_checkpoint); the base is reloaded.
        self.strict_loading = False

    # ---- set-up -----------------------------------------------------------------------------------

    @cached_property
    def model_path(self) -> str:
        return models.resolve_model_path(self.hparams.model_name_or_path, self.hparams.cache_dir)

    @cached_property
    def tokenizer(self):
        return models.load_tokenizer(self.model_path, self.hparams.trust_remote_code)

    def configure_model(self) -> None:
        if self.model is not None:
            return
        hp = self.hparams
        strategy = self._trainer.strategy if self._trainer is not None else None
        if isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3:
            from transformers.integrations import HfDeepSpeedConfig

            # transformers then loads the checkpoint straight into ZeRO-3 partitions (and generate()
            # syncs ranks); it looks this object up through a weak reference, so keep it alive.
            self._hf_deepspeed_config = HfDeepSpeedConfig(strategy.config)
        device_type = strategy.root_device.type if strategy is not None else "cpu"
        dtype, reason = models.choose_dtype(hp.compute_dtype if hp.load_in_4bit else hp.dtype, device_type)
        field = "compute_dtype" if hp.load_in_4bit else "dtype"
        if rank_zero_only.rank == 0:
            print(f"model.{field}: {dtype} ({reason})", flush=True)
        base = models.load_base_model(
            self.model_path, hp.load_in_4bit, dtype, dtype, self.attn_implementation, hp.trust_remote_code
        )
        if hp.gradient_checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            base.enable_input_require_grads()
        self.model = models.attach_lora(base, hp.lora_rank, hp.lora_alpha, hp.lora_dropout, hp.target_modules, hp.init_adapter)

    @property
    def shares_prompt(self) -> bool:
        return self.hparams.share_prompt and self.attn_implementation in ("sdpa", "eager")

    def collator(self, responses: tuple[str, ...]) -> Collator | SharedPromptCollator:
        """The batch layout for `responses`: the prompt shared where there are several (see share_prompt)."""
        shared = self.shares_prompt and len(responses) > 1
        return (SharedPromptCollator if shared else Collator)(self.tokenizer.pad_token_id, responses)

    def configure_callbacks(self):
        return [IterationBoundaries()]

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        kwargs = dict(lr=self.learning_rate_at(self.iteration), weight_decay=self.hparams.weight_decay)
        if self.hparams.optimizer == "adamw":
            return torch.optim.AdamW(params, **kwargs)
        import bitsandbytes as bnb

        # optimizer state in paged (unified) memory: spills to CPU instead of failing on a memory spike
        paged = {"paged_adamw_8bit": bnb.optim.PagedAdamW8bit, "paged_adamw_32bit": bnb.optim.PagedAdamW32bit}
        return paged[self.hparams.optimizer](params, **kwargs)

    # ---- iterations -------------------------------------------------------------------------------

    @property
    def iteration(self) -> int:
        return self.trainer.current_epoch // self.hparams.epochs_per_iteration if self._trainer else 0

    @property
    def opponent_is_base(self) -> bool:
        """At iteration 0 without an initial adapter Δθ0 = 0: the opponent is the base, adapters off."""
        return self.iteration == 0 and self.hparams.init_adapter is None

    def beta_at(self, iteration: int) -> float:
        return _per_iteration(self.hparams.beta, iteration)

    def learning_rate_at(self, iteration: int) -> float:
        return _per_iteration(self.hparams.learning_rate, iteration)

    def on_fit_start(self) -> None:
        self._fit_start = time.perf_counter()

    def elapsed_seconds(self) -> float:
        """Wall-clock seconds since this process started fitting (a resumed run restarts the clock)."""
        return time.perf_counter() - self._fit_start

    def on_train_epoch_start(self) -> None:
        for group in self.optimizers().optimizer.param_groups:
            group["lr"] = self.learning_rate_at(self.iteration)
        models.use_policy(self.model)
        self._real_drift = []

    def on_train_epoch_end(self) -> None:
        if self._real_drift and (drift := sum(self._real_drift) / len(self._real_drift)) < -self.hparams.real_drift_warning:
            log.warning(
                "iteration %d: log p(real) fell %.1f nats below the opponent on average: self-play is pushing the "
                "real responses down too; consider a lower learning_rate or beta, or nll_weight > 0",
                self.iteration, -drift,
            )

    # ---- the step ---------------------------------------------------------------------------------

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, metrics = self._compute_loss(batch)
        batch_size = batch["num_examples"]
        self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=batch_size)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=batch_size)
        self.log("iteration", float(self.iteration), on_step=True, on_epoch=False, batch_size=batch_size)
        self.log("time/elapsed_seconds", self.elapsed_seconds(), on_step=True, on_epoch=False, batch_size=batch_size)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        logits, labels = models.response_logits(self.model, batch)
        nll = -losses.sequence_logps(logits, labels).sum()
        tokens = (labels[:, 1:] != IGNORE_INDEX).sum()
        self.log("val/nll", nll / tokens, batch_size=int(tokens), on_epoch=True, reduce_fx="mean")

    def _compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        hp = self.hparams
        if hp.objective == "sft":
            return losses.sft_loss(*models.response_logits(self.model, batch)), {}
        # Layout of the log-probs: [real; generated] (spin) or [real; generated; proto] (tspin).
        logps = models.response_logps(self.model, batch, average=hp.length_normalize)
        chunks = logps.chunk(batch["num_responses"])
        real_logps, generated_logps = chunks[0], chunks[1]
        metrics = {"logps/real": real_logps.mean().detach(), "logps/generated": generated_logps.mean().detach()}
        if hp.objective == "spin":
            if hp.precompute_opponent_logps:
                opponent_real, opponent_generated = batch["opponent_real_logps"], batch["opponent_generated_logps"]
            else:
                opponent_real, opponent_generated = self.opponent_logps(batch).chunk(2)
            per_example, real_rewards, generated_rewards = losses.spin_loss(
                real_logps, generated_logps, opponent_real, opponent_generated, self.beta_at(self.iteration), hp.loss_type
            )
            metrics.update(_reward_metrics(real_rewards, generated_rewards))
            self._real_drift.append((real_logps - opponent_real).mean().item())
        else:
            per_example, current, historical = losses.tspin_loss(
                real_logps, generated_logps, chunks[2], hp.tspin_alpha, hp.tspin_beta
            )
            metrics.update(_reward_metrics(current, torch.zeros_like(current)))
            metrics["rewards/historical"] = historical.mean().detach()
            metrics["logps/proto"] = chunks[2].mean().detach()
        loss = per_example.mean()
        if hp.nll_weight > 0:
            real_tokens = batch["response_lengths"][: batch["num_examples"]].clamp(min=1)
            nll = (-real_logps * (1 if hp.length_normalize else 1 / real_tokens)).mean()
            loss = loss + hp.nll_weight * nll
            metrics["train/nll_real"] = nll.detach()
        return loss, metrics

    # ---- the opponent -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def as_opponent(self):
        """The model as θ0 + Δθt for the block (generation, scoring); the policy again after it."""
        with models.opponent(self.model, adapters_disabled=self.opponent_is_base):
            yield self.model

    @torch.no_grad()
    def opponent_logps(self, batch: dict, num_responses: int = 2) -> torch.Tensor:
        """Log-probs of the first `num_responses` responses of `batch` ([real; generated] by default)
        under the opponent θ0 + Δθt (eval mode)."""
        was_training = self.model.training
        self.model.eval()
        try:
            with self.as_opponent():
                return models.response_logps(
                    self.model, batch, average=self.hparams.length_normalize, num_responses=num_responses
                )
        finally:
            self.model.train(was_training)

    def log_generation(self, iteration: int, stats: dict, unfinished: int, empty: int, total: int) -> None:
        """Generation runs inside a dataloader hook, where `self.log` is not allowed: go to the loggers."""
        metrics = {
            "generation/seconds": stats["seconds"],
            "generation/tokens_per_second": stats["tokens_per_second"],
            "generation/unfinished_fraction": unfinished / max(total, 1),
            "generation/empty_fraction": empty / max(total, 1),
            "generation/iteration": iteration,
            # when it ended, on the run's wall clock: the comparison plots shade generation phases
            "generation/end_elapsed_seconds": self.elapsed_seconds(),
        }
        for logger in self.loggers:
            logger.log_metrics(metrics, step=self.global_step)
        if unfinished or empty:
            log.info("iteration %d: %d of %d generations hit max_new_tokens, %d empty", iteration, unfinished, total, empty)

    # ---- checkpoints: adapters only ---------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = {
            k: v for k, v in checkpoint["state_dict"].items() if f".{models.POLICY}." in k or f".{models.OPPONENT}." in k
        }


def _per_iteration(value: float | list[float], iteration: int) -> float:
    return value[min(iteration, len(value) - 1)] if isinstance(value, (list, tuple)) else value


def _reward_metrics(real_rewards: torch.Tensor, generated_rewards: torch.Tensor) -> dict[str, torch.Tensor]:
    margin = real_rewards - generated_rewards
    return {
        "rewards/real": real_rewards.mean().detach(),
        "rewards/generated": generated_rewards.mean().detach(),
        "rewards/margin": margin.mean().detach(),
        "rewards/accuracy": (margin > 0).float().mean().detach(),
    }

