"""The LightningModule: a frozen (optionally 4-bit) base with LoRA policy/opponent adapters and the
sft / spin / tspin objectives. One training step runs one forward over the concatenated responses.
"""

from __future__ import annotations

import logging
import math
import os
import time
from functools import cached_property
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from lowrank_spin import losses, memory, models
from lowrank_spin.batching import response_logps, split_examples
from lowrank_spin.callbacks import IterationBoundaries
from lowrank_spin.evaluation import heldout_rewards
from lowrank_spin.faults import RunStopped
from lowrank_spin.generation import OUT_OF_MEMORY
from lowrank_spin.opponent import Opponent
from lowrank_spin.settings import (
    AUTO,
    LoRASettings,
    ObjectiveSettings,
    OptimizerSettings,
    attention_errors,
    attention_implementation,
    dtype_errors,
    model_path_errors,
    per_iteration,
    quantization_errors,
    raise_if_any,
)

log = logging.getLogger(__name__)


class SelfPlayLoRA(L.LightningModule):
    """Low-rank self-play fine-tuning: a frozen base, a trainable LoRA policy, and its `Opponent`.

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
        lora: the LoRA subspace (`settings.LoRASettings`).
        objective: sft / spin / tspin and their coefficients (`settings.ObjectiveSettings`).
        optimizer: optimizer, learning rate (per iteration) and weight decay (`settings.OptimizerSettings`).
        num_iterations, epochs_per_iteration: self-play iterations, and training epochs in each.
        precompute_opponent_logps: score real/generated with the opponent once per iteration, right after
            generation (default); otherwise score on the fly through the toggled adapter every step.
        opponent_logps_from_generation: with precompute_opponent_logps, take the opponent's log-probs of
            its generated responses from the generation pass (same weights, eval mode, the drawn tokens)
            instead of a scoring forward, so only the real responses are scored. The two differ by
            float rounding only (a KV cache and other batch shapes): equal to 1e-4 in float32, ~0.4
            nats per response in bf16 (benchmarks/RESULTS.md); off = score both. The HF engine only: with
            `data.sampling.engine: vllm` the training model scores them (vLLM is another implementation).
        share_prompt: run each prompt once per example in spin/tspin forwards, its responses after it
            under a block attention mask (`batching.SharedPromptCollator`): the same log-probs from fewer
            tokens. sdpa and eager attention only; flash_attention_2 takes no custom mask and uses one
            row per response.
    """

    def __init__(
        self,
        model_name_or_path: str = models.SMOLLM2,
        load_in_4bit: bool = False,
        dtype: str = AUTO,
        compute_dtype: str = AUTO,
        attn_implementation: str = "sdpa",
        require_flash_attention: bool = False,
        gradient_checkpointing: bool = False,
        trust_remote_code: bool = False,
        cache_dir: str | None = None,
        lora: LoRASettings = LoRASettings(),
        objective: ObjectiveSettings = ObjectiveSettings(),
        optimizer: OptimizerSettings = OptimizerSettings(),
        num_iterations: int = 2,
        epochs_per_iteration: int = 1,
        precompute_opponent_logps: bool = True,
        opponent_logps_from_generation: bool = True,
        share_prompt: bool = True,
    ):
        super().__init__()
        self.save_hyperparameters()  # (the groups are stored as plain dicts there; the dataclasses are kept below)
        self.lora, self.objective, self.optimizer_settings = lora, objective, optimizer
        raise_if_any(self.errors())
        self.attn_implementation = attention_implementation(attn_implementation)
        self.model: models.PeftModel | None = None
        self.opponent: Opponent | None = None
        self._real_drift: list[float] = []
        self._fit_start = time.perf_counter()
        # each training micro-batch runs as this many parts, accumulated; doubled on out of memory
        self._micro_batch_parts = 1
        # Checkpoints hold only the LoRA adapters (see on_save_checkpoint); the base is reloaded.
        self.strict_loading = False

    def errors(self) -> list[str]:
        """Every bad model setting, each naming its field (empty when all are fine)."""
        hp = self.hparams
        errors = [
            f"model.{f}: must be >= 1, got {hp[f]}" for f in ("num_iterations", "epochs_per_iteration") if hp[f] < 1
        ]
        errors += dtype_errors("model.dtype", hp.dtype) + dtype_errors("model.compute_dtype", hp.compute_dtype)
        errors += quantization_errors(hp.load_in_4bit) + attention_errors(
            hp.attn_implementation, hp.require_flash_attention
        )
        errors += (
            self.lora.errors()
            + self.objective.errors(hp.num_iterations)
            + self.optimizer_settings.errors(hp.num_iterations)
        )
        return errors + model_path_errors(hp.model_name_or_path, models.EMBEDDED_MODELS)

    # ---- set-up -----------------------------------------------------------------------------------

    @cached_property
    def model_path(self) -> str:
        """The local folder (or hub id) the base loads from."""
        return models.resolve_model_path(self.hparams.model_name_or_path, self.hparams.cache_dir)

    @cached_property
    def tokenizer(self):
        """The base's tokenizer, with its chat template."""
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
        field = "compute_dtype" if hp.load_in_4bit else "dtype"
        dtype, reason = models.choose_dtype(hp[field], device_type)
        self.compute_dtype = dtype
        if rank_zero_only.rank == 0:
            print(f"model.{field}: {dtype} ({reason})", flush=True)
        base = models.load_base_model(
            self.model_path, hp.load_in_4bit, dtype, dtype, self.attn_implementation, hp.trust_remote_code
        )
        if hp.gradient_checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            base.enable_input_require_grads()
        self.model = models.attach_lora(base, self.lora)
        if isinstance(strategy, DeepSpeedStrategy):
            # DeepSpeed saves this module's state_dict in its checkpoints: the trainable weights only
            self.register_state_dict_post_hook(_trainable_weights_only)
        self.opponent = Opponent(
            self.model,
            self.tokenizer,
            self.objective,
            share_prompt=hp.share_prompt and self.attn_implementation in ("sdpa", "eager"),
            precompute_logps=hp.precompute_opponent_logps,
            logps_from_generation=hp.opponent_logps_from_generation,
            starts_as_base=self.lora.init_adapter is None,
            elapsed_seconds=self.elapsed_seconds,
        )
        if self._trainer is not None and self.trainer.datamodule is not None:
            # the DataModule's one seam to the model, and how its epochs map onto iterations
            self.trainer.datamodule.attach_opponent(self.opponent, self.hparams.epochs_per_iteration)

    def configure_callbacks(self):
        return [IterationBoundaries()]

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        settings = self.optimizer_settings
        kwargs = dict(lr=self.learning_rate_at(self.iteration), weight_decay=settings.weight_decay)  # lr: set per step
        if settings.name == "adamw":
            return torch.optim.AdamW(params, **kwargs)
        import bitsandbytes as bnb

        # optimizer state in paged (unified) memory: spills to CPU instead of failing on a memory spike
        paged = {"paged_adamw_8bit": bnb.optim.PagedAdamW8bit, "paged_adamw_32bit": bnb.optim.PagedAdamW32bit}
        return paged[settings.name](params, **kwargs)

    # ---- iterations -------------------------------------------------------------------------------

    @property
    def iteration(self) -> int:
        """The iteration being trained: the trainer's epoch // epochs_per_iteration."""
        return self.trainer.current_epoch // self.hparams.epochs_per_iteration if self._trainer else 0

    def beta_at(self, iteration: int) -> float:
        """SPIN's λ at `iteration`."""
        return per_iteration(self.objective.beta, iteration)

    def learning_rate_at(self, iteration: int) -> float:
        """The learning rate at `iteration`."""
        return per_iteration(self.optimizer_settings.learning_rate, iteration)

    # ---- what an iteration boundary asks of the module (callbacks.IterationBoundaries) --------------

    def ends_iteration(self, epoch: int) -> bool:
        """Whether `epoch` is the last epoch of its iteration (a boundary follows it)."""
        return (epoch + 1) % self.hparams.epochs_per_iteration == 0

    @property
    def last_iteration(self) -> int:
        return self.hparams.num_iterations - 1

    def save_adapter(self, directory: Path, write: bool) -> None:
        """The policy adapter as a standard peft folder, its base named portably. Returns None."""
        base_model = models.portable_base_name(self.hparams.model_name_or_path)
        models.save_adapter(self.model, directory, write=write, base_model=base_model)

    def snapshot_opponent(self) -> None:
        """θ0 + Δθt: the policy at the end of iteration t becomes the opponent of iteration t+1. Returns None."""
        self.opponent.snapshot()

    def evaluation_inputs(self) -> tuple[torch.nn.Module, object]:
        """(model, tokenizer): what the evaluation generates and scores with (the policy, as it is now)."""
        return self.model, self.tokenizer

    def heldout_rewards(self, examples: list[dict], samples: list[dict], iteration: int, batch_size: int) -> dict:
        """SPIN's rewards at `iteration` on held-out (gold, `samples`) pairs: the policy against the
        opponent of that iteration (`evaluation.heldout_rewards`)."""
        return heldout_rewards(
            self.model, self.opponent, examples, samples, iteration, beta=self.beta_at(iteration), batch_size=batch_size
        )

    def on_fit_start(self) -> None:
        # Transformers loads models in eval mode and Lightning keeps each module's mode. Evaluation and
        # generation end by putting the whole model in train mode, but where neither comes before the
        # first step (a resumed fit, a compare arm given its start's evaluation) the base's layers would
        # train in eval mode: no gradient checkpointing (transformers applies it in train mode only) and
        # none of the base's own dropout.
        self.train()
        self._fit_start = time.perf_counter()
        self._seed = torch.initial_seed()  # the run's seed (seed_everything), read before any step reseeds
        self._check_memory()

    def _check_memory(self) -> None:
        """State the run's expected peak memory and stop one that would not fit, before generation and
        training start (`memory`): on a CPU against the RAM available (running out there is a SIGKILL
        from the kernel, hours in, with no message), on a GPU against its free memory. Set
        LOWRANK_SPIN_SKIP_MEMORY_CHECK=1 to run anyway."""
        data = self.trainer.datamodule
        train = data.examples["train"]
        longest_real = max(len(e["real_ids"]) for e in train)
        estimate = memory.estimate_peak(
            self.model.get_base_model().config,
            load_in_4bit=self.hparams.load_in_4bit,
            dtype=self.compute_dtype,
            lora=self.lora,
            sampling=data.sampling,
            train_batch_size=data.hparams.batch_size,
            responses_per_example=max(len(self.objective.responses_at(i)) for i in range(self.hparams.num_iterations)),
            prompt_length=max(len(e["prompt_ids"]) for e in train),
            response_length=max(longest_real, data.sampling.max_new_tokens),
            gradient_checkpointing=self.hparams.gradient_checkpointing,
            device_type=self.device.type,
            weight_shards=self.trainer.world_size if self._zero3 else 1,
        )
        if rank_zero_only.rank == 0:
            print(f"memory: expected peak {estimate.describe()}", flush=True)
        errors = memory.device_memory_errors(
            estimate,
            self.device,
            processes=self.trainer.num_devices,
            gradient_checkpointing=self.hparams.gradient_checkpointing,
            load_in_4bit=self.hparams.load_in_4bit,
        )
        if os.environ.get("LOWRANK_SPIN_SKIP_MEMORY_CHECK") == "1":
            return
        # every process stops together (each checks its own device), or the others wait for it forever
        if self.trainer.strategy.reduce_boolean_decision(bool(errors), all=False):
            raise RunStopped(
                errors[0] if errors else "memory: another process of this run would not fit (see its message)"
            )

    @property
    def _zero3(self) -> bool:
        strategy = self.trainer.strategy
        return isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3

    def elapsed_seconds(self) -> float:
        """Wall-clock seconds since this process started fitting (a resumed run restarts the clock)."""
        return time.perf_counter() - self._fit_start

    def on_train_start(self) -> None:
        # also after a resume mid-epoch, where Lightning skips on_train_epoch_start
        models.use_policy(self.model)

    def on_train_epoch_start(self) -> None:
        # Each iteration trains like a run of its own: a fresh optimizer state and its own schedule
        # (`learning_rate`). Not called when a run resumes mid-epoch: the restored state is kept.
        epoch_in_iteration = self.trainer.current_epoch % self.hparams.epochs_per_iteration
        if epoch_in_iteration == 0 and self.optimizer_settings.reset_each_iteration:
            _clear_optimizer_state(self.optimizers().optimizer)
        models.use_policy(self.model)
        self._real_drift = []

    def on_train_batch_end(self, outputs, batch: dict, batch_idx: int) -> None:
        if self.device.type == "cpu":
            memory.release_freed_memory()  # the step's activations, or glibc keeps them (~2 GB here)

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        self._batch_idx = batch_idx
        # The step's randomness (LoRA dropout) follows from (seed, step), so a resumed step draws
        # what it would have drawn in an uninterrupted run.
        torch.manual_seed(self._seed * 1_000_003 + self.trainer.global_step)
        for group in self.optimizers().optimizer.param_groups:
            group["lr"] = self.learning_rate()

    def learning_rate(self) -> float:
        """The learning rate of the next optimizer step: the iteration's peak times the schedule's factor.

        The step's place in its iteration follows from (epoch, batch index) alone, so a run resumed
        mid-epoch gets the rate it would have had."""
        trainer, accumulate = self.trainer, self.trainer.accumulate_grad_batches
        steps_per_epoch = math.ceil(trainer.num_training_batches / accumulate)
        epoch_in_iteration = trainer.current_epoch % self.hparams.epochs_per_iteration
        step = epoch_in_iteration * steps_per_epoch + getattr(self, "_batch_idx", 0) // accumulate
        factor = self.optimizer_settings.lr_factor(step, steps_per_epoch * self.hparams.epochs_per_iteration)
        return self.learning_rate_at(self.iteration) * factor

    def on_train_epoch_end(self) -> None:
        if (
            self._real_drift
            and (drift := sum(self._real_drift) / len(self._real_drift)) < -self.objective.real_drift_warning
        ):
            log.warning(
                "iteration %d: log p(real) fell %.1f nats below the opponent on average: self-play is pushing the "
                "real responses down too; consider a lower learning_rate or beta, or nll_weight > 0",
                self.iteration,
                -drift,
            )

    # ---- the step ---------------------------------------------------------------------------------

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, metrics = self._step_loss(batch)
        self._nonfinite_loss = not bool(torch.isfinite(loss.detach()))
        batch_size = batch["num_examples"]
        self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=batch_size)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=batch_size)
        self.log("iteration", float(self.iteration), on_step=True, on_epoch=False, batch_size=batch_size)
        self.log("train/lr", self.learning_rate(), on_step=True, on_epoch=False, batch_size=batch_size)
        self.log("time/elapsed_seconds", self.elapsed_seconds(), on_step=True, on_epoch=False, batch_size=batch_size)
        return loss

    def _step_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The micro-batch's loss and metrics: in one forward, or, once a training step has run out of
        memory, in parts whose gradients are accumulated (`_loss_in_parts`) for the rest of the run."""
        if self._micro_batch_parts == 1:
            try:
                return self._compute_loss(batch)
            except OUT_OF_MEMORY:
                if not self._can_split(batch):
                    raise
            # (outside the except block: the failed forward's activations are freed by now)
            self._micro_batch_parts = memory.split_after_out_of_memory(1, batch["num_examples"], log)
        return self._loss_in_parts(batch)

    def _can_split(self, batch: dict) -> bool:
        """Whether a micro-batch can run in parts here: more than one example, one process, no DeepSpeed
        (whose engine owns the backward and its gradient partitions)."""
        if batch["num_examples"] < 2 or isinstance(self.trainer.strategy, DeepSpeedStrategy):
            return False
        return self.trainer.world_size == 1

    def _loss_in_parts(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The micro-batch as `_micro_batch_parts` parts of consecutive examples, one forward and backward
        each, doubling the parts while a part runs out of memory. The same optimizer step as one forward:
        each part's loss is weighted by its share of the batch's mean (of examples; of real tokens for
        SFT's token mean), so the accumulated gradient is the whole batch's, and it reaches the weights
        through the returned loss's backward (Lightning's, after its zero_grad, with its loss scaling
        and accumulation) as if it had been computed there. Returns (loss, metrics) of the whole batch."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        while True:
            parts = min(self._micro_batch_parts, batch["num_examples"])
            try:
                loss, metrics, grads = self._gradients_in_parts(batch, parts, params)
                return _AccumulatedGradients.apply(loss, grads, *params), metrics
            except OUT_OF_MEMORY:
                if parts >= batch["num_examples"]:
                    raise
            self._micro_batch_parts = memory.split_after_out_of_memory(parts, batch["num_examples"], log)

    def _gradients_in_parts(
        self, batch: dict, parts: int, params: list[torch.nn.Parameter]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[torch.Tensor | None]]:
        """(loss, metrics, d loss / d params) of `batch`, computed `parts` examples groups at a time."""
        sft = self.objective.name_at(self.iteration) == "sft"
        lengths = batch["response_lengths"][: batch["num_examples"]]  # the real responses' tokens
        # a 16-mixed run's GradScaler: scale each part's loss as Lightning scales the whole one, so
        # float16 activation gradients do not underflow; unscaled again below
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        scale = float(scaler.get_scale()) if scaler is not None else 1.0
        loss, metrics, grads = torch.zeros((), device=self.device), {}, [None] * len(params)
        start = 0
        for part in split_examples(batch, parts):
            size = part["num_examples"]
            if sft:  # a token mean: the part's tokens' share of the batch's
                share = lengths[start : start + size].sum().clamp(min=1) / lengths.sum().clamp(min=1)
            else:  # an example mean
                share = torch.tensor(size / batch["num_examples"], device=self.device)
            part_loss, part_metrics = self._compute_loss(part)
            part_grads = torch.autograd.grad(part_loss * share * scale, params, allow_unused=True)
            for i, g in enumerate(part_grads):
                if g is not None:
                    grads[i] = g / scale if grads[i] is None else grads[i].add_(g / scale)
            loss = loss + part_loss.detach() * share
            for key, value in part_metrics.items():  # means over examples
                metrics[key] = metrics.get(key, 0) + value * (size / batch["num_examples"])
            start += size
        return loss, metrics, grads

    def _compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        objective, name = self.objective, self.objective.name_at(self.iteration)
        if name == "sft":
            return losses.sft_loss(response_logps(self.model, batch), batch["response_lengths"]), {}
        # Layout of the log-probs: [real; generated] (spin) or [real; generated; proto] (tspin).
        logps = response_logps(self.model, batch, average=objective.length_normalize)
        chunks = logps.chunk(batch["num_responses"])
        real_logps, generated_logps = chunks[0], chunks[1]
        metrics = {"logps/real": real_logps.mean().detach(), "logps/generated": generated_logps.mean().detach()}
        if name == "spin":
            if self.hparams.precompute_opponent_logps:
                opponent_real, opponent_generated = batch["opponent_real_logps"], batch["opponent_generated_logps"]
            else:
                opponent_real, opponent_generated = self.opponent.logps(batch, self.iteration).chunk(2)
            per_example, real_rewards, generated_rewards = losses.spin_loss(
                real_logps,
                generated_logps,
                opponent_real,
                opponent_generated,
                self.beta_at(self.iteration),
                objective.loss_type,
            )
            metrics.update(_reward_metrics(real_rewards, generated_rewards))
            self._real_drift.append((real_logps - opponent_real).mean().item())
        else:
            per_example, current, historical = losses.tspin_loss(
                real_logps, generated_logps, chunks[2], objective.tspin_alpha, objective.tspin_beta
            )
            metrics.update(_reward_metrics(current, torch.zeros_like(current)))
            metrics["rewards/historical"] = historical.mean().detach()
            metrics["logps/proto"] = chunks[2].mean().detach()
        loss = per_example.mean()
        if objective.nll_weight > 0:
            real_tokens = batch["response_lengths"][: batch["num_examples"]].clamp(min=1)
            nll = (-real_logps * (1 if objective.length_normalize else 1 / real_tokens)).mean()
            loss = loss + objective.nll_weight * nll
            metrics["train/nll_real"] = nll.detach()
        return loss, metrics

    def on_before_optimizer_step(self, optimizer) -> None:
        """Skip a step whose loss or gradient is not finite: its gradients are dropped, so the optimizer
        moves no weight and no moment. Counted; `max_nonfinite_steps` in a row stop the run."""
        grads = [p.grad for p in self.model.parameters() if p.requires_grad and p.grad is not None]
        bad = getattr(self, "_nonfinite_loss", False) or not all(bool(torch.isfinite(g).all()) for g in grads)
        if not self.trainer.strategy.reduce_boolean_decision(bad, all=False):  # any rank: all skip together
            self._nonfinite_in_a_row = 0
            return
        for param in self.model.parameters():
            param.grad = None
        self._skipped_steps = getattr(self, "_skipped_steps", 0) + 1
        self._nonfinite_in_a_row = getattr(self, "_nonfinite_in_a_row", 0) + 1
        self.log("train/skipped_steps", float(self._skipped_steps), on_step=True, on_epoch=False)
        where = f"iteration {self.iteration}, step {self.trainer.global_step}"
        log.warning("%s: the loss or a gradient is nan/inf; the step is skipped (no weight changed)", where)
        limit = (
            1 if isinstance(self.trainer.strategy, DeepSpeedStrategy) else self.optimizer_settings.max_nonfinite_steps
        )
        if self._nonfinite_in_a_row >= limit:
            raise RunStopped(
                f"{where}: {self._nonfinite_in_a_row} optimizer step(s) in a row had a nan/inf loss or gradient "
                f"(model.optimizer.max_nonfinite_steps={limit}); {self._skipped_steps} skipped in this process. "
                "Stopped before the weights moved: every adapter, synthetic file and checkpoint saved so far is "
                "as it was. Likely levers: a lower model.optimizer.learning_rate, a lower model.objective.beta, "
                "or model.dtype / model.compute_dtype float32 instead of bf16 or float16."
            )

    # ---- checkpoints: adapters only ---------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = {
            k: v
            for k, v in checkpoint["state_dict"].items()
            if f".{models.POLICY}." in k or f".{models.OPPONENT}." in k
        }
        if isinstance(self.trainer.strategy, DeepSpeedStrategy):
            # DeepSpeed saves the module itself, without its frozen weights (the CLI sets
            # exclude_frozen_parameters; `_trainable_weights_only`): the policy adapter and its optimizer
            # state are there, the frozen opponent adapter comes here, in the client state (gathered
            # whole under ZeRO-3: every rank calls this)
            opponent = models.lora_parameters(self.model, models.OPPONENT)
            with models.gathered(list(opponent.values())):
                checkpoint[OPPONENT_CHECKPOINT_KEY] = {n: p.detach().cpu().clone() for n, p in opponent.items()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get(OPPONENT_CHECKPOINT_KEY)
        if state is None:  # (a Lightning checkpoint: the opponent is in its state_dict)
            return
        opponent = models.lora_parameters(self.model, models.OPPONENT)
        with torch.no_grad(), models.gathered(list(opponent.values()), modifier_rank=0):
            for name, param in opponent.items():
                param.copy_(state[name])


# the opponent adapter's weights in a DeepSpeed checkpoint's client state
OPPONENT_CHECKPOINT_KEY = "opponent_adapter"


def _trainable_weights_only(module: torch.nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    """A state_dict post-hook: drop every entry but the trainable parameters (the policy adapter).
    DeepSpeed's `exclude_frozen_parameters` drops frozen parameters by their first name only, so a
    tied lm_head (SmolLM2, Llama-3.2, Qwen2.5: the embedding matrix) would still be saved."""
    trainable = {prefix + n for n, p in module.named_parameters(remove_duplicate=False) if p.requires_grad}
    for key in [k for k in state_dict if k.startswith(prefix) and k not in trainable]:
        del state_dict[key]


class _AccumulatedGradients(torch.autograd.Function):
    """`loss`, whose backward hands each of `params` its precomputed gradient in `grads`, times the
    gradient that reaches the loss (Lightning's 1 / accumulate_grad_batches, a GradScaler's scale):
    the parts' gradients arrive where and when the whole batch's backward would have put them."""

    @staticmethod
    def forward(ctx, loss, grads, *params):
        ctx.grads = grads
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_output):
        return None, None, *(None if g is None else (g * grad_output).to(g.dtype) for g in ctx.grads)


def _clear_optimizer_state(optimizer) -> None:
    """Forget Adam's moments and step counts (also through the wrappers DeepSpeed puts around it)."""
    while optimizer is not None:
        if isinstance(getattr(optimizer, "state", None), dict):
            optimizer.state.clear()
        optimizer = getattr(optimizer, "optimizer", None)


def _reward_metrics(real_rewards: torch.Tensor, generated_rewards: torch.Tensor) -> dict[str, torch.Tensor]:
    margin = real_rewards - generated_rewards
    return {
        "rewards/real": real_rewards.mean().detach(),
        "rewards/generated": generated_rewards.mean().detach(),
        "rewards/margin": margin.mean().detach(),
        "rewards/accuracy": (margin > 0).float().mean().detach(),
    }
