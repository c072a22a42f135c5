"""Fail fast: every bad setting reported together, each naming its config field, before any long work."""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Mapping

from lowrank_spin.losses import LOSS_TYPES, OBJECTIVES
from lowrank_spin.models import AUTO, DTYPES

ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2")
OPTIMIZERS = ("adamw", "paged_adamw_8bit", "paged_adamw_32bit")  # paged: bitsandbytes, CUDA only


class ConfigError(ValueError):
    """One error for all the bad fields of a config; `.errors` lists them."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {e}" for e in errors))


def raise_if_any(errors: list[str]) -> None:
    if errors:
        raise ConfigError(errors)


def validate_module_args(hp: Mapping) -> None:
    errors: list[str] = []
    if hp["objective"] not in OBJECTIVES:
        errors.append(f"model.objective: must be one of {OBJECTIVES}, got {hp['objective']!r}")
    if hp["loss_type"] not in LOSS_TYPES:
        errors.append(f"model.loss_type: must be one of {LOSS_TYPES}, got {hp['loss_type']!r}")
    if hp["num_iterations"] < 1:
        errors.append(f"model.num_iterations: must be >= 1, got {hp['num_iterations']}")
    if hp["epochs_per_iteration"] < 1:
        errors.append(f"model.epochs_per_iteration: must be >= 1, got {hp['epochs_per_iteration']}")
    for field in ("beta", "learning_rate"):
        errors += _per_iteration_errors(field, hp[field], hp["num_iterations"])
    for field in ("lora_rank", "lora_alpha", "tspin_alpha"):
        if hp[field] <= 0:
            errors.append(f"model.{field}: must be > 0, got {hp[field]}")
    for field in ("tspin_beta", "nll_weight", "weight_decay", "real_drift_warning"):
        if hp[field] < 0:
            errors.append(f"model.{field}: must be >= 0, got {hp[field]}")
    if not 0 <= hp["lora_dropout"] < 1:
        errors.append(f"model.lora_dropout: must be in [0, 1), got {hp['lora_dropout']}")
    for field in ("dtype", "compute_dtype"):
        if hp[field] not in (AUTO, *DTYPES):
            errors.append(f"model.{field}: must be one of {(AUTO, *DTYPES)}, got {hp[field]!r}")
    if hp["load_in_4bit"] and importlib.util.find_spec("bitsandbytes") is None:
        errors.append("model.load_in_4bit: needs bitsandbytes (pip install bitsandbytes) or set it to false")
    if hp["attn_implementation"] not in ATTN_IMPLEMENTATIONS:
        errors.append(f"model.attn_implementation: must be one of {ATTN_IMPLEMENTATIONS}, got {hp['attn_implementation']!r}")
    elif hp["attn_implementation"] == "flash_attention_2" and hp["require_flash_attention"]:
        errors += _flash_attention_errors()
    if hp["optimizer"] not in OPTIMIZERS:
        errors.append(f"model.optimizer: must be one of {OPTIMIZERS}, got {hp['optimizer']!r}")
    elif hp["optimizer"].startswith("paged"):
        errors += _paged_optimizer_errors(hp["optimizer"])
    errors += _model_path_errors(hp["model_name_or_path"])
    raise_if_any(errors)


def _model_path_errors(name_or_path: str) -> list[str]:
    """Local folders are checked now; embedded names are built and hub ids fetched when the run starts."""
    from pathlib import Path

    from lowrank_spin.models import EMBEDDED_MODELS

    path = Path(name_or_path).expanduser()
    if name_or_path in EMBEDDED_MODELS or not (path.exists() or name_or_path.startswith((".", "/", "~"))):
        return []
    field = "model.model_name_or_path"
    if not path.is_dir():
        return [f"{field}: folder {str(path)!r} does not exist"]
    if not (path / "config.json").is_file():
        return [f"{field}: {str(path)!r} has no config.json (not a Hugging Face model folder)"]
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return [f"{field}: {str(path)!r} has no tokenizer (tokenizer.json / tokenizer_config.json)"]
    config = path / "tokenizer_config.json"
    has_template = (path / "chat_template.jinja").is_file() or (path / "chat_template.json").is_file() or (
        config.is_file() and "chat_template" in config.read_text()
    )
    if not has_template:
        return [f"{field}: the tokenizer in {str(path)!r} has no chat template; prompts are rendered with it"]
    return []


def validate_output_dir(root: str) -> None:
    """The run directory must be writable before hours of generation are spent."""
    import os
    import tempfile

    try:
        os.makedirs(root, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root):
            pass
    except OSError as err:
        raise ConfigError([f"trainer.default_root_dir: {root!r} is not writable ({err.strerror})"]) from err


def _per_iteration_errors(field: str, value, num_iterations: int) -> list[str]:
    values = value if isinstance(value, (list, tuple)) else [value]
    errors = []
    if isinstance(value, (list, tuple)) and len(values) != num_iterations:
        errors.append(f"model.{field}: has {len(values)} values for {num_iterations} iterations (model.num_iterations)")
    if any(v <= 0 for v in values):
        errors.append(f"model.{field}: must be > 0, got {value}")
    return errors


def attention_implementation(hp: Mapping) -> str:
    """What to load the model with: flash_attention_2 falls back to sdpa, with a warning, where it
    cannot run (unless `model.require_flash_attention`, which makes that an error in validation)."""
    if hp["attn_implementation"] == "flash_attention_2":
        problems = _flash_attention_errors()
        if problems:
            warnings.warn(f"{problems[0]}; falling back to sdpa (set model.require_flash_attention to make this an error)", stacklevel=2)
            return "sdpa"
    return hp["attn_implementation"]


def _paged_optimizer_errors(name: str) -> list[str]:
    import torch

    if importlib.util.find_spec("bitsandbytes") is None:
        return [f"model.optimizer: {name} needs bitsandbytes (pip install bitsandbytes)"]
    if not torch.cuda.is_available():
        return [f"model.optimizer: {name} pages optimizer state between GPU and CPU memory and needs a CUDA GPU; use adamw"]
    return []


def _flash_attention_errors() -> list[str]:
    import torch

    if importlib.util.find_spec("flash_attn") is None:
        return ["model.attn_implementation: flash_attention_2 needs the flash-attn package (pip install 'lowrank_spin[gpu]'); use sdpa"]
    if not torch.cuda.is_available():
        return ["model.attn_implementation: flash_attention_2 needs a CUDA GPU; use sdpa on this machine"]
    major, _ = torch.cuda.get_device_capability()
    if major < 8:
        return [f"model.attn_implementation: flash_attention_2 needs an Ampere or newer GPU (compute capability 8.0+), found {major}.x"]
    return []
