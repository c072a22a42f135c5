"""Tiny models built in-test: no download, seconds on a CPU."""

from __future__ import annotations

import os
import sys
import warnings

import pytest
import torch

from lowrank_spin import models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny_spin.yaml")


def fit_args(run_dir, *overrides: str, csv_logs: bool = True) -> list[str]:
    """`fit` of the tiny config into `run_dir` (with its CSV logs there too, unless `csv_logs` is off)."""
    logs = ["--trainer.logger.init_args.save_dir", str(run_dir)] if csv_logs else []
    return ["fit", "--config", TINY, "--trainer.default_root_dir", str(run_dir), *logs, *overrides]


def fit_command(args: list[str]) -> list[str]:
    """The command line that runs the CLI with `args` in a fresh Python process."""
    return [sys.executable, "-m", "lowrank_spin.cli", *args]


def subprocess_env(cache_dir: str, **variables: str) -> dict[str, str]:
    """This process's environment for a child run: the test cache, one thread, no fault injection
    (unless `variables` set one), plus `variables`."""
    env = {k: v for k, v in os.environ.items() if k != "LOWRANK_SPIN_KILL_AT"}
    return {**env, "LOWRANK_SPIN_CACHE": cache_dir, "OMP_NUM_THREADS": "1", **variables}


def pytest_configure(config):
    # under pytest-xdist (a worker per core) one thread each: two multi-threaded torch processes on the
    # same cores stall each other at every parallel region
    torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, os.cpu_count() or 1))
    warnings.filterwarnings("ignore", message=".*kernels.*")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> str:
    """Embedded models are built into a per-session cache, never the user's."""
    path = str(tmp_path_factory.mktemp("cache"))
    os.environ["LOWRANK_SPIN_CACHE"] = path
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(cache_dir) -> str:
    return models.resolve_model_path(models.TINY_LLAMA, cache_dir)


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    return models.load_tokenizer(tiny_model_dir)


def randomize_lora(model, seed: int = 0, scale: float = 0.1) -> None:
    """LoRA B starts at zero (Δθ0 = 0); give every adapter weight a value so gradients reach A too."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)


def chat_batch(tokenizer, prompts: list[str], responses: list[str]) -> dict:
    from lowrank_spin.batching import Collator
    from lowrank_spin.data.chat import render_prompt, response_ids

    examples = [
        {"prompt_ids": render_prompt(tokenizer, p), "real_ids": response_ids(tokenizer, r, True)}
        for p, r in zip(prompts, responses)
    ]
    return Collator(tokenizer.pad_token_id, ("real",))(examples)


def dequantized_reference(tiny_model_dir, quantized, device: str = "cpu"):
    """The same LoRA model over a plain float32 base whose weights are `quantized`'s nf4 weights dequantized."""
    import bitsandbytes.functional as bnbf

    from lowrank_spin.settings import LoRASettings

    reference = models.attach_lora(
        models.load_base_model(tiny_model_dir, dtype="float32").to(device), LoRASettings(rank=4, alpha=8)
    )
    quantized_modules = dict(quantized.named_modules())
    with torch.no_grad():
        for name, module in reference.named_modules():
            source = quantized_modules.get(name)
            if hasattr(source, "weight") and hasattr(source.weight, "quant_state"):
                module.weight.copy_(bnbf.dequantize_4bit(source.weight.data, source.weight.quant_state).float())
        reference.load_state_dict({n: p for n, p in quantized.state_dict().items() if "lora_" in n}, strict=False)
    return reference
