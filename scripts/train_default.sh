#!/usr/bin/env bash
# Reproduce the built-in default checkpoint nh_serve/models/nh-small.safetensors (with the univariate
# GLM baseline nh_serve/models/univariate_glm.json), the leave-one-recording-out and ablation
# checkpoints, and the quality benchmark of docs/results.md and docs/model-card.md.
#
#   bash scripts/train_default.sh            # everything, one run after the other (over an hour on 2 CPU cores)
#   bash scripts/train_default.sh default    # only the data and the default checkpoint
#   bash scripts/train_default.sh others     # only the data and the leave-one-out and ablation checkpoints
#   bash scripts/train_default.sh train      # data and every checkpoint, no benchmark
#   bash scripts/train_default.sh eval       # only the quality benchmark, on checkpoints already trained
#
# Every run trains on one thread: on two cores, run `default` and `others` in two shells at once, then
# `eval`. Each run's summary.json records its training time (docs/model-card.md lists them).
#
# Resumable: a run that finished is skipped, one that was stopped continues from its training state
# (training.train --resume), so the script may be run again after an interruption.
# Data and run folders go to runs/ (git-ignored); no recording is ever committed. The real recordings
# are read from ../shared/data/real (override with REAL_DATA=...); every recording found there is used.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
NH=.venv/bin/nh-serve
REAL=${REAL_DATA:-../shared/data/real}
D=runs/data
R=$D/real
export OMP_NUM_THREADS=1
STAGE=${1:-all}

# ---- 1. data: synthetic recordings (train / validation / test by seed) and the real ones -----------
[ -d $D/synth_train ] || $NH synth --out $D/synth_train --sessions 40 --seed 1 --duration 240
[ -d $D/synth_val ] || $NH synth --out $D/synth_val --sessions 4 --seed 2 --duration 240
[ -d $D/synth_test ] || $NH synth --out $D/synth_test --sessions 10 --seed 3 --duration 300
REAL_DIRS=$(find "$REAL" -mindepth 2 -maxdepth 2 -name spikes_flat.npz -printf '%h\n' | sort)
[ -n "$REAL_DIRS" ] || { echo "no real recordings (spikes_flat.npz) under $REAL" >&2; exit 1; }
for dir in $REAL_DIRS; do
  [ -f "$R/$(basename "$dir").h5" ] || $PY -m training.data "$dir" --out $R
done
REALS=$(for dir in $REAL_DIRS; do echo "$R/$(basename "$dir").h5"; done)

# One training run, skipped when it finished before and resumed when it was stopped.
train() {
  local name=$1; shift
  local out=runs/train/$name
  if [ -f "$out/DONE" ]; then echo "[train_default] $name: done before, skipped"; return; fi
  $PY -m training.train --out "$out" --resume --no-progress "$@"
  touch "$out/DONE"
}

if [ "$STAGE" = all ] || [ "$STAGE" = train ] || [ "$STAGE" = default ]; then
# ---- 2. the default checkpoint: synthetic recordings and every real recording -----------------------
# (real recordings weighted 4x per window, training/configs/nh-small-default.json). Its real-data
# quality is measured by the leave-one-recording-out runs below, never on its own training data.
# shellcheck disable=SC2086
train default --config nh-small-default --data $D/synth_train $REALS --val-data $D/synth_val \
    --test-data $D/synth_test
mkdir -p nh_serve/models
cp runs/train/default/best.safetensors nh_serve/models/nh-small.safetensors
# The univariate GLM baseline fitted on the same training recordings (eval and score compare against it).
# shellcheck disable=SC2086
$NH fit-baselines $D/synth_train $REALS --weight real/=10 --no-progress --out nh_serve/models/univariate_glm.json
[ "$STAGE" = "default" ] && exit 0
fi

if [ "$STAGE" = all ] || [ "$STAGE" = train ] || [ "$STAGE" = others ]; then
# ---- 3. leave-one-recording-out: one shorter run per real recording, that recording held out --------
for held in $REALS; do
  name=loro-$(basename "$held" .h5)
  others=$(for r in $REALS; do [ "$r" = "$held" ] || echo "$r"; done)
  # shellcheck disable=SC2086
  train "$name" --config nh-small-short --data $D/synth_train $others --val-data $D/synth_val \
      --test-data $D/synth_test "$held"
done

# ---- 4. ablations, trained like the default for the short recipe: no per-unit path, no population path,
# and a history of at most 30 s instead of 120 s ------------------------------------------------------
# shellcheck disable=SC2086
train abl-base --config nh-small-short --data $D/synth_train $REALS --val-data $D/synth_val --test-data $D/synth_test
# shellcheck disable=SC2086
train abl-no-unit-path --config nh-small-short --data $D/synth_train $REALS --val-data $D/synth_val \
    --test-data $D/synth_test --set model_overrides.uni_path=false
# shellcheck disable=SC2086
train abl-no-pop-path --config nh-small-short --data $D/synth_train $REALS --val-data $D/synth_val \
    --test-data $D/synth_test --set model_overrides.pop_path=false
# shellcheck disable=SC2086
train abl-short-history --config nh-small-short --data $D/synth_train $REALS --val-data $D/synth_val \
    --test-data $D/synth_test --set 'model_overrides.history_taus=[0.05,0.25,1.0,5.0,30.0]'
fi
[ "$STAGE" = train ] || [ "$STAGE" = others ] && exit 0

# ---- 5. quality benchmark ----------------------------------------------------------------------------
mkdir -p runs/eval
# Default model on 10 unseen synthetic recordings (a window every 2 s), with the reference fit (and on windows
# twice as dense: fit="reference-dense"), zero-shot
# and with the units' descriptors shuffled among them.
$NH eval --checkpoint nh_serve/models/nh-small.safetensors --title "default model, unseen synthetic recordings" \
    --stride 2 --shuffled-units --dense-fit --json runs/eval/default-synth.json --no-progress $D/synth_test/*.h5
# Every real recording scored by the run that never saw it.
jsons=(runs/eval/default-synth.json)
for held in $REALS; do
  name=$(basename "$held" .h5)
  $NH eval --checkpoint "runs/train/loro-$name/best.safetensors" --name "loro-$name" \
      --title "$name held out (leave-one-recording-out)" --dense-fit --refit-every 60 --refit-window 180 --json "runs/eval/loro-$name.json" --no-progress "$held"
  jsons+=("runs/eval/loro-$name.json")
done
# Ablations on the unseen synthetic recordings.
$NH eval --checkpoint runs/train/abl-base/best.safetensors --name short-recipe \
    --compare no_unit_path=runs/train/abl-no-unit-path/best.safetensors \
    --compare no_pop_path=runs/train/abl-no-pop-path/best.safetensors \
    --compare history_30s=runs/train/abl-short-history/best.safetensors \
    --title "ablations (short recipe), unseen synthetic recordings" --stride 4 \
    --json runs/eval/ablations.json --no-progress $D/synth_test/*.h5
jsons+=(runs/eval/ablations.json)
$NH eval --report "${jsons[@]}" --doc docs/results.md
