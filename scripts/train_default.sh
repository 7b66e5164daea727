#!/usr/bin/env bash
# Reproduce the built-in default checkpoint nh_serve/models/nh-small.safetensors, the
# leave-one-recording-out and ablation checkpoints, and the quality benchmark of
# docs/results.md (section "quality") and docs/model-card.md.
#
#   bash scripts/train_default.sh            # everything (about 1.5 h on 2 CPU cores)
#   bash scripts/train_default.sh default    # only the data and the default checkpoint
#   bash scripts/train_default.sh eval       # only the quality benchmark, on checkpoints already trained
#
# Data and run folders go to runs/ (git-ignored); no recording is ever committed.
# The real recordings are read from ../shared/data/real (override with REAL_DATA=...).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
NH=.venv/bin/nh-serve
REAL=${REAL_DATA:-../shared/data/real}
D=runs/data
R=$D/real
export OMP_NUM_THREADS=1

# ---- 1. data: synthetic recordings (train / validation / test by seed) and the real ones -----------
[ -d $D/synth_train ] || $NH synth --out $D/synth_train --sessions 40 --seed 1 --duration 240
[ -d $D/synth_val ] || $NH synth --out $D/synth_val --sessions 4 --seed 2 --duration 240
[ -d $D/synth_test ] || $NH synth --out $D/synth_test --sessions 10 --seed 3 --duration 300
[ -d $R ] || $PY -m training.data $REAL/ibl_brainbox_fixture $REAL/human_mtl_zheng2022 \
    $REAL/rat_ca1_linear_track --out $R

STAGE=${1:-all}
if [ "$STAGE" != eval ]; then
# ---- 2. the default checkpoint: synthetic + human MTL + rat CA1; the IBL recording is held out ------
$PY -m training.train --config nh-small-default \
    --data $D/synth_train $R/human_mtl_zheng2022.h5 $R/rat_ca1_linear_track.h5 \
    --val-data $D/synth_val --test-data $D/synth_test $R/ibl_brainbox_fixture.h5 \
    --out runs/train/default
mkdir -p nh_serve/models
cp runs/train/default/best.safetensors nh_serve/models/nh-small.safetensors
[ "$STAGE" = "default" ] && exit 0

# ---- 3. cheaper runs, same recipe with 450 steps (training/configs/nh-small-short.json) --------------
short() { name=$1; shift; $PY -m training.train --config nh-small-short --val-data $D/synth_val \
    --out runs/train/$name "$@"; }
# Leave-one-recording-out: human MTL held out (also the IDEncoder reference of the ablations) ...
short loro-mtl --data $D/synth_train $R/ibl_brainbox_fixture.h5 $R/rat_ca1_linear_track.h5 \
    --test-data $D/synth_test $R/human_mtl_zheng2022.h5
# ... and rat CA1 held out.
short loro-rat --data $D/synth_train $R/ibl_brainbox_fixture.h5 $R/human_mtl_zheng2022.h5 \
    --test-data $D/synth_test $R/rat_ca1_linear_track.h5
# Ablations on the loro-mtl data: unit embeddings (random projection, one linear layer) and the
# head without per-unit activity inputs / baseline offset.
short abl-random --data $D/synth_train $R/ibl_brainbox_fixture.h5 $R/rat_ca1_linear_track.h5 \
    --test-data $D/synth_test $R/human_mtl_zheng2022.h5 --set model_overrides.unit_embedding_mode=random
short abl-mean --data $D/synth_train $R/ibl_brainbox_fixture.h5 $R/rat_ca1_linear_track.h5 \
    --test-data $D/synth_test $R/human_mtl_zheng2022.h5 --set model_overrides.unit_embedding_mode=mean
short abl-noact --data $D/synth_train $R/ibl_brainbox_fixture.h5 $R/rat_ca1_linear_track.h5 \
    --test-data $D/synth_test $R/human_mtl_zheng2022.h5 --set head_ablation=no_activity

fi

# ---- 4. quality benchmark ----------------------------------------------------------------------------
mkdir -p runs/eval
# Default model on 10 unseen synthetic recordings (a window every 2 s) and on the held-out IBL
# recording (every 1 s; 30 s reference, automatic for a 2-minute recording), zero-shot and with
# test-time adaptation.
$NH eval --checkpoint nh_serve/models/nh-small.safetensors --title "default model, unseen synthetic recordings" \
    --adapt-steps 50 --stride 2 --json runs/eval/default-synth.json --no-progress $D/synth_test/*.h5
$NH eval --checkpoint nh_serve/models/nh-small.safetensors --title "default model, IBL held out" \
    --adapt-steps 50 --json runs/eval/default-ibl.json --no-progress $R/ibl_brainbox_fixture.h5
# Human MTL held out: the loro-mtl model and the ablations trained on the same data.
$NH eval --checkpoint runs/train/loro-mtl/best.safetensors --name idencoder \
    --compare random=runs/train/abl-random/best.safetensors --compare mean=runs/train/abl-mean/best.safetensors \
    --compare no_activity=runs/train/abl-noact/best.safetensors --title "human MTL held out, and ablations" \
    --stride 2 --json runs/eval/loro-mtl.json --no-progress $D/synth_test/*.h5 $R/human_mtl_zheng2022.h5
# Rat CA1 held out.
$NH eval --checkpoint runs/train/loro-rat/best.safetensors --title "rat CA1 held out" --adapt-steps 50 \
    --json runs/eval/loro-rat.json --no-progress $R/rat_ca1_linear_track.h5
$NH eval --report runs/eval/default-synth.json runs/eval/default-ibl.json runs/eval/loro-mtl.json runs/eval/loro-rat.json --doc docs/results.md
