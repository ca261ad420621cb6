#!/usr/bin/env bash
# GPU throughput check (make gpu-check): the 35.7 M-parameter `unet_cifar` on SYNTHETIC random tensors of CIFAR-10's
# shape (data=random_images: nothing to learn, no files needed), batch 128, EMA 0.9999:
#   1. train.py with trainer=gpu (bf16-mixed) and callbacks=[ema,throughput]: steps/s of the real run
#      (<OUT>/throughput.json; the clock stops at the last training batch);
#   2. benchmarks/gpu_loop.py: the Lightning loop vs a bare PyTorch loop on the same model, loss, optimizer, EMA and
#      data, bf16 autocast on/off x torch.compile on/off (goal: Lightning >= 0.90 x bare), and the gradient-variance
#      probe's cost in training steps (<OUT>/gpu_loop.json);
#   3. scripts/probe_cost.py: the gradient-variance probe as the callback runs it (callbacks=gradvar, chunk_size auto,
#      bf16 autocast) on the same model and batch (<OUT>/probe_cost.json; CUDA only);
# then prints one summary block (also <OUT>/summary.txt) to compare between machines and commits.
#
#   scripts/gpu_check.sh                           # STEPS=300 for train.py; LOOP_ARGS for gpu_loop.py
#   COMPILE=true scripts/gpu_check.sh              # train.py with torch.compile
#   LOOP_ARGS="--rounds 5 --compile false" scripts/gpu_check.sh
#   scripts/gpu_check.sh trainer.gradient_clip_val=1.0   # extra overrides go to train.py
#
# Exits with status 3 and one line on a machine without CUDA (ALLOW_CPU=1 runs it on the CPU: the tests, tiny sizes).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
[ -x "$PY" ] || PY=python
STEPS="${STEPS:-300}"
OUT="${OUT:-outputs/gpu_check}"
export WANDB_MODE="${WANDB_MODE:-offline}"

if [ -z "${ALLOW_CPU:-}" ] && ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "flowmatch gpu-check: no CUDA GPU here (torch.cuda.is_available() is False); nothing measured." \
    "Run make gpu-check on a machine with an NVIDIA GPU." >&2
  exit 3
fi
mkdir -p "$OUT"
"$PY" -c "import torch; print('flowmatch gpu-check: torch', torch.__version__, '|', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'CPU (ALLOW_CPU)')"

status=0
echo "== 1. train.py: $STEPS steps"
if ! "$PY" train.py data=random_images model=unet_cifar trainer=gpu "callbacks=[ema,throughput]" logger=none \
    callbacks.ema.decay=0.9999 callbacks.ema.warmup=false data.batch_size=128 data.device=auto \
    trainer.max_steps="$STEPS" trainer.val_check_interval=100000 trainer.limit_val_batches=0 \
    trainer.enable_progress_bar=false checkpoint.every_n_train_steps=100000 eval.enabled=false \
    module.compile="${COMPILE:-false}" hydra.run.dir="$OUT" "$@" > "$OUT/train.log" 2>&1; then
  echo "   train.py FAILED (see $OUT/train.log):"; tail -3 "$OUT/train.log" | sed 's/^/   /'; status=1
fi
grep "flowmatch: " "$OUT/train.log" | sed 's/^/   /'

echo "== 2. benchmarks/gpu_loop.py ${LOOP_ARGS:-}"
# shellcheck disable=SC2086
if ! "$PY" benchmarks/gpu_loop.py --out "$OUT/gpu_loop.json" ${ALLOW_CPU:+--allow-cpu} ${LOOP_ARGS:-} \
    > "$OUT/gpu_loop.log" 2>&1; then
  echo "   gpu_loop.py FAILED (see $OUT/gpu_loop.log):"; tail -3 "$OUT/gpu_loop.log" | sed 's/^/   /'; status=1
fi

if [ -z "${ALLOW_CPU:-}" ]; then
  echo "== 3. scripts/probe_cost.py"
  if ! "$PY" scripts/probe_cost.py "$OUT/probe_cost.json" data=random_images model=unet_cifar trainer=gpu \
      callbacks=gradvar data.batch_size=128 data.device=auto --steps 20 --repeats 2 > "$OUT/probe_cost.log" 2>&1; then
    echo "   probe_cost.py FAILED (see $OUT/probe_cost.log):"; tail -3 "$OUT/probe_cost.log" | sed 's/^/   /'; status=1
  fi
fi

{
  echo "flowmatch gpu-check: summary"
  grep "flowmatch: throughput" "$OUT/train.log" | sed 's/^flowmatch: /train.py /' || echo "train.py: no throughput"
  sed -n '/^flowmatch gpu-loop: summary/,$p' "$OUT/gpu_loop.log" | tail -n +2
  [ -f "$OUT/probe_cost.log" ] && grep "flowmatch probe-cost" "$OUT/probe_cost.log" | sed 's/^flowmatch probe-cost: /probe_cost.py /'
} | tee "$OUT/summary.txt"
exit $status
