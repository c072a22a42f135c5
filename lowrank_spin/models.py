"""Load the base model (4-bit or not), attach LoRA, and toggle the policy/opponent adapters.

The opponent θ0 + Δθt is the same frozen base under another LoRA adapter (or with adapters
disabled while Δθ0 = 0): never a second copy of the model.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import os
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from peft.utils import load_peft_weights
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from lowrank_spin.embedded.models import (  # noqa: F401 (SMOLLM2, TINY_LLAMA: re-exported)
    EMBEDDED_HUB_IDS,
    EMBEDDED_MODELS,
    SMOLLM2,
    TINY_LLAMA,
    embedded_model_dir,
)
from lowrank_spin.memory import release_freed_memory
from lowrank_spin.settings import AUTO, LoRASettings

POLICY = "policy"
OPPONENT = "opponent"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_path(name_or_path: str, cache_dir: str | None = None) -> str:
    """An embedded model name becomes a converted local folder (built once); anything else passes through.

    Local folders must exist; other strings are treated as Hugging Face hub ids.
    """
    if name_or_path in EMBEDDED_MODELS:
        return str(embedded_model_dir(name_or_path, cache_dir))
    path = Path(name_or_path).expanduser()
    if path.exists() or name_or_path.startswith((".", "/", "~")):
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model.model_name_or_path: {str(path)!r} is not a model folder (no config.json)")
        return str(path)
    return name_or_path  # a Hugging Face hub id


def portable_base_name(name_or_path: str) -> str:
    """The base model's name as another machine can use it: a hub id as given, a local folder as the
    user wrote it, and an embedded model by the hub id it was converted from (never the cache folder)."""
    return EMBEDDED_HUB_IDS.get(name_or_path, name_or_path)


def load_tokenizer(path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer in `path`, with a pad token (EOS when it has none); refuses one without a chat template."""
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.chat_template is None:
        raise ValueError(
            f"model.model_name_or_path: tokenizer in {path!r} has no chat template; prompts are rendered "
            "with it for both generation and training"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def choose_dtype(setting: str, device_type: str = "cpu") -> tuple[str, str]:
    """The dtype to run in and why: `setting` itself, or for `auto` what the hardware runs fast.

    bf16 where it is native (a CUDA GPU that supports it; a CPU with AVX512-BF16 or AMX, or ARM's
    BF16 extension), else float32. A CPU without native bf16 emulates bf16 matmuls, about 50x slower
    than float32 (AMD Zen 2/3, most laptops): measured on one machine, wrong on the next, so never fixed
    in a config. Returns (dtype name, reason), e.g. ("float32", "auto: this CPU has no native bf16").
    """
    if setting != AUTO:
        return setting, "set in the config"
    if device_type == "cuda":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return "bfloat16", "auto: this GPU supports bf16"
        return "float32", "auto: this GPU has no bf16"
    flags = cpu_bf16_flags()
    if flags:
        return "bfloat16", f"auto: this CPU has native bf16 ({', '.join(flags)})"
    return (
        "float32",
        "auto: this CPU has no native bf16 (no avx512_bf16 / amx_bf16 / bf16 flag): bf16 would be emulated",
    )


def cpu_bf16_flags(cpuinfo: str | None = None) -> list[str]:
    """The native-bf16 CPU flags of this machine (`/proc/cpuinfo`, or the `cpuinfo` text given)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:  # not Linux: no way to tell, so take the safe choice
            return []
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86, ARM
            flags.update(value.split())
    return [flag for flag in ("avx512_bf16", "amx_bf16", "bf16") if flag in flags]


def load_base_model(
    path: str,
    load_in_4bit: bool = False,
    dtype: str = "float32",
    compute_dtype: str = "float32",
    attn_implementation: str = "sdpa",
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """The frozen base: nf4 with double quantisation through bitsandbytes, or plain `dtype` weights."""
    kwargs = dict(dtype=DTYPES[dtype], attn_implementation=attn_implementation, trust_remote_code=trust_remote_code)
    if load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=DTYPES[compute_dtype],
        )
        kwargs["dtype"] = DTYPES[compute_dtype]
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if load_in_4bit:
        release_checkpoint_mapping(model)
    disable_cpu_weight_repacking(model)
    contiguous_lm_head_input(model)
    model.requires_grad_(False)
    return model


def contiguous_lm_head_input(model: PreTrainedModel) -> None:
    """Make the LM head's input contiguous before its matmul.

    `logits_to_keep` (generate's prefill, our response-only logits) slices the hidden states to
    [batch, keep, hidden] with the strides of the full sequence. torch.matmul cannot fold that into one
    mm, so it broadcasts the [vocab, hidden] weight into a bmm and copies it once per row: 57 MB per
    row for SmolLM2, 0.7 s per prefill of 16 prompts on a 2-core CPU. Copying the sliced activations
    instead costs a few hundred KB. The logits are unchanged (benchmarks/RESULTS.md has the timings).
    """
    head = model.get_output_embeddings()
    if head is not None:
        head.register_forward_pre_hook(lambda module, args: (args[0].contiguous(), *args[1:]))


def release_checkpoint_mapping(model: PreTrainedModel) -> None:
    """Give back the memory a 4-bit load leaves behind on CPU.

    When the checkpoint's dtype is the compute dtype, the tensors that stay unquantised (embeddings,
    norms, LM head) are views into the memory-mapped safetensors file. That keeps the mapping alive,
    and with it every page of the file the quantisation read: the whole checkpoint stays resident
    (1.9 GB of a 1.1B model's bf16 file). Copying those tensors releases the mapping. The scratch
    memory of the quantisation is then handed back to the OS (glibc's malloc_trim; a no-op elsewhere).
    """
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.device.type == "cpu" and tensor.is_floating_point():  # packed 4-bit weights are uint8
            tensor.data = tensor.data.clone()
    gc.collect()
    release_freed_memory()


def disable_cpu_weight_repacking(model: torch.nn.Module) -> int:
    """Keep bitsandbytes 4-bit layers on the autograd-capable path on CPU.

    On CPUs with AVX512-BF16, the first eval-mode no-grad forward of a `Linear4bit` repacks its weight
    for `gemv_4bit`, which has no autograd: every later training step then yields wrong LoRA gradients
    while the loss looks normal, and `state_dict()` corrupts the weights. SPIN alternates generation and
    training, so the repack is switched off on every layer. Returns the number of layers changed.
    """
    count = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def attach_lora(model: PreTrainedModel, lora: LoRASettings = LoRASettings()) -> PeftModel:
    """The base wrapped with a trainable `policy` adapter and a frozen `opponent` adapter of the same shape.

    With `lora.init_adapter` (e.g. an SFT-LoRA checkpoint) the policy starts from those weights and its
    LoRA settings. The opponent starts as a copy of the policy: iteration 0 plays against the initial model.
    """
    init_adapter = lora.init_adapter
    if init_adapter is not None:
        config = LoraConfig.from_pretrained(init_adapter)
        config.inference_mode = False
    else:
        config = LoraConfig(
            r=lora.rank,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=lora.target_modules,
            task_type="CAUSAL_LM",
        )
    peft_model = get_peft_model(model, config, adapter_name=POLICY)
    peft_model.add_adapter(OPPONENT, LoraConfig(**{**config.to_dict(), "inference_mode": True}))
    with gathered(_both_adapters(peft_model), modifier_rank=0):
        if zero3_partitioned(peft_model):
            # Under ZeRO-3 the layers were built partitioned, so peft's initialisation (B = 0, i.e.
            # Δθ0 = 0) touched empty shards: redo it on the whole tensors.
            for module in peft_model.modules():
                if isinstance(module, LoraLayer) and POLICY in module.lora_A:
                    module.reset_lora_parameters(POLICY, config.init_lora_weights)
        if init_adapter is not None:
            set_peft_model_state_dict(peft_model, load_peft_weights(init_adapter), adapter_name=POLICY)
    snapshot_opponent(peft_model)
    use_policy(peft_model)
    return peft_model


def use_policy(model: PeftModel) -> None:
    """Make the policy adapter active and trainable; the opponent stays frozen."""
    model.base_model.set_adapter(POLICY)
    for name, param in model.named_parameters():
        param.requires_grad = f".{POLICY}." in name


@contextlib.contextmanager
def opponent(model: PeftModel, adapters_disabled: bool = False):
    """Run the block as the opponent: the `opponent` adapter, or the bare base while Δθ0 = 0.

    peft's `set_adapter` flips `requires_grad`, so the policy is restored (and re-marked trainable) after.
    """
    if adapters_disabled:
        with model.disable_adapter():
            yield model
        return
    model.base_model.set_adapter(OPPONENT, inference_mode=True)
    try:
        yield model
    finally:
        use_policy(model)


def snapshot_opponent(model: PeftModel) -> None:
    """θ0 + Δθt: copy the policy's LoRA weights into the opponent adapter (0.1 s at 135M)."""
    with gathered(_both_adapters(model), modifier_rank=0):  # every rank then gets rank 0's copy
        state = get_peft_model_state_dict(model, adapter_name=POLICY)
        set_peft_model_state_dict(model, state, adapter_name=OPPONENT)


def zero3_partitioned(model: torch.nn.Module) -> bool:
    """Whether DeepSpeed ZeRO-3 has partitioned the weights (each rank holds a slice of every one)."""
    return _partitioned(model.parameters())


def _partitioned(params) -> bool:
    return any(hasattr(p, "ds_id") for p in params)


def _both_adapters(model: PeftModel) -> list[torch.nn.Parameter]:
    return [*lora_parameters(model, POLICY).values(), *lora_parameters(model, OPPONENT).values()]


def gathered(params: list[torch.nn.Parameter], modifier_rank: int | None = None):
    """Whole tensors for the block under ZeRO-3 (a no-op otherwise); with `modifier_rank`, that rank's
    changes are scattered back to every rank on exit."""
    if not _partitioned(params):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


def save_adapter(
    model: PeftModel,
    directory: str | Path,
    adapter_name: str = POLICY,
    write: bool = True,
    base_model: str | None = None,
) -> Path:
    """Save one adapter in standard peft format (loads with `PeftModel.from_pretrained`); returns `directory`.

    `base_model` goes into `adapter_config.json` as `base_model_name_or_path` (see `portable_base_name`),
    so a colleague who copies the folder knows, and peft's Auto classes find, the base it belongs to.

    Each file is written to a temporary name and renamed, so a kill never leaves a torn adapter;
    other files in `directory` (the iteration's synthetic data) are left alone. Under ZeRO-3 gathering
    the weights is collective: call it on every rank, with `write` true on one.
    """
    with gathered(list(lora_parameters(model, adapter_name).values())):
        state = get_peft_model_state_dict(model, adapter_name=adapter_name)
        state = {k: v.detach().contiguous().cpu().clone() for k, v in state.items()}
    directory = Path(directory)
    if not write:
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".adapter.", dir=directory) as tmp:
        config = copy.copy(model.peft_config[adapter_name])
        config.inference_mode = True
        if base_model is not None:
            config.base_model_name_or_path = base_model
        config.save_pretrained(tmp)
        save_file(state, Path(tmp) / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        for name in (ADAPTER_WEIGHTS, "adapter_config.json"):
            os.replace(Path(tmp) / name, directory / name)
    return directory


def lora_parameters(model: PeftModel, adapter_name: str = POLICY) -> dict[str, torch.Tensor]:
    """{name: parameter} of one adapter's LoRA weights."""
    return {n: p for n, p in model.named_parameters() if f".{adapter_name}." in n}
