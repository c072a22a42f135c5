"""The CUDA paths, for real where a GPU is present (`requires_cuda`; skipped elsewhere).

scripts/gpu_check.sh runs these first on a GPU machine; on the CPU machines this project is developed
on they are skipped, and the README says so. The last tests run anywhere: the GPU check's scripts parse,
name what is missing, and run through on CPU with a fake vLLM.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import chat_batch, dequantized_reference, randomize_lora
from test_generation import fake_vllm  # noqa: F401 (a fixture)

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


# ---- scripts/gpu_check.sh and scripts/vllm_check.py, on any machine -------------------------------------

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def test_gpu_check_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPTS / "gpu_check.sh")], check=True)


@pytest.mark.skipif(
    torch.cuda.is_available() and importlib.util.find_spec("vllm") is not None, reason="it can run here"
)
def test_vllm_check_names_what_is_missing():
    done = subprocess.run([sys.executable, str(SCRIPTS / "vllm_check.py")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "vllm_check: cannot run here:" in done.stderr and "nothing was measured" in done.stderr
    assert ("no CUDA" in done.stderr) == (not torch.cuda.is_available())
    assert ("vLLM not installed" in done.stderr) == (importlib.util.find_spec("vllm") is None)


def test_vllm_check_runs_through_with_a_fake_vllm_on_cpu(tiny_model_dir, fake_vllm, monkeypatch):  # noqa: F811
    """The check's whole path on the tiny model, with the fake vLLM and CUDA's calls stubbed: it gets one
    short run on a GPU, so a mistake in its plumbing should show here first. The fake's log-probs (-0.5
    per token) are not the model's: the numbers are meaningless, the report's shape is checked."""
    spec = importlib.util.spec_from_file_location("vllm_check", SCRIPTS / "vllm_check.py")
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    monkeypatch.setattr(torch.nn.Module, "cuda", lambda self, *args, **kwargs: self)
    for name, value in {
        "synchronize": lambda: None,
        "mem_get_info": lambda: (2**30, 2**31),
        "get_device_name": lambda index=0: "fake GPU",
        "max_memory_allocated": lambda: 0,
    }.items():
        monkeypatch.setattr(torch.cuda, name, value)
    report = check.run_check(tiny_model_dir, num_prompts=2, max_new_tokens=3, seed=0)
    assert [r["lora_request"]["id"] for r in report["rounds"]] == sorted(
        {r["lora_request"]["id"] for r in report["rounds"]}
    )
    assert all(r["vllm_vs_training_model"]["tokens"] > 0 for r in report["rounds"])
    init = [e for e in fake_vllm if e[0] == "init"]
    assert len(init) == 1 and init[0][1]["quantization"] == "bitsandbytes"
    assert len(check.summary_lines(report)) == 8  # a heading, two per adapter, three more
