#!/usr/bin/env bash
# Issue 22's kernels at the 14B shape on one GPU, one JSON line per result: every decoder linear (q/k/v and
# gate/up fused, as the engine runs them) and the head's linears in fp8/int8 against bf16 (bench/quant_gemv.py),
# then the fused head with fp8/int8 weights against the bf16 fused head and the torch heads (bench/quant_head.py).
#
#   bash bench/quant_kernels_gpu.sh | tee quant_kernels.jsonl        # about 5 minutes on an H200
#
# The tuning cache starts empty (a fresh folder unless NEXTSTEP_CACHE_DIR is set), so "first_call" and
# "head_tune_cold" include tuning; "head_tune_from_disk_cache" is what a second process pays.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
NEXTSTEP_CACHE_DIR="${NEXTSTEP_CACHE_DIR:-$(mktemp -d)}"
export NEXTSTEP_CACHE_DIR
python bench/quant_gemv.py --rows 1,2,8,32 --modes bf16,fp8,int8
python bench/quant_head.py --rows 2,8 --modes bf16,fp8,int8
