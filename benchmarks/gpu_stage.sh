#!/usr/bin/env bash
# Stages of a re-tune on a lent GPU machine that has no network and takes at most 64 MiB per call.
#
# Usage: benchmarks/gpu_stage.sh STAGE [ARGS...]      (run from the repository root, $OUT set)
#
#   stash FILE...      copy carried files to /tmp/stash (the machine keeps /tmp while it stays warm)
#   setup [PARTS...]   unpack Ray to /tmp/ray and, given the zstd parts of Triton 3.8.0, Triton to /tmp/t38
#                      (for vLLM 0.26, which runs the machine's own Triton 3.6.0, give none); check what imports
#   tune NAME SECS ARGS...  run `tune-moe ARGS` for at most SECS seconds (SIGINT then), log to $OUT/NAME.log,
#                      and bring its results.jsonl, run.json and written files back under $OUT/NAME*;
#                      runs named alike up to the first '-' share a Triton cache (w1 and main-* do not)
#   kill-after SECS    in the background: SIGKILL one tune-moe Ray worker after SECS seconds
#
# The environment every stage exports: Triton 3.8.0 (the Triton vLLM 0.33.0 runs) ahead of the machine's
# own when it was unpacked, Ray, and this checkout. The kernel is vLLM 0.33.0's, /tmp/stash/fused_moe_v033.py,
# unless TUNE_MOE_STAGE_SRC and TUNE_MOE_STAGE_VLLM name another (e.g. /tmp/stash/fused_moe_v026.py and 0.26.0).
set -euo pipefail
stage=${1:?stage}; shift
export PYTHONUNBUFFERED=1 RAY_DISABLE_USAGE_STATS=1 RAY_AUTH_MODE=disabled
if [ -d /tmp/t38/triton ]; then
  export TRITON_BACKENDS_IN_TREE=1  # the unpacked Triton has no entry points; the machine's own needs nothing
fi
export PYTHONPATH=/tmp/t38:/tmp/ray:$PWD${PYTHONPATH:+:$PYTHONPATH}
export PATH=/tmp/ray/bin:$PATH
runs=/tmp/runs
case "$stage" in
  stash)
    mkdir -p /tmp/stash && cp -v "$@" /tmp/stash/ ;;
  setup)
    mkdir -p /tmp/ray
    if [ "$#" -gt 0 ]; then
      mkdir -p /tmp/t38
      cat /tmp/stash/part-00 "$@" | python3 /tmp/stash/unzstd.py | tar xf - -C /tmp/t38
      chmod +x /tmp/t38/triton/backends/nvidia/bin/*  # the pack is made from the wheel's zip, which keeps no modes
    fi
    python3 /tmp/stash/unzstd.py < /tmp/stash/ray-site.tar.zst | tar xf - -C /tmp/ray
    python3 -c 'import triton, ray, torch; print("triton", triton.__version__, "ray", ray.__version__, "torch",
                torch.__version__, "gpus", torch.cuda.device_count())'
    nvidia-smi --query-gpu=index,name,memory.used,memory.total,driver_version --format=csv ;;
  tune)
    name=$1 secs=$2; shift 2
    mkdir -p "$runs"
    export TRITON_CACHE_DIR=/tmp/triton-cache-${name%%-*}  # w1 and main compile from cold caches of their own
    start=$(date +%s)
    set +e
    timeout -s INT -k 60 "$secs" python3 -m tuning.cli "$@" --vllm-src "${TUNE_MOE_STAGE_SRC:-/tmp/stash/fused_moe_v033.py}" \
      --vllm-version "${TUNE_MOE_STAGE_VLLM:-0.33.0}" > "$OUT/$name.log" 2>&1
    rc=$?
    set -e
    echo "$name: exit $rc after $(( $(date +%s) - start )) s" | tee -a "$OUT/$name.log"
    out=$(sed -n 's/.* jobs already done in \(.*\)\/\.tune-moe;.*/\1/p' "$OUT/$name.log" | head -1)
    if [ -n "$out" ]; then
      cp "$out/.tune-moe/results.jsonl" "$OUT/$name.results.jsonl" 2>/dev/null || true
      cp "$out/.tune-moe/run.json" "$OUT/$name.run.json" 2>/dev/null || true
      (cd "$out" && tar cf "$OUT/$name.files.tar" --exclude=.tune-moe . 2>/dev/null) || true
    fi ;;
  kill-after)
    secs=$1
    (sleep "$secs"; pid=$(pgrep -f 'ray::TuneWorker' | head -1)
     if [ -n "$pid" ]; then kill -9 "$pid" && echo "SIGKILL sent to worker pid $pid at $(date +%T)" >> "$OUT/kill.log"; fi) &
    ;;
  *) sed -n '2,16p' "$0"; exit 2 ;;
esac
