#!/usr/bin/env bash
# Reproduce the built-in model (nextstep/assets/nextstep-shapes) on one GPU, ~10 minutes on an H100:
#   bash scripts/train_builtin.sh [OUT_DIR] [TRAIN_SECONDS]
# Data, tokenizer and VAE are made first; NextStep training stops at max_steps or after TRAIN_SECONDS
# (then the newest checkpoint is exported); the export is fp16 with sampling defaults for 128 px.
set -euo pipefail
OUT=${1:-runs/shapes/export}
TRAIN_SECONDS=${2:-100000}
N=${N:-200000}
nextstep data synth-shapes data/shapes --n "$N" --seed 0 --workers "$(nproc)"
nextstep data train-tokenizer data/shapes runs/shapes/tokenizer --vocab-size 1024 --max-samples 50000
nextstep vae train --data data/shapes --out runs/shapes/vae --ch 64 --ch-mult 1,1,2,2 --num-res-blocks 1 \
  --steps "${VAE_STEPS:-2000}" --batch 64 --workers 8
timeout --signal=INT "$TRAIN_SECONDS" nextstep train -m configs.shapes ${TRAIN_ARGS:-} || echo "training ended early (time limit or error; see above)"
nextstep export runs/shapes/model "$OUT" --dtype float16
python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path
import torch
out = Path(sys.argv[1])
state = torch.load(out / "vae" / "checkpoint.pt", weights_only=True)
torch.save({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, out / "vae" / "checkpoint.pt")
for extra in ("train_state.pt", "train_config.json"):
    (out / "vae" / extra).unlink(missing_ok=True)
(out / "sampling_defaults.json").write_text(json.dumps(
    {"size": [128, 128], "steps": 20, "cfg": 3.0, "shift": 1.0, "negative_prompt": "",
     "edit": {"cfg": 3.0, "cfg_img": 1.5, "shift": 1.0, "steps": 20, "use_norm": False, "negative_prompt": ""}}, indent=2))
PY
