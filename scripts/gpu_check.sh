#!/usr/bin/env bash
# One CUDA GPU, for real, in under 8 minutes (a 450 s budget: each step has a time cap, and no step
# starts once the budget is spent). Writes gpu_check/summary.txt (each step's last lines and a verdict
# per step) and each step's full output to gpu_check/<step>.log.
#
#   1. cuda         CUDA torch, the GPU, and which optional packages are installed
#   2. gpu_tests    tests/test_gpu.py -m requires_cuda: nf4 + LoRA gradients on bitsandbytes' CUDA kernels
#                   equal those over the dequantized base (also after a generation); FlashAttention-2's
#                   log-probs against sdpa (when flash-attn is installed)
#   3. attention    attn_implementation flash_attention_2: used, or the sdpa fallback with its warning
#   4. fit          2 iterations (SFT, then SPIN) of the embedded default (configs/smollm2_spin.yaml: nf4
#                   SmolLM2-135M + LoRA): generation tokens/s, epoch seconds, peak GPU memory
#   5. vllm         scripts/vllm_check.py (when vLLM is installed): vLLM vs HF generate on the same
#                   prompts, vLLM's drawn-token log-probs vs the training model's, sleep mode, tokens/s
#   6. deepspeed    DeepSpeed ZeRO-2 on this one GPU (configs/tiny_spin.yaml: 2 iterations, 8 steps)
#
#   bash scripts/gpu_check.sh     # from the repo root, with the package installed (pip install -e ".[gpu,vllm]")
#
# A failed step does not stop the others; the exit status is 1 if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
OUT=${OUT_DIR:-gpu_check}
BUDGET=${GPU_CHECK_BUDGET_S:-450}
mkdir -p "$OUT"
export LOWRANK_SPIN_CACHE=${LOWRANK_SPIN_CACHE:-$OUT/cache}
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
START=$(date +%s)
VERDICTS=()
FAILED=0

# step NAME CAP LINES COMMAND...: run COMMAND (stdin passes through: a heredoc works) for at most CAP
# seconds and never past the budget; its output goes to $OUT/NAME.log, its last LINES to the summary.
step() {
  local name=$1 cap=$2 lines=$3
  shift 3
  local left=$(( BUDGET - ($(date +%s) - START) ))
  echo "== $name" | tee -a "$SUMMARY"
  if (( left < 30 )); then
    VERDICTS+=("$name: skipped (the ${BUDGET} s budget is spent)")
    return
  fi
  (( cap > left )) && cap=$left
  local t0=$(date +%s)
  timeout --kill-after=15 "$cap" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n "$lines" "$OUT/$name.log" | tee -a "$SUMMARY"
  local took=$(( $(date +%s) - t0 ))
  if (( rc == 0 )); then
    VERDICTS+=("$name: ok (${took} s)")
  else
    FAILED=1
    [[ $rc == 124 || $rc == 137 ]] && VERDICTS+=("$name: FAILED, stopped at its ${cap} s cap") \
      || VERDICTS+=("$name: FAILED, exit status $rc (${took} s; $OUT/$name.log)")
  fi
}

installed() { "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)"; }

step cuda 60 10 "$PY" - <<'PY'
import importlib.metadata, torch
for name in ("bitsandbytes", "flash-attn", "deepspeed", "vllm"):
    try:
        print(f"{name}: {importlib.metadata.version(name)}")
    except importlib.metadata.PackageNotFoundError:
        print(f"{name}: not installed")
assert torch.cuda.is_available(), "no CUDA device visible to torch (a CPU build of torch? install the CUDA wheel first)"
p = torch.cuda.get_device_properties(0)
print(f"torch {torch.__version__} CUDA {torch.version.cuda}; {p.name}, {p.total_memory / 2**30:.0f} GiB, compute {p.major}.{p.minor}; bf16 {torch.cuda.is_bf16_supported()}")
PY
if (( FAILED )); then  # every later step needs the GPU
  printf '== verdicts\n%s\nthe other steps need a CUDA GPU: not run\n' "${VERDICTS[@]}" | tee -a "$SUMMARY"
  exit 1
fi

step gpu_tests 120 6 "$PY" -m pytest -q -rs -m requires_cuda tests/test_gpu.py

step attention 60 3 "$PY" - <<'PY'
import warnings
from lowrank_spin.settings import attention_implementation
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    chosen = attention_implementation("flash_attention_2")
print(f"flash_attention_2 requested -> {chosen}" + (f" ({caught[0].message})" if caught else ""))
PY

RUN="$OUT/smollm2_fit"
rm -rf "$RUN"
step fit 180 14 "$PY" - "$RUN" <<'PY'
import csv, glob, sys, time, torch
from lowrank_spin.cli import build_cli
run = sys.argv[1]
t = time.time()
build_cli(["fit", "--config", "configs/smollm2_spin.yaml", "--trainer.accelerator", "gpu", "--trainer.devices", "1",
           "--trainer.default_root_dir", run, "--trainer.logger.init_args.save_dir", run, "--trainer.enable_progress_bar", "false",
           "--model.num_iterations", "2", "--model.objective.name", "[sft, spin]", "--model.optimizer.learning_rate", "[2.0e-4, 5.0e-5]"])
rows = [r for p in glob.glob(f"{run}/logs/version_*/metrics.csv") for r in csv.DictReader(open(p))]
gen = [float(r["generation/tokens_per_second"]) for r in rows if r.get("generation/tokens_per_second")]
epochs = [float(r["time/train_epoch_seconds"]) for r in rows if r.get("time/train_epoch_seconds")]
print(f"generation tokens/s per iteration: {[round(g) for g in gen]}; training epoch seconds: {[round(e, 1) for e in epochs]}")
print(f"fit: {time.time() - t:.0f} s; peak GPU memory allocated {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
PY

if installed vllm; then
  step vllm 210 12 "$PY" scripts/vllm_check.py --output "$OUT/vllm_check.json"
else
  echo "== vllm" | tee -a "$SUMMARY"
  VERDICTS+=("vllm: skipped (not installed: pip install -e '.[vllm]'); vLLM vs HF not measured")
fi

DS="$OUT/deepspeed_zero2"
rm -rf "$DS"
if installed deepspeed; then
  step deepspeed 120 8 "$PY" - "$DS" <<'PY'
import csv, glob, sys, time
from safetensors.torch import load_file
from lowrank_spin.cli import build_cli
run = sys.argv[1]
t = time.time()
build_cli(["fit", "--config", "configs/tiny_spin.yaml", "--trainer.accelerator", "gpu", "--trainer.devices", "1",
           "--trainer.strategy", "deepspeed_stage_2", "--trainer.default_root_dir", run,
           "--trainer.logger.init_args.save_dir", run, "--data.sampling.engine", "hf"])
losses = [float(r["train/loss_step"]) for p in glob.glob(f"{run}/logs/version_*/metrics.csv") for r in csv.DictReader(open(p)) if r.get("train/loss_step")]
trained = max(v.abs().max().item() for k, v in load_file(f"{run}/iter_1/adapter_model.safetensors").items() if "lora_B" in k)
assert len(losses) == 8 and trained > 0, (losses, trained)
print(f"ZeRO-2, 1 GPU: {len(losses)} steps, losses {[round(x, 4) for x in losses]}; adapter max |lora_B| {trained:.2e}; {time.time() - t:.0f} s")
PY
else
  echo "== deepspeed" | tee -a "$SUMMARY"
  VERDICTS+=("deepspeed: skipped (not installed: pip install -e '.[gpu]')")
fi

{
  echo "== verdicts ($(( $(date +%s) - START )) s in all)"
  printf '%s\n' "${VERDICTS[@]}"
} | tee -a "$SUMMARY"
exit $FAILED
