#!/usr/bin/env bash
# One CUDA GPU, for real, in under 8 minutes: CUDA torch present, the nf4 base + LoRA on bitsandbytes'
# CUDA kernels, FlashAttention-2 when installed (and the sdpa fallback when not), then a 2-iteration fit
# of the embedded default on the GPU with its throughput and peak memory. Writes gpu_check/summary.txt.
#
#   bash scripts/gpu_check.sh            # from the repo root, with the package installed (.ci/venv, or pip install -e ".[gpu]")
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
OUT=${OUT_DIR:-gpu_check}
mkdir -p "$OUT"
export LOWRANK_SPIN_CACHE=${LOWRANK_SPIN_CACHE:-$OUT/cache}

echo "== 1. CUDA torch"
"$PY" - <<'PY' | tee "$OUT/summary.txt"
import importlib.util, torch
assert torch.cuda.is_available(), "no CUDA device visible to torch (a CPU build of torch? install the CUDA wheel first)"
p = torch.cuda.get_device_properties(0)
print(f"torch {torch.__version__} CUDA {torch.version.cuda}; {p.name}, {p.total_memory / 2**30:.0f} GiB, compute {p.major}.{p.minor}; bf16 {torch.cuda.is_bf16_supported()}")
for name in ("bitsandbytes", "flash_attn", "deepspeed", "vllm"):
    print(f"{name}: {'installed' if importlib.util.find_spec(name) else 'not installed'}")
PY

echo "== 2. nf4 + LoRA gradients and FlashAttention-2 on the GPU (tests/test_gpu.py)"
"$PY" -m pytest -q -rs tests/test_gpu.py 2>&1 | tee -a "$OUT/summary.txt" | tail -5

echo "== 3. attn_implementation flash_attention_2: used, or the sdpa fallback with its warning"
"$PY" - <<'PY' 2>&1 | tee -a "$OUT/summary.txt"
import warnings
from lowrank_spin.settings import attention_implementation
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    chosen = attention_implementation("flash_attention_2")
print(f"flash_attention_2 requested -> {chosen}" + (f" ({caught[0].message})" if caught else ""))
PY

echo "== 4. 2 SPIN iterations of the embedded default on the GPU"
RUN="$OUT/smollm2_spin"
rm -rf "$RUN"
start=$(date +%s)
"$PY" - "$RUN" <<'PY' 2>&1 | tail -12 | tee -a "$OUT/summary.txt"
import sys, time, torch
from lowrank_spin.cli import build_cli
run = sys.argv[1]
t = time.time()
build_cli(["fit", "--config", "configs/smollm2_spin.yaml", "--trainer.accelerator", "gpu", "--trainer.devices", "1",
           "--trainer.default_root_dir", run, "--trainer.logger.init_args.save_dir", run, "--trainer.enable_progress_bar", "false"])
print(f"fit: {time.time() - t:.0f} s; peak GPU memory allocated {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
PY
"$PY" - "$RUN" <<'PY' | tee -a "$OUT/summary.txt"
import csv, glob, sys
rows = [r for p in glob.glob(f"{sys.argv[1]}/logs/version_*/metrics.csv") for r in csv.DictReader(open(p))]
gen = [float(r["generation/tokens_per_second"]) for r in rows if r.get("generation/tokens_per_second")]
epochs = [float(r["time/train_epoch_seconds"]) for r in rows if r.get("time/train_epoch_seconds")]
print(f"generation tokens/s per iteration: {[round(g) for g in gen]}; training epoch seconds: {[round(e, 1) for e in epochs]}")
PY
echo "total $(( $(date +%s) - start )) s; summary in $OUT/summary.txt"

echo "== 5. generation engines on the GPU: HF generate vs vLLM (when installed), the embedded default"
"$PY" - <<'PY' 2>&1 | tail -6 | tee -a "$OUT/summary.txt"
import dataclasses, importlib.util, time, torch
from lowrank_spin import models
from lowrank_spin.data.chat import render_prompt
from lowrank_spin.embedded import task
from lowrank_spin.generation import generate_responses
from lowrank_spin.settings import SamplingSettings

path = models.resolve_model_path(models.SMOLLM2)
tokenizer = models.load_tokenizer(path)
model = models.attach_lora(models.load_base_model(path, dtype="bfloat16").cuda())
models.snapshot_opponent(model)
prompts = [render_prompt(tokenizer, p.prompt) for p in task.make_splits(256, 0, 0, seed=0)["train"]]
base = SamplingSettings(batch_size=64, max_new_tokens=96)
engines = ["hf"] + (["vllm"] if importlib.util.find_spec("vllm") else [])
with models.opponent(model):
    for engine in engines:
        generate_responses(model, tokenizer, prompts[:8], dataclasses.replace(base, engine=engine), seed=1)  # warm-up
        torch.cuda.synchronize(); t = time.time()
        out, stats = generate_responses(model, tokenizer, prompts, dataclasses.replace(base, engine=engine), seed=0)
        torch.cuda.synchronize()
        print(f"{engine}: {stats['tokens_per_second']:.0f} new tokens/s over {len(prompts)} prompts ({time.time() - t:.1f} s)")
if len(engines) == 1:
    print("vllm: not installed (pip install -e '.[vllm]'), not measured")
PY
