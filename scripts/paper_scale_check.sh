#!/usr/bin/env bash
# Paper-scale check, for a GPU user: a few hundred training steps of the paper-scale configs of table2
# (experiment=paper/table2_paper) and fig-gradvar (experiment=paper/fig-gradvar_paper), recording
#   - steps/s and peak GPU memory of the real training loop (train.py:
#     <OUT>/<item>/throughput.json; the overlay's own callbacks plus throughput), and
#   - the gradient-variance probes' cost relative to a training step (scripts/probe_cost.py: the callback's own
#     probe code on the same config, gradvar added where the overlay has no probe: <OUT>/<item>/probe_cost.json),
# then prints a summary (also <OUT>/summary.txt) to copy into REPRODUCTION.md and to scale `make figures-paper`.
#
#   scripts/paper_scale_check.sh                   # STEPS=300, real data if found, else synthetic stand-ins
#   DATA=synthetic scripts/paper_scale_check.sh    # random images of the same shape (no files needed)
#   ITEMS="fig-gradvar_paper" scripts/paper_scale_check.sh
#   PROBE_REPEATS=1 STEPS=200 scripts/paper_scale_check.sh     # shorter (probe timing: best of PROBE_REPEATS runs)
#
# Real data: CIFAR-10 and CelebA under $FLOWMATCH_DATA (see conf/data/*.yaml). Synthetic: data=random_images of
# the same shape (3x32x32, resp. 3x64x64 with 5,000 images): the timings hold, the numbers learned do not matter.
# Exits with status 3 and one line on a machine without CUDA.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
[ -x "$PY" ] || PY=python
STEPS="${STEPS:-300}"
OUT="${OUT:-outputs/paper_scale_check}"
DATA="${DATA:-auto}"
ITEMS="${ITEMS:-table2_paper fig-gradvar_paper}"
export WANDB_MODE="${WANDB_MODE:-offline}"

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "flowmatch paper-scale check: no CUDA GPU here (torch.cuda.is_available() is False); nothing measured." \
    "Run scripts/paper_scale_check.sh on a machine with an NVIDIA GPU." >&2
  exit 3
fi
"$PY" -c "import torch; print('flowmatch paper-scale check: torch', torch.__version__, '|', torch.cuda.get_device_name(0))"
mkdir -p "$OUT"
ROOT_DATA="${FLOWMATCH_DATA:-data}"

data_overrides() {  # $1: overlay -> the data overrides of this check (nothing for real data)
  local want="$DATA"
  case "$1" in
    fig-gradvar*) [ "$want" = auto ] && { [ -d "$ROOT_DATA/cifar-10-batches-py" ] && want=real || want=synthetic; }
                  [ "$want" = synthetic ] && echo "data=random_images" ;;
    table2*|table3*) [ "$want" = auto ] && { [ -d "$ROOT_DATA/celeba" ] && want=real || want=synthetic; }
                  [ "$want" = synthetic ] && echo "data=random_images data.image_size=64 data.dim=12288 data.n_images=5000" ;;
  esac
}

callbacks_of() {  # $1: overlay -> its own callbacks list plus throughput (its probes fire every few thousand steps)
  local list
  list=$(sed -n 's/^ *- override \/callbacks: *//p' "conf/experiment/paper/$1.yaml" | tr -d '[] ')
  echo "callbacks=[${list:+$list,}throughput]"
}

probes_of() {  # $1: overlay -> its callbacks list with the gradient-variance probe added when it has none
  local cbs
  cbs=$(callbacks_of "$1" | sed 's/,throughput\]/]/; s/\[throughput\]/[]/')
  case "$cbs" in *gradvar*) echo "$cbs" ;; "callbacks=[]") echo "callbacks=[gradvar]" ;; *) echo "${cbs%]},gradvar]" ;; esac
}

status=0
for overlay in $ITEMS; do
  run="$OUT/$overlay"
  rm -rf "$run"
  extra=$(data_overrides "$overlay")
  echo "== $overlay: $STEPS steps ${extra:+(synthetic: $extra)}"
  if ! "$PY" train.py "experiment=paper/$overlay" $extra "$(callbacks_of "$overlay")" logger=none \
      trainer.max_steps="$STEPS" trainer.val_check_interval=1000000 trainer.limit_val_batches=0 \
      trainer.enable_progress_bar=false checkpoint.every_n_train_steps=1000000 eval.enabled=false \
      hydra.run.dir="$run" > "$run.train.log" 2>&1; then
    echo "   training FAILED (see $run.train.log):"; tail -3 "$run.train.log" | sed 's/^/   /'; status=1; continue
  fi
  grep "flowmatch: throughput" "$run.train.log" | sed 's/^/   /'
  if ! "$PY" scripts/probe_cost.py --repeats "${PROBE_REPEATS:-2}" "$run/probe_cost.json" "experiment=paper/$overlay" \
      $extra "$(probes_of "$overlay")" \
      > "$run.probe.log" 2>&1; then
    echo "   probe timing FAILED (see $run.probe.log):"; tail -3 "$run.probe.log" | sed 's/^/   /'; status=1; continue
  fi
  grep "flowmatch probe-cost" "$run.probe.log" | sed 's/^/   /'
done

"$PY" - "$OUT" $ITEMS <<'EOF' | tee "$OUT/summary.txt"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print("flowmatch paper-scale check: summary")
for overlay in sys.argv[2:]:
    thr, cost = out / overlay / "throughput.json", out / overlay / "probe_cost.json"
    if not thr.exists():
        print(f"{overlay}: no throughput.json (failed)")
        continue
    t = json.loads(thr.read_text())
    mem = t.get("max_memory_allocated_gib")
    print(f"{overlay}: {t['steps_per_s']:.2f} steps/s ({t['samples_per_s']:.0f} samples/s, batch {t['batch_size']}, "
          f"{t['precision']}), peak memory {mem:.1f} GiB" if mem is not None else f"{overlay}: {t['steps_per_s']:.2f} steps/s")
    if cost.exists():
        c = json.loads(cost.read_text())
        for name, p in c["probes"].items():
            print(f"  probe {name} ({p['source']}, {p['probe_size']} samples): {p['probe_s']:.2f} s = "
                  f"{p['probe_in_training_steps']:.1f} training steps; every {p['every_n_steps']} steps "
                  f"+{100 * p['amortized_overhead']:.2f}% of training time; peak {p['probe_peak_memory_gib'] or 0:.1f} GiB")
EOF
exit $status
