#!/usr/bin/env bash
# Print the sbatch script that `train.py --multirun hydra/launcher=slurm ARGS...` would submit, without submitting it.
#   scripts/sbatch_preview.sh interpolant.sigma=0.0,0.05 seed=0,1 trainer=gpu
# A stand-in `sbatch` (and `srun`, whose presence submitit checks) first on PATH keeps the script submitit wrote and
# refuses the submission, so the sweep stops there: nothing reaches a scheduler. The site values come from
# conf/local/slurm.yaml as for a real submission. Without hydra.sweep.dir=... among ARGS the sweep (and the paths in
# the script) go to a temporary folder, removed afterwards. PY: the interpreter (default .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir "$tmp/bin"
cat > "$tmp/bin/sbatch" <<'STUB'
#!/bin/sh
cp "$1" "$SBATCH_PREVIEW_OUT"
echo "sbatch_preview: not submitted" >&2
exit 1
STUB
printf '#!/bin/sh\nexit 1\n' > "$tmp/bin/srun"
chmod +x "$tmp/bin/sbatch" "$tmp/bin/srun"
sweep=()
case " $* " in *" hydra.sweep.dir="*) ;; *) sweep=("hydra.sweep.dir=$tmp/sweep") ;; esac
SBATCH_PREVIEW_OUT="$tmp/job.sh" PATH="$tmp/bin:$PATH" \
  "$PY" train.py --multirun hydra/launcher=slurm "${sweep[@]}" "$@" > "$tmp/log" 2>&1 || true
if [ -s "$tmp/job.sh" ]; then
  cat "$tmp/job.sh"
else
  cat "$tmp/log" >&2
  echo "sbatch_preview: no script was written (the error above stopped the sweep first)" >&2
  exit 1
fi
