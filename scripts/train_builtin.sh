#!/usr/bin/env bash
# Reproduce the built-in model (nextstep/assets/nextstep-shapes) on one GPU, roughly 45 minutes on an H100
# (data 4 minutes, stage 1 (configs.shapes) ~11, stage 2 (configs.shapes_stage2, image-input noise) ~13,
# data 3 and stage 3a (configs.shapes_stage3_attn, attention-only, twice the noise) ~15). STAGES names the
# last stage: 3a (default, shipped), 2, 3 (configs.shapes_stage3) or 4 (stage 3, then configs.shapes_stage4):
#   bash scripts/train_builtin.sh [OUT_DIR] [TRAIN_SECONDS]   (TRAIN_SECONDS=0: data, tokenizer and VAE only)
# Every stage skips work already done, and training resumes from its newest checkpoint, so the script can
# be run again (e.g. in a second call on the same machine) to continue. A training stage stops at its
# max_steps or after TRAIN_SECONDS; each stage starts once the one before has finished. The newest
# checkpoint of the last stage is then exported in fp16 with its sampling defaults (128 px, tuned guidance).
# STAGE2=DIR starts stages 3, 3a and 4 from a stage 2 export (with its VAE and tokenizer) instead of training
# stages 1 and 2 (~30 min of data and training): the one shipped at commit 2e700f6, for instance:
#   git archive 2e700f6 nextstep/assets/nextstep-shapes | tar x -C /tmp   (DIR: /tmp/nextstep/assets/nextstep-shapes)
# STAGE3=DIR (with STAGES=4) likewise starts stage 4 from a stage 3 export, e.g. one a shorter run brought back.
set -euo pipefail
OUT=${1:-runs/shapes/export}
TRAIN_SECONDS=${2:-100000}
N=${N:-400000}
STAGES=${STAGES:-3a}
STAGE2=${STAGE2:-}
STAGE3=${STAGE3:-}
case "$STAGES" in 2 | 3 | 3a | 4) ;; *) echo "STAGES must be 2, 3, 3a or 4, not '$STAGES'" >&2; exit 2 ;; esac
if [ -n "$STAGE2" ] && [ "$STAGES" = 2 ]; then echo "STAGE2 is stage 2's export: STAGES must be 3, 3a or 4" >&2; exit 2; fi
if [ -n "$STAGE3" ] && [ "$STAGES" != 4 ]; then echo "STAGE3 is stage 3's export: STAGES must be 4" >&2; exit 2; fi
# start_from NAME DIR: a stage's export as runs/shapes/NAME, its tokenizer and VAE as the runs' own
start_from() {
  for f in config.json model.safetensors.index.json tokenizer.json vae/checkpoint.pt; do
    if [ ! -f "$2/$f" ]; then echo "$2 is not a model export: no $f" >&2; exit 2; fi
  done
  mkdir -p "runs/shapes/$1" runs/shapes/tokenizer runs/shapes/vae
  cp -r "$2"/. "runs/shapes/$1/"
  cp "$2"/tokenizer*.json "$2"/special_tokens_map.json runs/shapes/tokenizer/
  cp "$2"/vae/* runs/shapes/vae/
}
if [ -n "$STAGE2" ]; then start_from stage2 "$STAGE2"; fi
if [ -n "$STAGE3" ]; then start_from stage3 "$STAGE3"; STAGE2=$STAGE3; fi  # stages 1-3 are skipped
# synth-shapes keeps the shards a run before finished (an interrupted one resumes).
if [ -z "$STAGE2" ]; then nextstep data synth-shapes data/shapes --n "$N" --seed 0 --workers "$(nproc)"; fi
if [ ! -f runs/shapes/tokenizer/tokenizer.json ]; then
  nextstep data train-tokenizer data/shapes runs/shapes/tokenizer --vocab-size 1024 --max-samples 50000
fi
if [ ! -f runs/shapes/vae/checkpoint.pt ]; then
  nextstep vae train --data data/shapes --out runs/shapes/vae --ch 64 --ch-mult 1,1,2,2 --num-res-blocks 1 \
    --steps "${VAE_STEPS:-2000}" --batch 64 --workers 8
fi
# latents SRC DST: training reads VAE latents, not PNGs: encoded once (a rerun encodes only the shards not
# yet encoded, e.g. after --n grew), then indexed (sample offsets: a resumed run seeks instead of
# re-reading). meta rescans only new or changed shards; the index is rebuilt to match it.
latents() {
  nextstep data encode-latents "$1" "$2" --vae runs/shapes/vae --size 128 --aspect-ratios 1 \
    --workers "$(nproc)" --batch 512
  nextstep data meta "$2" --workers "$(nproc)"
  nextstep data warmup "$2" --n_jobs "$(nproc)"
}
if [ -z "$STAGE2" ]; then latents data/shapes data/shapes-latents; fi
if [ "$TRAIN_SECONDS" = 0 ]; then exit 0; fi  # data, tokenizer, VAE and latents only
# train DIR PRESET: run (or resume) a preset until its max_steps or TRAIN_SECONDS; true once it has finished.
train() {
  local resume=""
  if ls "$1"/checkpoints/step-* >/dev/null 2>&1; then resume="--resume"; fi
  timeout --signal=INT "$TRAIN_SECONDS" nextstep train -m "$2" $resume ${TRAIN_ARGS:-} \
    || echo "training ended early (time limit or error; see above)"
  local max; max=$(python3 -c "from $2 import config; print(config.training.max_steps)")
  [ -d "$1/checkpoints/step-$(printf %08d "$max")" ]
}
# export_once RUN DIR: the newest checkpoint of a finished stage in fp16, the next stage's starting point.
export_once() {
  if [ ! -f "$2/config.json" ]; then nextstep export "$1" "$2" --dtype float16; fi
}
if [ -z "$STAGE2" ]; then
  train runs/shapes/model configs.shapes || exit 0  # stage 1 not finished: run the script again
  # Stage 2 starts from stage 1's fp16 export (what shipped before), on 200k fresh scenes.
  export_once runs/shapes/model runs/shapes/stage1
  nextstep data synth-shapes data/shapes-ft --n 200000 --seed 1 --workers "$(nproc)"
  latents data/shapes-ft data/shapes-ft-latents
  train runs/shapes/model-stage2 configs.shapes_stage2 || exit 0
  LAST=runs/shapes/model-stage2
  if [ "$STAGES" != 2 ]; then export_once runs/shapes/model-stage2 runs/shapes/stage2; fi
fi
ft3() {  # stages 3a and 4: 300k fresh scenes with counted-group relations
  nextstep data synth-shapes data/shapes-ft3 --n 300000 --seed 3 --p-no-color 0.5 --p-group-relation 0.3 \
    --workers "$(nproc)"
  latents data/shapes-ft3 data/shapes-ft3-latents
}
if [ "$STAGES" = 3a ]; then  # from stage 2's export: attention, norms, embeddings and projectors only
  ft3
  train runs/shapes/model-stage3-attn configs.shapes_stage3_attn || exit 0
  LAST=runs/shapes/model-stage3-attn
fi
if [ "$STAGES" = 3 ] || { [ "$STAGES" = 4 ] && [ -z "$STAGE3" ]; }; then  # from stage 2's export, 300k scenes
  nextstep data synth-shapes data/shapes-ft2 --n 300000 --seed 2 --workers "$(nproc)"
  latents data/shapes-ft2 data/shapes-ft2-latents
  train runs/shapes/model-stage3 configs.shapes_stage3 || exit 0
  LAST=runs/shapes/model-stage3
fi
if [ "$STAGES" = 4 ]; then  # from stage 3's export
  export_once runs/shapes/model-stage3 runs/shapes/stage3
  ft3
  train runs/shapes/model-stage4 configs.shapes_stage4 || exit 0
  LAST=runs/shapes/model-stage4
fi
nextstep export "$LAST" "$OUT" --dtype float16 --max-shard-mb 8  # git-friendly files
python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path
import torch
out = Path(sys.argv[1])
state = torch.load(out / "vae" / "checkpoint.pt", weights_only=True)
torch.save({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, out / "vae" / "checkpoint.pt")
# nextstep export wrote the run's size, steps, guidance and trained sizes; these are tuned on the shapes eval.
defaults = json.loads((out / "sampling_defaults.json").read_text())
defaults.update({"steps": 20, "cfg": 3.0, "shift": 1.0, "negative_prompt": "",
     "edit": {"cfg": 3.0, "cfg_img": 1.5, "shift": 1.0, "steps": 20, "use_norm": False, "negative_prompt": "",
              "context_noise": 0.3}})
defaults["trained"]["edit_instructions"] = "shapes"  # trained on nextstep.shapes' edit templates only
defaults["trained"]["prompts"] = "shapes"  # and on its caption vocabulary: generate names unknown words
(out / "sampling_defaults.json").write_text(json.dumps(defaults, indent=2) + "\n")
PY
du -sh "$OUT"
