"""The expected peak memory: its parts follow the settings as the module docstring says, a run that
would not fit stops with one message before generating anything, and one that fits says its estimate."""

from __future__ import annotations

import pytest
from conftest import fit_args
from transformers import LlamaConfig

from lowrank_spin import memory
from lowrank_spin.cli import build_cli
from lowrank_spin.settings import LoRASettings, SamplingSettings

GIB = memory.GIB
# hidden 64, 2 layers, 4 heads of 16 (2 kv heads), MLP 128, vocabulary 1000, tied embeddings
CONFIG = LlamaConfig(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    vocab_size=1000,
    tie_word_embeddings=True,
)


def _estimate(**overrides) -> memory.PeakEstimate:
    settings = dict(
        load_in_4bit=False,
        dtype="float32",
        lora=LoRASettings(rank=4),
        sampling=SamplingSettings(batch_size=2, max_new_tokens=10),
        train_batch_size=2,
        responses_per_example=2,
        prompt_length=20,
        response_length=12,
    )
    return memory.estimate_peak(CONFIG, **{**settings, **overrides})


def test_weights_and_lora_by_hand():
    # per layer: q 64x64, k and v 64x32, o 64x64, gate and up 64x128, down 128x64 -> 36864 weights
    # plain float32: 2 * 36864 linear weights + 1000 * 64 tied embeddings + 2 norms of 64 per layer
    assert _estimate().weights == (2 * 36864 + 64000 + 2 * 2 * 64) * 4
    # nf4: 0.5 byte + 1/16 byte of scale per linear weight; the rest in the compute dtype (bf16)
    assert _estimate(load_in_4bit=True, dtype="bfloat16").weights == int(2 * 36864 * 0.5625 + (64000 + 256) * 2)
    # LoRA r=4 on the 7 linear layers: 4 * (in + out) each, 4 * 1024 per layer; 5 float32 copies
    # (policy and opponent weights, the policy's gradient and two Adam moments)
    assert _estimate().lora == 2 * 4 * 1024 * 4 * 5


def test_parts_follow_the_settings():
    base = _estimate()
    # the KV cache: 2 (k, v) x layers x rows x kv heads x head dim x (prompt + new tokens, in 64s) x 4 bytes
    assert base.generation == 2 * 2 * 2 * 2 * 16 * 64 * 4 + 3 * 2 * 1000 * 4
    assert _estimate(sampling=SamplingSettings(batch_size=4, max_new_tokens=10)).generation > base.generation
    assert _estimate(train_batch_size=4).training > base.training
    assert _estimate(gradient_checkpointing=True).training < base.training
    assert _estimate(responses_per_example=3).training > base.training
    # generation and training never hold their buffers at once
    assert base.total == base.weights + base.lora + max(base.generation, base.training) + memory.RUNTIME_BYTES


def test_available_bytes_reads_meminfo():
    meminfo = "MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:   20000000 kB\n"
    available = memory.available_bytes(meminfo)
    assert available is not None and available <= 20000000 * 1024


def test_the_error_names_the_levers_and_the_numbers():
    estimate = memory.PeakEstimate(weights=GIB, lora=0, generation=GIB // 2, training=4 * GIB)
    assert memory.peak_memory_errors(estimate, 16 * GIB) == []
    assert memory.peak_memory_errors(estimate, None) == []  # unknown: no refusal
    (error,) = memory.peak_memory_errors(estimate, 4 * GIB)
    assert "6.0 GB" in error and "4.0 GB" in error
    assert "data.batch_size" in error and "model.gradient_checkpointing" in error
    (error,) = memory.peak_memory_errors(estimate, 10 * GIB, processes=2)  # 2 CPU processes: 12 GB
    assert "in each of 2 processes" in error
    # what each process already holds (the model loaded) is no longer in `available`: 2 x (6 - 2) = 8 GB fit
    assert memory.peak_memory_errors(estimate, 10 * GIB, processes=2, in_use=2 * GIB) == []


def test_a_run_that_would_not_fit_stops_before_generating(tmp_path, cache_dir, monkeypatch, capsys):
    monkeypatch.setattr(memory, "available_bytes", lambda: 100 * 1024**2)  # a 100 MB machine
    with pytest.raises(SystemExit) as stopped:
        build_cli(fit_args(tmp_path))
    assert stopped.value.code == 1
    err = capsys.readouterr().err
    assert "memory: this run is expected to peak at" in err and "100 MB" not in err
    assert "0.1 GB this machine has available" in err
    assert not (tmp_path / "iter_0").exists(), "nothing generated"


def test_a_run_that_fits_states_its_estimate(tmp_path, cache_dir, monkeypatch, capsys):
    monkeypatch.setattr(memory, "available_bytes", lambda: 100 * 1024**2)
    monkeypatch.setenv("LOWRANK_SPIN_SKIP_MEMORY_CHECK", "1")  # the way round a refusal
    build_cli(fit_args(tmp_path, "--model.num_iterations", "1"))
    assert "memory: expected peak" in capsys.readouterr().out
    assert (tmp_path / "iter_0" / "adapter_model.safetensors").exists()


# Run in a fresh interpreter: glibc's heap there is in a known state, not shaped by earlier tests.
# 4000 tensors of 64 KB (below glibc's mmap threshold: heap memory), each followed by a small one
# that is kept: the freed ones sit between live memory, where glibc does not give pages back itself.
_FREED_HEAP = """
import torch
from lowrank_spin import memory

pairs = [(torch.ones(16 * 1024), torch.ones(16)) for _ in range(4000)]
kept = [small for _, small in pairs]
del pairs
before = memory.resident_bytes()
memory.release_freed_memory()
print(before, memory.resident_bytes(), len(kept))
"""


def test_freed_heap_memory_goes_back_to_the_os():
    """What a training step frees stays in glibc's heap (RSS) until `release_freed_memory`."""
    import ctypes
    import subprocess
    import sys

    try:
        assert ctypes.CDLL("libc.so.6").malloc_trim is not None
    except (OSError, AttributeError):
        pytest.skip("not glibc")
    done = subprocess.run([sys.executable, "-c", _FREED_HEAP], capture_output=True, text=True, check=True)
    before, after, kept = map(int, done.stdout.split())
    assert kept == 4000
    assert before - after > 150 * 1024**2, f"the ~250 MB freed stayed resident ({before} -> {after} bytes)"


def test_a_run_that_would_not_fit_its_gpu_is_refused_naming_the_levers(monkeypatch):
    """On a GPU the estimate is held against the card's free memory (`torch.cuda.mem_get_info`), less
    what this process already holds there; the host runtime is not counted; settings already on are
    not suggested."""
    import torch

    estimate = _estimate(device_type="cuda")
    assert estimate.runtime == 0 and _estimate().runtime == memory.RUNTIME_BYTES
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (estimate.total + 1, 80 * GIB))
    assert memory.device_memory_errors(estimate, gpu) == []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (estimate.total // 2, 80 * GIB))
    (error,) = memory.device_memory_errors(estimate, gpu, processes=8)  # one GPU per process: not multiplied
    assert "GPU cuda:0 has free" in error and "in each of" not in error
    for lever in ("data.batch_size", "trainer.accumulate_grad_batches", "model.gradient_checkpointing: true"):
        assert lever in error
    assert "data.max_prompt_length / data.max_response_length" in error and "LOWRANK_SPIN_SKIP_MEMORY_CHECK=1" in error
    (error,) = memory.device_memory_errors(estimate, gpu, gradient_checkpointing=True)
    assert "model.gradient_checkpointing" not in error, "already on"
    # the model already loaded on the card (the allocator's reserve) is part of the estimate, not extra
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: estimate.total // 2)
    assert memory.device_memory_errors(estimate, gpu) == []

    # weights dominate: the 4-bit base is suggested, unless it is already 4-bit; ZeRO-3 shares the weights
    big = memory.PeakEstimate(weights=40 * GIB, lora=GIB, generation=GIB, training=2 * GIB, runtime=0)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (20 * GIB, 80 * GIB))
    assert "model.load_in_4bit: true" in memory.device_memory_errors(big, gpu)[0]
    assert "model.load_in_4bit" not in memory.device_memory_errors(big, gpu, load_in_4bit=True)[0]
    assert _estimate(weight_shards=4).weights == _estimate().weights // 4
