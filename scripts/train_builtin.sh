#!/usr/bin/env bash
# Reproduce the built-in model (nextstep/assets/nextstep-shapes) on one GPU: ~25 minutes on an H100
# (2 minutes of data, 23 of training):
#   bash scripts/train_builtin.sh [OUT_DIR] [TRAIN_SECONDS]   (TRAIN_SECONDS=0: data, tokenizer and VAE only)
# Every stage skips work already done, and training resumes from its newest checkpoint, so the script can
# be run again (e.g. in a second call on the same machine) to continue. Training stops at max_steps or
# after TRAIN_SECONDS; the newest checkpoint is then exported in fp16 with sampling defaults for 128 px.
set -euo pipefail
OUT=${1:-runs/shapes/export}
TRAIN_SECONDS=${2:-100000}
N=${N:-400000}
if ! ls data/shapes/*.tar >/dev/null 2>&1; then
  nextstep data synth-shapes data/shapes --n "$N" --seed 0 --workers "$(nproc)"
fi
if [ ! -f runs/shapes/tokenizer/tokenizer.json ]; then
  nextstep data train-tokenizer data/shapes runs/shapes/tokenizer --vocab-size 1024 --max-samples 50000
fi
if [ ! -f runs/shapes/vae/checkpoint.pt ]; then
  nextstep vae train --data data/shapes --out runs/shapes/vae --ch 64 --ch-mult 1,1,2,2 --num-res-blocks 1 \
    --steps "${VAE_STEPS:-2000}" --batch 64 --workers 8
fi
# Training reads VAE latents, not PNGs: encoded once here (a rerun finishes an interrupted encode).
nextstep data encode-latents data/shapes data/shapes-latents --vae runs/shapes/vae --size 128 \
  --aspect-ratios 1 --workers "$(nproc)" --batch 512
if [ ! -f data/shapes-latents/index.json ]; then  # sample offsets: a resumed run seeks instead of re-reading
  nextstep data meta data/shapes-latents --workers "$(nproc)"
  nextstep data warmup data/shapes-latents --n_jobs "$(nproc)"
fi
if [ "$TRAIN_SECONDS" = 0 ]; then exit 0; fi  # data, tokenizer, VAE and latents only
resume=""
if ls runs/shapes/model/checkpoints/step-* >/dev/null 2>&1; then resume="--resume"; fi
timeout --signal=INT "$TRAIN_SECONDS" nextstep train -m configs.shapes $resume ${TRAIN_ARGS:-} \
  || echo "training ended early (time limit or error; see above)"
nextstep export runs/shapes/model "$OUT" --dtype float16 --max-shard-mb 8  # git-friendly files
python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path
import torch
out = Path(sys.argv[1])
state = torch.load(out / "vae" / "checkpoint.pt", weights_only=True)
torch.save({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, out / "vae" / "checkpoint.pt")
(out / "sampling_defaults.json").write_text(json.dumps(
    {"size": [128, 128], "steps": 20, "cfg": 3.0, "shift": 1.0, "negative_prompt": "",
     "edit": {"cfg": 3.0, "cfg_img": 1.5, "shift": 1.0, "steps": 20, "use_norm": False, "negative_prompt": ""}}, indent=2))
PY
du -sh "$OUT"
