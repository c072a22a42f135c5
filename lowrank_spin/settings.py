"""The typed setting groups of a run, each declared once, and every check of them in one place.

Each group is a dataclass that the CLI shows as a nested YAML section (`model.lora.rank`,
`data.sampling.temperature`, ...). Every check returns error strings that name their config field; the
module and the DataModule raise them together (`raise_if_any`) before anything is loaded or written.
"""

from __future__ import annotations

import importlib.util
import math
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

AUTO = "auto"  # a dtype chosen at run time from what the hardware runs fast (`models.choose_dtype`)
DTYPE_NAMES = ("float32", "bfloat16", "float16")
OBJECTIVES = ("sft", "spin", "tspin")
RESPONSES = {"sft": ("real",), "spin": ("real", "generated"), "tspin": ("real", "generated", "proto")}
LOSS_TYPES = ("logistic", "hinge", "exponential", "correlation")
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2")
OPTIMIZERS = ("adamw", "paged_adamw_8bit", "paged_adamw_32bit")  # paged: bitsandbytes, CUDA only
SCHEDULES = ("linear", "constant")
EVAL_SPLITS = ("validation", "test")
SELECTION_METRICS = ("auto", "accuracy", "nll")
GENERATION_ENGINES = ("hf", "vllm")  # `generation.make_engine`


class ConfigError(ValueError):
    """One error for all the bad fields of a config; `.errors` lists them."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {e}" for e in errors))


def raise_if_any(errors: list[str]) -> None:
    """Raise one ConfigError listing `errors`; returns None when there are none."""
    if errors:
        raise ConfigError(errors)


@dataclass(frozen=True)
class LoRASettings:
    """The trainable subspace Ω: LoRA on `target_modules` of the frozen base.

    Args:
        rank, alpha, dropout: LoRA's r, α (the update is scaled by α / r) and dropout.
        target_modules: `all-linear` or a list of module names.
        init_adapter: a peft adapter folder the policy starts from (e.g. an SFT-LoRA run's `iter_0`);
            its own LoRA settings then replace these.
    """

    rank: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"
    init_adapter: str | None = None

    def errors(self, prefix: str = "model.lora") -> list[str]:
        """Error strings for the bad fields (empty when all are fine)."""
        errors = [
            f"{prefix}.{name}: must be > 0, got {value}"
            for name, value in (("rank", self.rank), ("alpha", self.alpha))
            if value <= 0
        ]
        if not 0 <= self.dropout < 1:
            errors.append(f"{prefix}.dropout: must be in [0, 1), got {self.dropout}")
        if (
            self.init_adapter is not None
            and not (Path(self.init_adapter).expanduser() / "adapter_config.json").is_file()
        ):
            errors.append(
                f"{prefix}.init_adapter: {self.init_adapter!r} is not a peft adapter folder (no adapter_config.json)"
            )
        return errors


@dataclass(frozen=True)
class ObjectiveSettings:
    """What the policy is trained to do (losses.py).

    Args:
        name: `sft` (NLL of the real response), `spin`, or `tspin`; or one per iteration, which runs the
            papers' pipeline in one fit, e.g. `[sft, sft, sft, spin, spin]`: SFT-LoRA on the labels, then
            self-play from the adapter it reached (the opponent of the first self-play iteration is the
            policy at the end of the last SFT one; T-SPIN's proto responses are that opponent's).
        loss_type: SPIN's ℓ: logistic (default), hinge, exponential or correlation.
        beta: SPIN's λ, a float or one value per iteration.
        tspin_alpha, tspin_beta: T-SPIN's α (scale) and β (weight of the historical term).
        nll_weight: optional NLL of the real response added to the spin/tspin loss (0 = off).
        length_normalize: average instead of sum the response log-probs.
        real_drift_warning: warn when, over an epoch, the policy's log-prob of the real responses fell
            this many nats (mean) below the opponent's: the collapse users report (uclaml/SPIN#13).
    """

    name: list[str] | str = "spin"
    loss_type: str = "logistic"
    beta: float | list[float] = 0.1
    tspin_alpha: float = 1.0
    tspin_beta: float = 0.1
    nll_weight: float = 0.0
    length_normalize: bool = False
    real_drift_warning: float = 5.0

    def name_at(self, iteration: int) -> str:
        """The objective of `iteration`."""
        return per_iteration(self.name, iteration)

    def responses_at(self, iteration: int) -> tuple[str, ...]:
        """The responses a training example of `iteration` holds, in batch order."""
        return RESPONSES[self.name_at(iteration)]

    @property
    def first_self_play_iteration(self) -> int | None:
        """The first iteration that trains against the opponent (None: SFT only). Its opponent's
        responses are T-SPIN's proto-synthetic y0, "generated once by the initial model"."""
        names = self.name if isinstance(self.name, (list, tuple)) else [self.name]
        return next((i for i, name in enumerate(names) if name != "sft"), None)

    def errors(self, num_iterations: int, prefix: str = "model.objective") -> list[str]:
        """Error strings for the bad fields (empty when all are fine)."""
        errors = []
        names = self.name if isinstance(self.name, (list, tuple)) else [self.name]
        if isinstance(self.name, (list, tuple)) and len(names) != num_iterations:
            errors.append(
                f"{prefix}.name: has {len(names)} values for {num_iterations} iterations (model.num_iterations)"
            )
        if bad := [name for name in names if name not in OBJECTIVES]:
            errors.append(f"{prefix}.name: must be one of {OBJECTIVES}, got {bad[0]!r}")
        if self.loss_type not in LOSS_TYPES:
            errors.append(f"{prefix}.loss_type: must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        errors += per_iteration_errors(f"{prefix}.beta", self.beta, num_iterations)
        if self.tspin_alpha <= 0:
            errors.append(f"{prefix}.tspin_alpha: must be > 0, got {self.tspin_alpha}")
        for name in ("tspin_beta", "nll_weight", "real_drift_warning"):
            if getattr(self, name) < 0:
                errors.append(f"{prefix}.{name}: must be >= 0, got {getattr(self, name)}")
        return errors


@dataclass(frozen=True)
class OptimizerSettings:
    """How the LoRA weights are stepped. As in the SPIN recipe, each iteration trains like a fresh run:
    a new optimizer state and its own warm-up and decay (`lr_factor`).

    Args:
        name: `adamw` (torch), or bitsandbytes' `paged_adamw_8bit` / `paged_adamw_32bit` (CUDA).
        learning_rate: the peak learning rate, a float or one value per iteration.
        weight_decay: AdamW's decoupled weight decay.
        schedule: `linear` (warm up over `warmup_ratio` of the iteration's steps, then decay linearly
            towards 0) or `constant`.
        warmup_ratio: the share of each iteration's optimizer steps spent warming up (SPIN: 0.1).
        reset_each_iteration: start every iteration with a fresh optimizer state (Adam's moments and
            step count), as the recipe's one run per iteration does; false carries it across iterations.
        max_nonfinite_steps: a step whose loss or gradient is nan/inf is skipped (no weight moves) and
            counted (`train/skipped_steps`); this many in a row stop the run with a message. Under
            DeepSpeed, which keeps the gradients itself, the first such step stops it.
    """

    name: str = "adamw"
    learning_rate: float | list[float] = 1e-4
    weight_decay: float = 0.0
    schedule: str = "linear"
    warmup_ratio: float = 0.1
    reset_each_iteration: bool = True
    max_nonfinite_steps: int = 5

    def lr_factor(self, step: int, total: int) -> float:
        """The multiplier of the peak learning rate for the optimizer step `step` (0-based) of an
        iteration of `total` steps: (step + 1) / warmup while warming up, then (total - step) /
        (total - warmup), so the first step already moves and the last one still does (1 for `constant`)."""
        if self.schedule == "constant" or total <= 0:
            return 1.0
        warmup = math.ceil(self.warmup_ratio * total)
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(total - warmup, 1))

    def errors(self, num_iterations: int, prefix: str = "model.optimizer") -> list[str]:
        """Error strings for the bad fields (empty when all are fine)."""
        errors = per_iteration_errors(f"{prefix}.learning_rate", self.learning_rate, num_iterations)
        if self.weight_decay < 0:
            errors.append(f"{prefix}.weight_decay: must be >= 0, got {self.weight_decay}")
        if self.schedule not in SCHEDULES:
            errors.append(f"{prefix}.schedule: must be one of {SCHEDULES}, got {self.schedule!r}")
        if not 0 <= self.warmup_ratio < 1:
            errors.append(f"{prefix}.warmup_ratio: must be in [0, 1), got {self.warmup_ratio}")
        if self.max_nonfinite_steps < 1:
            errors.append(f"{prefix}.max_nonfinite_steps: must be >= 1, got {self.max_nonfinite_steps}")
        if self.name not in OPTIMIZERS:
            errors.append(f"{prefix}.name: must be one of {OPTIMIZERS}, got {self.name!r}")
        elif self.name.startswith("paged"):
            errors += _paged_optimizer_errors(self.name, prefix)
        return errors


@dataclass(frozen=True)
class SamplingSettings:
    """How the opponent's responses are drawn (`generation.Sampler`): the only place they are set.

    Args:
        temperature, top_k, top_p: softmax(logits / temperature) over the top_k most likely tokens
            (0 = all; 50 is what transformers' generate() applied by default) within the nucleus top_p;
            temperature 0 = greedy.
        max_new_tokens: the longest response generated.
        batch_size: prompts generated at once (also for evaluation's greedy answers); on CUDA out of
            memory it is halved for the rest of the run, with a warning.
        engine: how (`generation.make_engine`): `hf` (default), transformers' `generate`; `vllm`, the
            optional vLLM engine (`pip install 'lowrank_spin[vllm]'`, CUDA) serving the policy's own base
            (vLLM's bitsandbytes nf4 for a 4-bit base, else the policy's dtype) with the opponent's LoRA
            adapter; the training model scores its responses (`model.opponent_logps_from_generation`
            does not apply). On a CPU a larger `batch_size` pays more than any engine (1.8x new
            tokens/s at 64 vs 16 for SmolLM2-135M, benchmarks/RESULTS.md).
        prompts_per_flush: prompts generated and written to the progress file together, and seeded
            together: a killed run loses at most this many (default `batch_size`).
        vllm_gpu_memory_utilization: the share of GPU memory vLLM may take while it generates (the trained
            model shares the GPU); vLLM sleeps between generations, its memory released for training.
        best_of: draw this many responses per prompt and keep the one the generating model finds most
            likely (the highest log-prob per token at temperature 1): harder negatives, closer to what the
            model would answer, for best_of times the generation time. 1 (default): one draw, kept.
            Evaluation's greedy answers ignore it. Needs the hf engine (vLLM's responses carry no log-prob).
    """

    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    max_new_tokens: int = 128
    batch_size: int = 16
    engine: str = "hf"
    prompts_per_flush: int | None = None
    vllm_gpu_memory_utilization: float = 0.3
    best_of: int = 1

    def errors(self, prefix: str = "data.sampling") -> list[str]:
        """Error strings for the bad fields (empty when all are fine)."""
        errors = [
            f"{prefix}.{name}: must be >= 1, got {getattr(self, name)}"
            for name in ("max_new_tokens", "batch_size", "best_of")
            if getattr(self, name) < 1
        ]
        if self.best_of > 1 and self.engine == "vllm":
            errors.append(
                f"{prefix}.best_of: {self.best_of} needs the hf engine, which records each draw's log-prob "
                f"({prefix}.engine is vllm, whose responses carry none)"
            )
        if self.temperature < 0:
            errors.append(f"{prefix}.temperature: must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            errors.append(f"{prefix}.top_k: must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            errors.append(f"{prefix}.top_p: must be in (0, 1], got {self.top_p}")
        if self.prompts_per_flush is not None and self.prompts_per_flush < 1:
            errors.append(f"{prefix}.prompts_per_flush: must be >= 1, got {self.prompts_per_flush}")
        if not 0 < self.vllm_gpu_memory_utilization < 1:
            errors.append(
                f"{prefix}.vllm_gpu_memory_utilization: must be in (0, 1), got {self.vllm_gpu_memory_utilization}"
            )
        if self.engine not in GENERATION_ENGINES:
            errors.append(f"{prefix}.engine: must be one of {GENERATION_ENGINES}, got {self.engine!r}")
        elif self.engine == "vllm":
            errors += _vllm_errors(prefix)
        return errors


@dataclass(frozen=True)
class EvaluationSettings:
    """What is evaluated at each iteration boundary (evaluation.py).

    Args:
        split: `validation` or `test` (a user dataset has no `test`: its validation split is used).
        every_iteration: evaluate after every iteration (the default) or, to save time, only before the
            first, after the last and at the end of each stage: the last iteration of each objective
            when `model.objective.name` changes (after the SFT iterations of [sft, sft, spin, spin]).
            Held-out rewards score the previous iteration's evaluation answers, so they appear only
            after an iteration whose predecessor was evaluated.
        heldout_reward_pairs: how many evaluation prompts also score SPIN's reward accuracy/margin on
            held-out (gold, opponent answer) pairs each iteration (two extra forwards per pair; 0 = off).
        max_new_tokens: the longest greedy answer (default: `data.sampling.max_new_tokens`).
        max_examples: evaluate the first N examples of the split (None = all; ultrachat's test split
            holds 23k prompts, each a greedy generation per iteration).
        select_by: the metric that picks the best iteration (`best/`): `accuracy` (higher is better;
            ties go to the lower nll), `nll` (lower is better), or `auto`: accuracy where answers can be
            checked (the embedded task), else nll. Chosen on the validation split only.
        patience: stop iterating once the best iteration is this many iterations old (None: run
            every iteration). Needs `every_iteration` and the validation split.
        judge: a reward model (local folder or hub id of a Hugging Face sequence-classification model
            with one label) that scores every evaluation's answers: win rates of the policy against the
            gold responses and against the initial model's answers (`judge.py`; None = off).
    """

    split: str = "validation"
    every_iteration: bool = True
    heldout_reward_pairs: int = 24
    max_new_tokens: int | None = None
    max_examples: int | None = None
    select_by: str = AUTO
    patience: int | None = None
    judge: str | None = None

    def selection_metric(self, answers_checked: bool) -> str:
        """The metric `select_by` means for a task whose answers are (or are not) checked."""
        if self.select_by == AUTO:
            return "accuracy" if answers_checked else "nll"
        return self.select_by

    def errors(self, prefix: str = "data.evaluation") -> list[str]:
        """Error strings for the bad fields (empty when all are fine)."""
        errors = []
        if self.split not in EVAL_SPLITS:
            errors.append(f"{prefix}.split: must be one of {EVAL_SPLITS}, got {self.split!r}")
        if self.heldout_reward_pairs < 0:
            errors.append(f"{prefix}.heldout_reward_pairs: must be >= 0, got {self.heldout_reward_pairs}")
        for name in ("max_new_tokens", "max_examples", "patience"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                errors.append(f"{prefix}.{name}: must be >= 1, got {getattr(self, name)}")
        if self.select_by not in SELECTION_METRICS:
            errors.append(f"{prefix}.select_by: must be one of {SELECTION_METRICS}, got {self.select_by!r}")
        if self.patience is not None and self.split != "validation":
            errors.append(
                f"{prefix}.patience: early stopping decides on the evaluation split, here {self.split!r}: "
                "that would tune on the test split; set data.evaluation.split: validation"
            )
        if self.patience is not None and not self.every_iteration:
            errors.append(f"{prefix}.patience: needs data.evaluation.every_iteration: true")
        if self.judge is not None:
            errors += judge_errors(self.judge, f"{prefix}.judge")
        return errors


def per_iteration(value, iteration: int):
    """`value` at `iteration`: a single value is the same for all, a list holds one per iteration."""
    return value[min(iteration, len(value) - 1)] if isinstance(value, (list, tuple)) else value


def per_iteration_errors(field: str, value, num_iterations: int) -> list[str]:
    """Errors of a float-or-list-per-iteration setting: the list's length, and every value > 0."""
    values = value if isinstance(value, (list, tuple)) else [value]
    errors = []
    if isinstance(value, (list, tuple)) and len(values) != num_iterations:
        errors.append(f"{field}: has {len(values)} values for {num_iterations} iterations (model.num_iterations)")
    if any(v <= 0 for v in values):
        errors.append(f"{field}: must be > 0, got {value}")
    return errors


def dtype_errors(field: str, value: str) -> list[str]:
    """Errors of a dtype setting (`auto` or a dtype name)."""
    return [] if value in (AUTO, *DTYPE_NAMES) else [f"{field}: must be one of {(AUTO, *DTYPE_NAMES)}, got {value!r}"]


def model_path_errors(name_or_path: str, embedded: tuple[str, ...]) -> list[str]:
    """Local folders are checked now; embedded names are built and hub ids fetched when the run starts."""
    path = Path(name_or_path).expanduser()
    if name_or_path in embedded or not (path.exists() or name_or_path.startswith((".", "/", "~"))):
        return []
    field = "model.model_name_or_path"
    if not path.is_dir():
        return [f"{field}: folder {str(path)!r} does not exist"]
    if not (path / "config.json").is_file():
        return [f"{field}: {str(path)!r} has no config.json (not a Hugging Face model folder)"]
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return [f"{field}: {str(path)!r} has no tokenizer (tokenizer.json / tokenizer_config.json)"]
    config = path / "tokenizer_config.json"
    has_template = (
        (path / "chat_template.jinja").is_file()
        or (path / "chat_template.json").is_file()
        or (config.is_file() and "chat_template" in config.read_text())
    )
    if not has_template:
        return [f"{field}: the tokenizer in {str(path)!r} has no chat template; prompts are rendered with it"]
    return []


def judge_errors(name_or_path: str, field: str) -> list[str]:
    """A judge must be a reward model: a model whose config says it is a sequence classifier with one
    label (its score), with a tokenizer. Read from its config (no weights) when the config is parsed, not
    found out at the first evaluation; a hub id that is neither cached nor reachable is an error too."""
    from transformers import AutoConfig

    path = Path(name_or_path).expanduser()
    if name_or_path.startswith((".", "/", "~")) and not path.exists():
        return [f"{field}: folder {str(path)!r} does not exist"]
    source = str(path) if path.exists() else name_or_path
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError, KeyError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return [f"{field}: cannot read a model config from {name_or_path!r} ({reason})"]
    architectures = config.architectures or []
    if not any(name.endswith("ForSequenceClassification") for name in architectures):
        return [
            f"{field}: {name_or_path!r} is {', '.join(architectures) or 'a ' + config.model_type + ' model'}, "
            "not a reward model (a sequence-classification model with one label, AutoModelForSequenceClassification)"
        ]
    if config.num_labels != 1:
        return [f"{field}: {name_or_path!r} has {config.num_labels} labels; a reward model has 1 (its score)"]
    tokenizer_files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt", "spm.model")
    if path.is_dir() and not any((path / name).is_file() for name in tokenizer_files):
        return [f"{field}: {str(path)!r} has no tokenizer (tokenizer.json / tokenizer_config.json)"]
    return []


def attention_errors(attn_implementation: str, require_flash_attention: bool) -> list[str]:
    """Errors of the attention settings; flash_attention_2 is checked only when it is required."""
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        return [f"model.attn_implementation: must be one of {ATTN_IMPLEMENTATIONS}, got {attn_implementation!r}"]
    if attn_implementation == "flash_attention_2" and require_flash_attention:
        return _flash_attention_errors()
    return []


def attention_implementation(requested: str) -> str:
    """What to load the model with: flash_attention_2 falls back to sdpa, with a warning, where it
    cannot run (`model.require_flash_attention` makes that an error in `attention_errors` instead)."""
    if requested == "flash_attention_2":
        problems = _flash_attention_errors()
        if problems:
            warnings.warn(
                f"{problems[0]}; falling back to sdpa (set model.require_flash_attention to make this an error)",
                stacklevel=2,
            )
            return "sdpa"
    return requested


def quantization_errors(load_in_4bit: bool) -> list[str]:
    """4-bit loading needs bitsandbytes."""
    if load_in_4bit and importlib.util.find_spec("bitsandbytes") is None:
        return ["model.load_in_4bit: needs bitsandbytes (pip install bitsandbytes) or set it to false"]
    return []


def deepspeed_errors(zero_stage_3: bool, load_in_4bit: bool, optimizer: str) -> list[str]:
    """What DeepSpeed cannot combine with: a 4-bit base under ZeRO-3, an optimizer of our own."""
    errors = []
    if zero_stage_3 and load_in_4bit:
        errors.append(
            "model.load_in_4bit: bitsandbytes 4-bit weights are not partitioned by ZeRO-3 here; use "
            "trainer.strategy deepspeed_stage_2 or ddp (a 4-bit 7B base fits one 24 GB GPU), or a bf16 base"
        )
    if optimizer != "adamw":
        errors.append(
            f"model.optimizer.name: {optimizer} is not supported under DeepSpeed (which shards the optimizer itself); use adamw"
        )
    return errors


def output_dir_errors(root: str) -> list[str]:
    """The run directory must be writable before hours of generation are spent."""
    try:
        os.makedirs(root, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root):
            pass
    except OSError as err:
        return [f"trainer.default_root_dir: {root!r} is not writable ({err.strerror})"]
    return []


def _paged_optimizer_errors(name: str, prefix: str) -> list[str]:
    import torch

    if importlib.util.find_spec("bitsandbytes") is None:
        return [f"{prefix}.name: {name} needs bitsandbytes (pip install bitsandbytes)"]
    if not torch.cuda.is_available():
        return [
            f"{prefix}.name: {name} pages optimizer state between GPU and CPU memory and needs a CUDA GPU; use adamw"
        ]
    return []


def _vllm_errors(prefix: str) -> list[str]:
    import torch

    if importlib.util.find_spec("vllm") is None:
        return [f"{prefix}.engine: vllm needs the vllm package (pip install 'lowrank_spin[vllm]'); use hf"]
    if not torch.cuda.is_available():
        return [f"{prefix}.engine: vllm needs a CUDA GPU; use hf on this machine"]
    return []


def _flash_attention_errors() -> list[str]:
    import torch

    if importlib.util.find_spec("flash_attn") is None:
        return [
            "model.attn_implementation: flash_attention_2 needs the flash-attn package (pip install 'lowrank_spin[gpu]'); use sdpa"
        ]
    if not torch.cuda.is_available():
        return ["model.attn_implementation: flash_attention_2 needs a CUDA GPU; use sdpa on this machine"]
    major, _ = torch.cuda.get_device_capability()
    if major < 8:
        return [
            f"model.attn_implementation: flash_attention_2 needs an Ampere or newer GPU (compute capability 8.0+), found {major}.x"
        ]
    return []
