#!/usr/bin/env bash
# GPU throughput check: train the 35.7 M-parameter `unet_cifar` on SYNTHETIC random tensors of CIFAR-10's
# shape (data=random_images: nothing to learn, no files needed) and print steps/s after warm-up; then (CUDA only)
# time the gradient-variance probe on the same model and batch (scripts/probe_cost.py -> $OUT/probe_cost.json).
#
#   scripts/gpu_check.sh                      # trainer=gpu (bf16-mixed), STEPS=300, batch 128
#   COMPILE=true scripts/gpu_check.sh         # with torch.compile
#   scripts/gpu_check.sh trainer=cpu trainer.max_steps=5 data.batch_size=4 callbacks.throughput.warmup_steps=1
#                                              # (extra overrides come last; this one just checks it starts)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
[ -x "$PY" ] || PY=python
STEPS="${STEPS:-300}"
OUT="${OUT:-outputs/gpu_check}"
export WANDB_MODE="${WANDB_MODE:-offline}"
"$PY" -c "import torch; print('flowmatch gpu-check: torch', torch.__version__, '| cuda available:', torch.cuda.is_available(), '|', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"
"$PY" train.py data=random_images model=unet_cifar trainer=gpu "callbacks=[ema,throughput]" logger=none \
  callbacks.ema.decay=0.9999 data.batch_size=128 data.device=auto trainer.max_steps="$STEPS" \
  trainer.val_check_interval=100000 trainer.limit_val_batches=0 trainer.enable_progress_bar=false \
  checkpoint.every_n_train_steps=100000 eval.enabled=false module.compile="${COMPILE:-false}" \
  hydra.run.dir="$OUT" "$@"
# the gradient-variance probe's cost on the same model and batch (callbacks=gradvar, chunk_size auto, bf16 autocast)
if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  "$PY" scripts/probe_cost.py "$OUT/probe_cost.json" data=random_images model=unet_cifar trainer=gpu callbacks=gradvar \
    data.batch_size=128 data.device=auto --steps 20 --repeats 2
else
  echo "flowmatch gpu-check: no CUDA GPU, the probe's cost on unet_cifar is not measured"
fi
echo "flowmatch gpu-check: done; details in $OUT/throughput.json (and $OUT/probe_cost.json on a GPU)"
