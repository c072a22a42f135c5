"""The CUDA paths, for real where a GPU is present (`requires_cuda`; skipped elsewhere).

scripts/gpu_check.sh runs these first on a GPU machine; on the CPU machines this project is developed
on they are skipped, and the README says so.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import chat_batch, dequantized_reference, randomize_lora

from lowrank_spin import batching, models
from lowrank_spin.generation import generate_responses
from lowrank_spin.settings import LoRASettings, SamplingSettings

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
PROMPTS = ["What is 12 + 7?", "Tom has 3 apples and buys 4 more. How many apples does he have?"]
RESPONSES = ["12 + 7 = 19.\nThe answer is 19.", "3 + 4 = 7.\nThe answer is 7."]


def _lora_grads(model, batch):
    model.zero_grad()
    logps = batching.response_logps(model, {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()})
    (-logps.sum()).backward()
    return {n: p.grad.float().cpu().clone() for n, p in models.lora_parameters(model).items()}


@pytest.mark.requires_cuda
@requires_cuda
def test_cuda_nf4_lora_gradients_match_the_dequantized_base_after_generation(tiny_model_dir, tokenizer):
    """bitsandbytes' CUDA nf4 kernels: LoRA gradients equal those over the dequantized weights, also
    after an eval-mode generation (the trap the CPU backend has)."""
    quantized = models.attach_lora(
        models.load_base_model(tiny_model_dir, load_in_4bit=True, compute_dtype="float32").cuda(),
        LoRASettings(rank=4, alpha=8),
    )
    randomize_lora(quantized)
    reference = dequantized_reference(tiny_model_dir, quantized, device="cuda")
    batch = chat_batch(tokenizer, PROMPTS, RESPONSES)
    generate_responses(quantized, tokenizer, [batch["input_ids"][0, :10].tolist()], SamplingSettings(max_new_tokens=4))
    quantized.train()
    got, want = _lora_grads(quantized, batch), _lora_grads(reference, batch)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.requires_cuda
@requires_cuda
@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="flash-attn not installed")
def test_flash_attention_2_gives_the_log_probs_of_sdpa(tiny_model_dir, tokenizer):
    batch = chat_batch(tokenizer, PROMPTS, RESPONSES)
    logps = {}
    for implementation in ("sdpa", "flash_attention_2"):
        base = models.load_base_model(tiny_model_dir, dtype="bfloat16", attn_implementation=implementation).cuda()
        with torch.no_grad():
            logps[implementation] = batching.response_logps(
                base, {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
            )
    torch.testing.assert_close(logps["flash_attention_2"], logps["sdpa"], rtol=2e-2, atol=0.5)
