"""Tiny models built in-test: no download, seconds on a CPU."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

from lowrank_spin import models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_configure(config):
    torch.set_num_threads(min(2, os.cpu_count() or 1))
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
