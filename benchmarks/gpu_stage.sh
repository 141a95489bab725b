#!/usr/bin/env bash
# Stages of a re-tune on a lent GPU machine that has no network and takes at most 64 MiB per call.
#
# Usage: benchmarks/gpu_stage.sh STAGE [ARGS...]      (run from the repository root, $OUT set)
#
#   stash FILE...      copy carried files to /tmp/stash (the machine keeps /tmp while it stays warm)
#   setup              unpack Triton 3.8.0 (zstd parts) to /tmp/t38 and Ray to /tmp/ray; check both import
#   tune NAME SECS ARGS...  run `tune-moe ARGS` for at most SECS seconds (SIGINT then), log to $OUT/NAME.log,
#                      and bring its results.jsonl, run.json and written files back under $OUT/NAME*;
#                      runs named alike up to the first '-' share a Triton cache (w1 and main-* do not)
#   kill-after SECS    in the background: SIGKILL one tune-moe Ray worker after SECS seconds
#
# The environment every stage exports: Triton 3.8.0 (the Triton vLLM 0.33.0 runs) ahead of the machine's
# own, Ray, and this checkout; vLLM 0.33.0's kernel comes from /tmp/stash/fused_moe_v033.py.
set -euo pipefail
stage=${1:?stage}; shift
export TRITON_BACKENDS_IN_TREE=1 PYTHONUNBUFFERED=1 RAY_DISABLE_USAGE_STATS=1 RAY_AUTH_MODE=disabled
export PYTHONPATH=/tmp/t38:/tmp/ray:$PWD${PYTHONPATH:+:$PYTHONPATH}
export PATH=/tmp/ray/bin:$PATH
runs=/tmp/runs
case "$stage" in
  stash)
    mkdir -p /tmp/stash && cp -v "$@" /tmp/stash/ ;;
  setup)
    mkdir -p /tmp/t38 /tmp/ray
    cat /tmp/stash/part-00 "$@" | python3 /tmp/stash/unzstd.py | tar xf - -C /tmp/t38
    chmod +x /tmp/t38/triton/backends/nvidia/bin/*  # the pack is made from the wheel's zip, which keeps no modes
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
    timeout -s INT -k 60 "$secs" python3 -m tuning.cli "$@" --vllm-src /tmp/stash/fused_moe_v033.py \
      --vllm-version 0.33.0 > "$OUT/$name.log" 2>&1
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
  *) sed -n '2,14p' "$0"; exit 2 ;;
esac
