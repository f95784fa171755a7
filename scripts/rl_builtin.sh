#!/usr/bin/env bash
# One GPU session: RL post-training of the built-in model (configs.rl_shapes) for LIMIT seconds, then its fp16
# export (8 MB shards, the shipped sampling_defaults.json) and `nextstep eval shapes --n 50` on both splits of the
# RL model and of the shipped one. The caller sets PYTHONPATH (the repository and its wheels); run from the
# repository root:
#   bash scripts/rl_builtin.sh [LIMIT_SECONDS=420] [override ...]     e.g. ... 420 optim.lr=3e-5
# BASE (the shipped model): the export RL starts from and is compared with, e.g. a stage 4 export.
# EVAL_N (50): eval prompts per category; RL_TESTS=0 skips the GPU rollout tests. Prints a few lines: the GPU rollout tests, the training summary (first
# and last 20 steps), one JSON line per split and model. Into $OUT (default runs/rl_builtin): rl_train.log,
# rl_metrics.jsonl, evals.tgz and the RL model's weight shards.
set -u
LIMIT=${1:-420}
shift $(($# > 0 ? 1 : 0))
OUT=${OUT:-runs/rl_builtin}
WORK=${WORK:-/tmp/rl_builtin}
N=${EVAL_N:-50}  # eval prompts per category (and batch size)
BASE=${BASE:-nextstep/assets/nextstep-shapes}
if [ ! -f "$BASE/config.json" ] || [ ! -f "$BASE/sampling_defaults.json" ]; then
  echo "BASE=$BASE is not a model export with sampling defaults (config.json, sampling_defaults.json)" >&2
  exit 2
fi
CLI="python3 -m nextstep.cli"
export PYTHONUNBUFFERED=1
mkdir -p "$OUT" && rm -rf "$WORK" && mkdir -p "$WORK/ev"
T0=$(date +%s)
t() { echo "t=$(($(date +%s) - T0)) $*"; }

if [ "${RL_TESTS:-1}" != 0 ]; then  # RL_TESTS=0: the caller runs the GPU tests itself
  timeout 150 python3 -m pytest -q -p no:cacheprovider tests/rl/test_rollout.py tests/rl/test_policy.py \
    -k "fast_engine or cuda" 2>&1 | tail -1
  t gpu-tests
fi
# SIGINT at the limit: the loop finishes its step, saves a checkpoint and stops; -k: killed if that hangs.
timeout -k 60 --signal=INT "$LIMIT" $CLI train -m configs.rl_shapes model.path="$BASE" training.output_dir="$WORK/run" \
  logging.log_steps=1 logging.sample_steps=0 training.save_steps=1000 checkpoint.export_final=false "$@" \
  > "$OUT/rl_train.log" 2>&1
echo "train exit $? ($(grep -c 'stopped by signal' "$OUT/rl_train.log") stop-by-signal lines," \
  "$(ls -d "$WORK"/run/checkpoints/step-* 2>/dev/null | tail -1))"
t train
cp "$WORK/run/metrics.jsonl" "$OUT/rl_metrics.jsonl" 2>/dev/null || { tail -5 "$OUT/rl_train.log"; exit 1; }
python3 - "$OUT/rl_metrics.jsonl" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]

def mean(key, part):
    vals = [r[key] for r in part if key in r and r[key] == r[key]]  # NaN-free
    return round(sum(vals) / len(vals), 4) if vals else None

out = {"steps": rows[-1]["step"]}
out.update({f"{k}_first20": mean(k, rows[:20]) for k in ("reward_mean", "edit_reward_mean")})
out.update({f"{k}_last20": mean(k, rows[-20:]) for k in ("reward_mean", "edit_reward_mean", "kl", "kept_groups")})
out.update({k: mean(k, rows[5:]) for k in ("rollout_s", "update_s")})  # seconds per step after warm-up
print(json.dumps(out))
PY
$CLI export "$WORK/run" "$WORK/export" --dtype float16 --max-shard-mb 8 2>&1 | tail -1
cp "$BASE/sampling_defaults.json" "$WORK/export/"
t export
# summary MODEL RC LOG: the eval's JSON line named by its model, or how it failed
summary() {
  python3 - "$@" <<'PY'
import json, sys
model, rc, lines = sys.argv[1], sys.argv[2], open(sys.argv[3]).read().strip().splitlines()
try:
    result = json.loads(lines[-1])
    result.pop("out", None)
    print(json.dumps({"model": model, **result}))
except (IndexError, ValueError):
    print(json.dumps({"model": model, "error": f"exit {rc}", "tail": [line[-200:] for line in lines[-3:]]}))
PY
}
for split in in heldout; do
  for model in rl base; do
    args=(--split "$split" --n "$N" --batch-size "$N" --out "$WORK/ev/${model}_$split")
    if [ "$model" = rl ]; then args+=(--model "$WORK/export"); else args+=(--model "$BASE"); fi
    timeout 150 $CLI eval shapes "${args[@]}" > "$WORK/ev/${model}_$split.log" 2>&1
    summary "$model" $? "$WORK/ev/${model}_$split.log"
  done
  t "eval-$split"
done
tar czf "$OUT/evals.tgz" -C "$WORK" ev
cp "$WORK"/export/model*.safetensors* "$OUT/"
