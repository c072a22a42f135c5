"""The 4-bit base, the LoRA policy/opponent adapters, and what must never change (the base)."""

from __future__ import annotations

import gc
import os
import warnings
from pathlib import Path

import pytest
import torch
from conftest import chat_batch, dequantized_reference, randomize_lora
from peft import PeftModel

from lowrank_spin import models
from lowrank_spin.batching import sequence_logps
from lowrank_spin.generation import generate_responses
from lowrank_spin.settings import LoRASettings, SamplingSettings

PROMPTS = ["What is 12 + 7?", "Tom has 3 apples and buys 4 more. How many apples does he have?"]
RESPONSES = ["12 + 7 = 19.\nThe answer is 19.", "3 + 4 = 7.\nThe answer is 7."]


def _lora_grads(model, batch) -> dict[str, torch.Tensor]:
    model.zero_grad()
    model.train()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    (-sequence_logps(logits, batch["labels"]).sum()).backward()
    return {n: p.grad.clone() for n, p in models.lora_parameters(model).items()}


@pytest.fixture()
def quantized_and_reference(tiny_model_dir):
    quantized = models.attach_lora(
        models.load_base_model(tiny_model_dir, load_in_4bit=True, compute_dtype="float32"),
        LoRASettings(rank=4, alpha=8),
    )
    randomize_lora(quantized)
    return quantized, dequantized_reference(tiny_model_dir, quantized)


def _assert_grads_match(quantized, reference, batch):
    got, expected = _lora_grads(quantized, batch), _lora_grads(reference, batch)
    assert got.keys() == expected.keys() and got
    for name in got:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-3, atol=1e-5, msg=name)


def test_4bit_lora_gradients_match_dequantized_reference_after_generation(quantized_and_reference, tokenizer):
    """Regression test for the CPU repack trap: an eval-mode no-grad forward (generation, validation)
    repacks bitsandbytes 4-bit weights onto a path without autograd unless it is switched off."""
    quantized, reference = quantized_and_reference
    batch = chat_batch(tokenizer, PROMPTS, RESPONSES)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*autograd kernel was not registered.*")
        _assert_grads_match(quantized, reference, batch)
        generate_responses(
            quantized, tokenizer, [batch["input_ids"][0, :10].tolist()], SamplingSettings(max_new_tokens=4)
        )
        with torch.no_grad():  # a validation-style forward too
            quantized.eval()
            quantized(input_ids=batch["input_ids"])
        _assert_grads_match(quantized, reference, batch)


def test_every_4bit_layer_has_cpu_repack_disabled(tiny_model_dir):
    model = models.load_base_model(tiny_model_dir, load_in_4bit=True)
    layers = [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    assert len(layers) == 2 * 7  # 2 decoder layers x (q, k, v, o, gate, up, down)
    assert not any(m.support_avx512bf16_for_cpu for m in layers)


@pytest.mark.parametrize("load_in_4bit", [False, True])
def test_training_changes_every_lora_parameter_and_no_base_parameter(tiny_model_dir, tokenizer, load_in_4bit):
    model = models.attach_lora(
        models.load_base_model(tiny_model_dir, load_in_4bit=load_in_4bit), LoRASettings(rank=4, alpha=8)
    )
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    policy_before = {n: p.detach().clone() for n, p in models.lora_parameters(model).items()}
    opponent_before = {n: p.detach().clone() for n, p in models.lora_parameters(model, models.OPPONENT).items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = chat_batch(tokenizer, PROMPTS, RESPONSES)
    for _ in range(3):
        _lora_grads(model, batch)
        optimizer.step()
    for name, param in model.named_parameters():
        if name in base_before:
            assert torch.equal(param, base_before[name]), f"base parameter {name} changed"
        elif name in opponent_before:
            assert torch.equal(param, opponent_before[name]), f"opponent parameter {name} changed"
        else:
            assert not torch.equal(param, policy_before[name]), f"LoRA parameter {name} did not change"
    assert set(policy_before) == {n for n, p in model.named_parameters() if p.requires_grad}


def _logps(model, batch):
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return sequence_logps(logits, batch["labels"])


def test_toggled_opponent_reproduces_previous_policy_exactly(tiny_model_dir, tokenizer):
    model = models.attach_lora(models.load_base_model(tiny_model_dir), LoRASettings(rank=4, alpha=8))
    randomize_lora(model)
    batch = chat_batch(tokenizer, PROMPTS, RESPONSES)
    previous_policy = _logps(model, batch)
    models.snapshot_opponent(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    _lora_grads(model, batch)
    optimizer.step()  # the policy moves one step away from its snapshot
    assert not torch.equal(_logps(model, batch), previous_policy)
    with models.opponent(model):
        assert torch.equal(_logps(model, batch), previous_policy)
        assert not any(p.requires_grad for p in model.parameters())
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(models.lora_parameters(model))


def test_opponent_with_adapters_disabled_is_the_base(tiny_model_dir, tokenizer):
    base = models.load_base_model(tiny_model_dir)
    batch = chat_batch(tokenizer, PROMPTS, RESPONSES)
    base_logps = _logps(base, batch)
    model = models.attach_lora(base, LoRASettings(rank=4, alpha=8))
    randomize_lora(model)
    assert not torch.equal(_logps(model, batch), base_logps)
    with models.opponent(model, adapters_disabled=True):
        assert torch.equal(_logps(model, batch), base_logps)


def test_saved_adapter_loads_with_peft(tiny_model_dir, tokenizer, tmp_path):
    model = models.attach_lora(models.load_base_model(tiny_model_dir), LoRASettings(rank=4, alpha=8))
    randomize_lora(model)
    batch = chat_batch(tokenizer, PROMPTS, RESPONSES)
    expected = _logps(model, batch)
    (tmp_path / "iter_0").mkdir()
    (tmp_path / "iter_0" / "synthetic.jsonl").write_text("{}\n")
    models.save_adapter(model, tmp_path / "iter_0")
    assert (tmp_path / "iter_0" / "synthetic.jsonl").exists(), "saving an adapter must keep the iteration's other files"
    assert not list((tmp_path / "iter_0").glob("*.bin")), "adapters are safetensors only"
    loaded = PeftModel.from_pretrained(models.load_base_model(tiny_model_dir), tmp_path / "iter_0")
    torch.testing.assert_close(_logps(loaded, batch), expected)
    # and as the initial adapter of a new run (e.g. SPIN after SFT)
    resumed = models.attach_lora(
        models.load_base_model(tiny_model_dir), LoRASettings(init_adapter=str(tmp_path / "iter_0"))
    )
    torch.testing.assert_close(_logps(resumed, batch), expected)
    with models.opponent(resumed):  # iteration 0 plays against the initial adapter, not the bare base
        torch.testing.assert_close(_logps(resumed, batch), expected)
    assert all(p.requires_grad for p in models.lora_parameters(resumed).values())


def test_portable_base_names():
    assert models.portable_base_name(models.SMOLLM2) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert models.portable_base_name("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
    assert models.portable_base_name("models/my-sft") == "models/my-sft", "a local folder as the user wrote it"


def test_resolve_model_path_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.model_name_or_path"):
        models.resolve_model_path(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        models.resolve_model_path(str(tmp_path))
    assert models.resolve_model_path("HuggingFaceH4/zephyr-7b-sft-full") == "HuggingFaceH4/zephyr-7b-sft-full"


def _cpu_has_avx512bf16() -> bool:
    from bitsandbytes.functional import has_avx512bf16  # the probe bitsandbytes itself uses

    return bool(has_avx512bf16())


@pytest.mark.skipif(not _cpu_has_avx512bf16(), reason="the repack trap exists only on CPUs with AVX512-BF16")
def test_gradient_check_catches_the_repack_trap(quantized_and_reference, tokenizer):
    """Negative control: with the repack left on (bitsandbytes' default), the check above fails."""
    quantized, reference = quantized_and_reference
    for module in quantized.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = True
    batch = chat_batch(tokenizer, PROMPTS, RESPONSES)
    with torch.no_grad():
        quantized.eval()
        quantized(input_ids=batch["input_ids"])
    with pytest.raises((AssertionError, UserWarning)), warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*autograd kernel was not registered.*")
        _assert_grads_match(quantized, reference, batch)


def test_lm_head_input_is_made_contiguous(tiny_model_dir):
    """logits_to_keep's strided slice reaches the head as a contiguous tensor (no weight broadcast)."""
    model = models.load_base_model(tiny_model_dir)
    seen = []
    model.get_output_embeddings().register_forward_pre_hook(lambda module, args: seen.append(args[0].is_contiguous()))
    model(input_ids=torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]]), logits_to_keep=2)
    assert seen == [True]


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the process's memory mappings (Linux)")
def test_4bit_load_releases_the_checkpoint_mapping(tiny_model_dir, tmp_path):
    """Unquantised tensors loaded from a checkpoint already in the compute dtype are views of the
    memory-mapped file; they are copied so the file's pages are not kept resident after the load."""
    bf16_dir = tmp_path / "bf16"
    models.load_base_model(tiny_model_dir, dtype="bfloat16").save_pretrained(bf16_dir)
    model = models.load_base_model(str(bf16_dir), load_in_4bit=True, compute_dtype="bfloat16")
    gc.collect()
    mapped = [line for line in Path("/proc/self/maps").read_text().splitlines() if str(bf16_dir) in line]
    assert mapped == []
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16


# A CPU without native bf16 (AMD EPYC, Zen 3: AVX2 only) and one with it (Sapphire Rapids), as /proc/cpuinfo has them.
ZEN3_CPUINFO = "processor\t: 0\nflags\t\t: fpu sse sse2 avx f16c fma avx2 bmi2 sha_ni vaes vpclmulqdq\n"
SPR_CPUINFO = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_bf16 amx_bf16 amx_tile\n"


def test_auto_dtype_is_float32_without_native_bf16_and_bf16_with_it(monkeypatch):
    assert models.cpu_bf16_flags(ZEN3_CPUINFO) == []
    assert models.cpu_bf16_flags(SPR_CPUINFO) == ["avx512_bf16", "amx_bf16"]
    assert models.cpu_bf16_flags("Features\t: fp asimd bf16 i8mm\n") == ["bf16"]  # ARMv8.6
    monkeypatch.setattr(models, "cpu_bf16_flags", lambda: [])
    assert models.choose_dtype("auto", "cpu")[0] == "float32"
    assert models.choose_dtype("bfloat16", "cpu") == ("bfloat16", "set in the config"), "an explicit dtype is kept"
    monkeypatch.setattr(models, "cpu_bf16_flags", lambda: ["avx512_bf16"])
    assert models.choose_dtype("auto", "cpu")[0] == "bfloat16"


@pytest.mark.parametrize("load_in_4bit", [False, True])
def test_module_loads_the_auto_dtype_and_says_so(load_in_4bit, monkeypatch, tiny_model_dir, capsys):
    from lowrank_spin.module import SelfPlayLoRA

    monkeypatch.setattr(models, "cpu_bf16_flags", lambda: [])  # an AVX2-only CPU
    module = SelfPlayLoRA(
        model_name_or_path=tiny_model_dir, load_in_4bit=load_in_4bit, lora=LoRASettings(rank=4, alpha=8)
    )
    module.configure_model()
    field = "compute_dtype" if load_in_4bit else "dtype"
    assert f"model.{field}: float32 (auto: this CPU has no native bf16" in capsys.readouterr().out
    base = module.model.get_base_model()
    assert base.get_input_embeddings().weight.dtype == torch.float32
    if load_in_4bit:
        import bitsandbytes as bnb

        layers = [m for m in base.modules() if isinstance(m, bnb.nn.Linear4bit)]
        assert layers and all(m.compute_dtype == torch.float32 for m in layers)


def test_embedded_builds_run_in_a_fresh_process(tmp_path, monkeypatch):
    """`_in_fresh_process` runs a builder of the embedded module in another Python: this process's
    copy of it is never called, and the folder it builds loads."""
    from lowrank_spin.embedded import models as embedded

    build = embedded.build_tiny_llama
    monkeypatch.setattr(embedded, "build_tiny_llama", lambda *args: pytest.fail("built in this process"))
    embedded._in_fresh_process(build, tmp_path / "tiny")
    assert models.load_tokenizer(str(tmp_path / "tiny")) is not None and (tmp_path / "tiny" / "config.json").exists()


def test_smollm2_conversion_is_kept_out_of_this_process(tmp_path, monkeypatch):
    """The GGUF conversion (~1.5 GB at its peak) goes through `_in_fresh_process` into the cache."""
    from lowrank_spin.embedded import models as embedded

    calls = []

    def fake_fresh_process(function, *args):
        calls.append((function, args))
        (Path(args[-1]) / "config.json").write_text("{}")

    monkeypatch.setattr(embedded, "_smollm2_gguf_path", lambda: tmp_path / "model.gguf")
    monkeypatch.setattr(embedded, "_in_fresh_process", fake_fresh_process)
    target = embedded.embedded_model_dir(embedded.SMOLLM2, str(tmp_path / "cache"))
    assert (target / "config.json").exists()
    assert [(function, args[0]) for function, args in calls] == [
        (embedded._convert_smollm2_gguf, tmp_path / "model.gguf")
    ]


def test_a_killed_builds_leftovers_are_removed_by_the_next_build(tmp_path):
    """SIGKILL skips a build's cleanup: the next build removes folders whose process is gone, and
    leaves a build still running in another process alone."""
    import subprocess
    import sys

    from lowrank_spin.embedded import models as embedded

    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    cache = tmp_path / "cache"
    abandoned = cache / f".{embedded.TINY_LLAMA}.{finished.stdout.strip()}.x1"
    running = cache / f".{embedded.TINY_LLAMA}.{os.getppid()}.x2"  # our parent: alive
    for folder in (abandoned, running):
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"half a model")
    target = embedded.embedded_model_dir(embedded.TINY_LLAMA, str(cache))
    assert (target / "config.json").exists()
    assert not abandoned.exists() and running.exists()
    assert sorted(p.name for p in cache.iterdir()) == sorted([running.name, embedded.TINY_LLAMA])
