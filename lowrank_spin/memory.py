"""The expected peak memory of a run, from its settings and the base's config, before anything loads.

On a CPU there is no out-of-memory error to recover from: the kernel's OOM killer ends the process
(SIGKILL, no message) or the machine swaps for hours. On a GPU the error is raised, possibly hours
in. So `fit` states the estimate before the long work starts and refuses a run whose estimate exceeds
the memory free where it runs (`device_memory_errors`: the RAM available on a CPU,
`torch.cuda.mem_get_info` on a GPU), naming the settings that lower it. What still runs out on a GPU is split, with a warning:
generation and opponent scoring halve their batch (`halved_after_out_of_memory`), a training step
splits its micro-batch into parts accumulated to the same optimizer step (`split_after_out_of_memory`).
The estimate is a sum of the parts that scale with the settings, each an upper-end figure, plus the
fixed cost of the process:

    weights       the base in its dtype (nf4 linear layers: 0.5 byte + 1/64 of a float32 scale per weight)
    lora          both adapters' float32 weights, plus the policy's gradient and two Adam moments
    generation    the KV cache of `sampling.batch_size` rows x (prompt + new tokens), and their logits
    training      what a LoRA training step holds per token of its longest batch (less with gradient
                  checkpointing), fitted to measured peaks, and one chunk of float32 logits with its softmax
    runtime       torch, transformers, Lightning and the tokenizer, measured once (~1 GB; host memory,
                  so none on a GPU)

It is an estimate, not a bound: allocator fragmentation and libraries' caches add to it, and
benchmarks/bench_memory.py measures the real peak beside it.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
from dataclasses import dataclass

from lowrank_spin.settings import LoRASettings, SamplingSettings

GIB = 1024**3
RUNTIME_BYTES = int(1.0 * GIB)  # a Python process with torch, transformers and Lightning imported
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
NF4_BYTES_PER_WEIGHT = 0.5 + 4 / 64  # 4 bits, plus one float32 absmax per block of 64 (before double quant)
# Memory a training step holds per token and layer, in values of the compute dtype per unit of hidden
# and of intermediate size: what the backward keeps (attention and MLP inputs, norms and their float32
# upcasts, rotary q/k, the LoRA branches' inputs, gate/up and their product) plus the allocator's
# slack. Fitted to the main command's measured peaks (benchmarks/RESULTS.md: SmolLM2-135M, bf16):
# ~64 x hidden per token-layer without gradient checkpointing, ~21 x hidden with it (then the step
# holds one layer's recomputation and every layer's input).
KEPT_PER_HIDDEN, KEPT_PER_INTERMEDIATE = 36, 10
CHECKPOINTED_PER_HIDDEN, CHECKPOINTED_PER_INTERMEDIATE = 8, 5


@dataclass(frozen=True)
class PeakEstimate:
    """Bytes per part (see the module docstring); `total` is what a run is expected to peak at."""

    weights: int
    lora: int
    generation: int
    training: int
    runtime: int = RUNTIME_BYTES

    @property
    def total(self) -> int:
        # generation and training never hold their buffers at the same time
        return self.weights + self.lora + max(self.generation, self.training) + self.runtime

    def describe(self) -> str:
        """One line: the total and its parts, in GB."""
        parts = ", ".join(
            f"{name} {getattr(self, name) / GIB:.2f}"
            for name in ("weights", "lora", "generation", "training", "runtime")
        )
        return f"{self.total / GIB:.1f} GB ({parts} GB; generation and training do not overlap)"


def estimate_peak(
    config,
    *,
    load_in_4bit: bool,
    dtype: str,
    lora: LoRASettings,
    sampling: SamplingSettings,
    train_batch_size: int,
    responses_per_example: int,
    prompt_length: int,
    response_length: int,
    gradient_checkpointing: bool = False,
    logits_chunk: int = 512,
    device_type: str = "cpu",
    weight_shards: int = 1,
) -> PeakEstimate:
    """The expected peak of a run over the base of transformers `config`, in `dtype` (the compute dtype
    of a 4-bit base), whose longest prompt and response (real or generated) are `prompt_length` and
    `response_length` tokens: its worst batch holds `train_batch_size` such examples. On a `device_type`
    other than cpu the process's own runtime is host memory, not counted; `weight_shards` processes
    share the base (DeepSpeed ZeRO-3 partitions it). Returns a PeakEstimate."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    hidden, layers, vocab = text.hidden_size, text.num_hidden_layers, text.vocab_size
    intermediate = getattr(text, "intermediate_size", None) or 4 * hidden
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    width = DTYPE_BYTES[dtype]

    # the linear layers of one decoder layer: q, k, v, o and the gated MLP's gate, up and down
    linear_shapes = [
        (hidden, heads * head_dim),
        (hidden, kv_heads * head_dim),
        (hidden, kv_heads * head_dim),
        (heads * head_dim, hidden),
        (hidden, intermediate),
        (hidden, intermediate),
        (intermediate, hidden),
    ]
    linear_weights = layers * sum(i * o for i, o in linear_shapes)
    embeddings = vocab * hidden * (1 if getattr(config, "tie_word_embeddings", False) else 2)
    linear_bytes = linear_weights * (NF4_BYTES_PER_WEIGHT if load_in_4bit else width)
    weights = int(linear_bytes + (embeddings + 2 * layers * hidden) * width) // weight_shards

    lora_params = layers * sum(lora.rank * (i + o) for i, o in linear_shapes)
    lora_bytes = (
        lora_params * 4 * (1 + 1 + 1 + 2)
    )  # policy + opponent weights, the policy's gradient, Adam's two moments

    sequence = prompt_length + sampling.max_new_tokens
    sequence = -(-sequence // 64) * 64  # the static engine's cache length
    kv_cache = 2 * layers * sampling.batch_size * kv_heads * head_dim * sequence * width
    generation = kv_cache + 3 * sampling.batch_size * vocab * 4  # logits, their float32 copy, the sampler's

    rows = train_batch_size * responses_per_example
    row_length = prompt_length + response_length
    tokens = rows * row_length
    if gradient_checkpointing:
        kept_per_layer = CHECKPOINTED_PER_HIDDEN * hidden + CHECKPOINTED_PER_INTERMEDIATE * intermediate
    else:
        kept_per_layer = KEPT_PER_HIDDEN * hidden + KEPT_PER_INTERMEDIATE * intermediate
    activations = tokens * layers * kept_per_layer * width
    # attention weights of the masked (math) sdpa path: rows x heads x seq^2 per layer, kept for backward
    attention = 0 if gradient_checkpointing else rows * heads * row_length**2 * width
    training = activations + layers * attention + 3 * logits_chunk * vocab * 4

    return PeakEstimate(
        weights=weights,
        lora=int(lora_bytes),
        generation=int(generation),
        training=int(training),
        runtime=RUNTIME_BYTES if device_type == "cpu" else 0,
    )


def release_freed_memory() -> None:
    """Hand the heap memory freed since the last call back to the OS (glibc's `malloc_trim`; a no-op
    elsewhere). Returns None.

    On CPU, torch allocates tensors with malloc. glibc keeps what a phase frees in its heap for reuse,
    so a training step's activations stay in the process's RSS long after the step, and steps of
    different shapes fragment the heap further: measured on the main command, ~2 GB of its training
    peak was freed memory glibc held. Releasing it at the end of every step and phase keeps the RSS
    near what is live, at the cost of page faults when the memory is taken again (cheaper than
    mmapping every large tensor, which halved generation speed here).
    """
    with contextlib.suppress(OSError, AttributeError):
        _libc().malloc_trim(0)


@functools.cache
def _libc():
    return ctypes.CDLL("libc.so.6")


def halved_after_out_of_memory(size: int, log: logging.Logger, doing: str, setting: str) -> int:
    """Call while handling a CUDA out-of-memory error of a batch of `size`: frees the CUDA cache, warns
    on `log` naming `setting`, and returns half the size for the rest of the pass (the caller retries).
    The caller re-raises at size 1, where there is nothing left to halve."""
    import torch

    size = max(1, size // 2)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    log.warning(
        "CUDA out of memory while %s: retrying %d at a time for the rest of the pass; set %s to %d (or lower) next time",
        doing,
        size,
        setting,
        size,
    )
    return size


def split_after_out_of_memory(parts: int, batch_size: int, log: logging.Logger) -> int:
    """Call after a training step of micro-batches of `batch_size` examples, run in `parts` parts, ran out
    of CUDA memory: frees the CUDA cache, warns on `log`, and returns twice the parts (the caller
    retries the step so, and runs every later step so): the same examples, loss and optimizer steps,
    each part's gradient accumulated."""
    import torch

    parts *= 2
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    size = -(-batch_size // parts)
    log.warning(
        "CUDA out of memory in a training step: each micro-batch of %d examples now runs as %d parts of up to "
        "%d, their gradients accumulated into the same optimizer step, for the rest of the run; next time set "
        "data.batch_size %d and trainer.accumulate_grad_batches x%d (or model.gradient_checkpointing: true)",
        batch_size,
        parts,
        size,
        size,
        parts,
    )
    return parts


def device_memory_errors(
    estimate: PeakEstimate,
    device,
    processes: int = 1,
    *,
    gradient_checkpointing: bool = False,
    load_in_4bit: bool = False,
) -> list[str]:
    """`peak_memory_errors` for a run on `device` (a torch.device): on a CPU, `processes` processes
    share the RAM available; on a GPU, this process's share is the card's free memory
    (`torch.cuda.mem_get_info`). Settings already in effect (`gradient_checkpointing`, `load_in_4bit`)
    are not suggested. Empty for other devices, and where the free memory is unknown."""
    import torch

    levers = dict(gradient_checkpointing=gradient_checkpointing, load_in_4bit=load_in_4bit)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # what this process's allocator already holds (the model, loaded) is part of the estimate
        where = f"GPU {device} has free"
        return peak_memory_errors(estimate, free, 1, torch.cuda.memory_reserved(device), where=where, **levers)
    if device.type == "cpu":
        return peak_memory_errors(estimate, available_bytes(), processes, resident_bytes(), **levers)
    return []


def available_bytes(meminfo: str | None = None) -> int | None:
    """The memory the kernel says new work can use without swapping (`MemAvailable`, Linux), capped by
    the cgroup's limit where one is set; None where neither can be read."""
    if meminfo is None:
        try:
            with open("/proc/meminfo") as f:
                meminfo = f.read()
        except OSError:
            meminfo = ""
    available = next(
        (int(line.split()[1]) * 1024 for line in meminfo.splitlines() if line.startswith("MemAvailable:")), None
    )
    limit = _cgroup_limit()
    if available is None:
        return limit
    return min(available, limit) if limit else available


def resident_bytes() -> int:
    """This process's resident memory (VmRSS, Linux; 0 where it cannot be read)."""
    try:
        with open("/proc/self/status") as f:
            return next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:")), 0)
    except OSError:
        return 0


def _cgroup_limit() -> int | None:
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                value = f.read().strip()
        except OSError:
            continue
        if value.isdigit() and int(value) < 1 << 60:
            return int(value)
    return None


def peak_memory_errors(
    estimate: PeakEstimate,
    available: int | None,
    processes: int = 1,
    in_use: int = 0,
    *,
    where: str = "this machine has available",
    gradient_checkpointing: bool = False,
    load_in_4bit: bool = False,
) -> list[str]:
    """The config error of a run of `processes` processes on this machine, each expected to peak at
    `estimate` and each already holding `in_use` bytes (the model loaded: no longer in `available`),
    when together they need more than `available` bytes more (empty when they fit or the machine's
    memory is unknown), naming the settings that lower the estimate most (not those already set:
    `gradient_checkpointing`, `load_in_4bit`). `where` says whose memory `available` is."""
    if available is None or processes * max(estimate.total - in_use, 0) <= available:
        return []
    levers = []
    if estimate.weights > estimate.total / 4 and not load_in_4bit:
        levers.append("model.load_in_4bit: true")
    if estimate.training >= estimate.generation:
        levers.append("a lower data.batch_size (with a higher trainer.accumulate_grad_batches: the same steps)")
        if not gradient_checkpointing:
            levers.append("model.gradient_checkpointing: true")
        levers += ["a lower data.max_prompt_length / data.max_response_length", "a lower data.sampling.max_new_tokens"]
    else:
        levers += ["a lower data.sampling.batch_size", "a lower data.sampling.max_new_tokens"]
    return [
        f"memory: this run is expected to peak at {estimate.describe()}"
        + (f" in each of {processes} processes" if processes > 1 else "")
        + (f", {in_use / GIB:.1f} GB of it already in use" if in_use else "")
        + f"; that is more than the "
        f"{available / GIB:.1f} GB {where}; lower it with {', '.join(levers)} "
        "(or run anyway with LOWRANK_SPIN_SKIP_MEMORY_CHECK=1)"
    ]
