#!/usr/bin/env bash
# Stages of a re-tune on a lent GPU machine that has no network and takes at most 64 MiB per call.
#
# Usage: benchmarks/gpu_stage.sh STAGE [ARGS...]      (run from the repository root, $OUT set)
#
#   stash FILE...      copy carried files to /tmp/stash (the machine keeps /tmp while it stays warm)
#   setup [PARTS...]   unpack Ray to /tmp/ray and, given the zstd parts of Triton 3.8.0, Triton to /tmp/t38
#                      (for vLLM 0.26, which runs the machine's own Triton 3.6.0, give none); check what imports
#   tune NAME SECS ARGS...  run `tune-moe ARGS` for at most SECS seconds (SIGINT then), log to $OUT/NAME.log,
#                      its phases to $OUT/NAME.phases.json (run_phases.py: where the seconds outside its jobs go),
#                      and bring its results.jsonl, run.json and written files back under $OUT/NAME*;
#                      runs named alike up to the first '-' share a Triton cache (w1 and main-* do not)
#   tune-kill NAME SECS ARGS...  the same, but SIGKILL (the driver, its Ray and its workers) after SECS seconds:
#                      a crash mid-run; `tune` with the same --out after it resumes
#   kill-after SECS    in the background: SIGKILL one tune-moe Ray worker after SECS seconds
#   bg "STAGE ARGS; STAGE ARGS; ..."  run those stages one after another, detached (they outlive the call while
#                      the machine stays warm, so one run can be longer than a call), each with OUT=/tmp/bg; a
#                      stage may start with VAR=value words, its own environment (TUNE_MOE_STAGE_SRC=... tune ...)
#   bg-wait SECS       wait at most SECS for them; print the end of each log and bring /tmp/bg (without the
#                      written files' tars until the last stage is done) and every run's state folder
#                      (.tune-moe: results.jsonl, run.json) back as $OUT/bg.tar, so a lost machine loses nothing
#   ray ARGS...        Ray's own CLI in this environment (`ray start --head`, `ray status`, `ray stop`): a cluster the
#                      run did not start, whose workers inherit this environment, for `tune ... --ray-address auto`
#   cli NAME SECS ARGS...  any `tune-moe ARGS` (verify, report, ...) in this environment, log to $OUT/NAME.log,
#                      exiting as it did; after `verify --keep-confirmed OUT`, the ledger of --configs as
#                      $OUT/NAME.judged.jsonl and OUT as $OUT/NAME.out.tar
#   py NAME SECS SCRIPT ARGS...  `python3 SCRIPT ARGS` (a benchmarks/ script) in this environment, log to $OUT/NAME.log
#   cli-smi NAME SECS ARGS...  the same, each log line stamped with its time, and the GPU's clocks, temperatures,
#                      power and clock-event reasons sampled every 200 ms to $OUT/NAME.smi.csv (benchmarks/gpu_state.py
#                      puts them beside each batch size a verify timed)
#
#   pack-ray           run HERE: Ray 2.60.0 for cp312 and what it imports that the GPU machine lacks, without
#                      ray/jars/ (Java workers), tar | zstd -19: .gpu/ray/ray-site.tar.zst (about 31 MiB)
#
# The backend bake-off (tune-moe compare-backends; benchmarks/README.md has the calls in order):
#   pack-sources       run HERE, not on the GPU machine: vLLM's source files the bake-off loads ($SRC_DIR, default
#                      .gpu/vllm-src/) and vLLM's bundled DeepGEMM ($DG_OUT, default .gpu/dg.tar.zst), from the vLLM of
#                      $PYTHON, or from the package folder $VLLM_PKG
#   pack-ops           run HERE: the compiled CUDA ops of $PYTHON's vLLM, or of the package folder $VLLM_PKG
#                      (_C_stable_libtorch.abi3.so, _moe_C_stable_libtorch.abi3.so, and their SHA256SUMS), tar | zstd -19
#                      --long=27, split into parts of at most 36 MiB (a call carries the checkout too):
#                      $OPS_DIR (default .gpu/vllm-ops)/ops-part-00, -01, ... (stash each, one call per part)
#   setup-ops          join /tmp/stash/ops-part-*, unpack to /tmp/vllm-ops, check the sums, and that torch loads both
#                      libraries and registers vLLM's ops (torch.ops._moe_C.moe_sum, torch.ops._C.silu_and_mul, ...)
#   setup-t38 PART...  unpack Triton 3.8.0 alone (no Ray) from /tmp/stash/part-00 and PART to /tmp/t38
#   setup-dg           unpack /tmp/stash/dg.tar.zst to /tmp/dg (the bake-off's --deep-gemm-path)
#   flashinfer-setup   unpack FlashInfer 0.7.2.post1 and apache-tvm-ffi (/tmp/stash/fi-part-*, made by
#                      benchmarks/pack_flashinfer.sh) to /tmp/fi; check that cutlass_fused_moe imports
#   flashinfer-build [full]  start, in a session of its own (it outlives the call while the machine stays warm),
#                      the build of FlashInfer's SM90 CUTLASS fused MoE for the block-FP8 path vLLM runs
#                      (benchmarks/flashinfer_blockscale.py: 28 of its 248 files, installed as the AOT module), or
#                      with `full` FlashInfer's own JIT build of all 248; cache /tmp/fi-cache, log /tmp/fi-build.log
#   flashinfer-wait SECS   wait at most SECS for that build, print the end of its log; fail if it is not done
#   flashinfer-check   one FlashInfer block-scale call per M at the DP8+EP shape against the float reference
#   flashinfer-pack [FIRST]  the built fused_moe_90.so (and its BUILD.json) back under $OUT as xz parts of 15 MiB
#                      (fi-aot-part-*, fi-aot.sha256), four parts a call from FIRST (default 0): keep them in
#                      .gpu/flashinfer/, so later sessions install it instead of building
#   flashinfer-aot     install stashed fi-aot-part-* (flashinfer-pack's, or benchmarks/build_flashinfer_aot.sh's,
#                      built without a GPU) as FlashInfer's AOT module and load it, JIT disabled; print BUILD.json
#   bakeoff NAME SECS ARGS...  `tune-moe compare-backends ARGS` for at most SECS seconds (SIGINT then), vLLM's
#                      sources from .gpu/vllm-src (or $TUNE_MOE_STAGE_SOURCES: a copy in /tmp outlives the call that
#                      carried it, for a bake-off in a bg chain), DeepGEMM from /tmp/dg, vLLM's CUDA ops from /tmp/vllm-ops when
#                      setup-ops made it (else the stand-ins); log, JSON and advice under $OUT/NAME.*; the
#                      advice accumulates over the calls in /tmp/runs/backend_advice.json
#
# The reduced validation serve on vLLM 0.26.0 (../shared/tools/pack-vllm-site.sh parts, stashed first):
#   pack-vllm-extras   run HERE: what that pack lacks for an FP8 serve (vLLM 0.26 imports compressed-tensors
#                      0.17.0, and it loguru, when it checks any quantisation): .gpu/vllm026/vllm026-extras.tar.zst
#   vllm-setup         join /tmp/stash/vllm026-site.tar.xz.part0..2, check the sha256, unpack to /tmp/v026site,
#                      and the extras when /tmp/stash holds them
#   serve-bg NAME ARGS...  start `tune-moe validate-serve ARGS --out /tmp/runs/NAME` detached, with vLLM 0.26 on
#                      PYTHONPATH and PATH and VLLM_USE_FLASHINFER_SAMPLER=0 (an A/B outlives one 10-minute call)
#   serve-wait NAME SECS   wait at most SECS for it; bring its log and a tar of its folder back under $OUT
#
# The environment every stage exports: Triton 3.8.0 (the Triton vLLM 0.33.0 runs) ahead of the machine's
# own when it was unpacked, Ray, FlashInfer, and this checkout. The kernel is vLLM 0.33.0's,
# /tmp/stash/fused_moe_v033.py, unless TUNE_MOE_STAGE_SRC and TUNE_MOE_STAGE_VLLM name another
# (e.g. /tmp/stash/fused_moe_v026.py and 0.26.0).
set -euo pipefail
stage=${1:?stage}; shift
export PYTHONUNBUFFERED=1 RAY_DISABLE_USAGE_STATS=1 RAY_AUTH_MODE=disabled
t38=/tmp/t38  # Triton 3.8.0, vLLM 0.33's; vLLM 0.26 (its tune and its serve) runs the machine's own 3.6.0
if [ "${TUNE_MOE_STAGE_VLLM:-0.33.0}" = 0.26.0 ] || [ "$stage" = serve-bg ] || [ "$stage" = vllm-setup ]; then
  t38=/nonexistent
elif [ -d /tmp/t38/triton ]; then
  export TRITON_BACKENDS_IN_TREE=1  # the unpacked Triton has no entry points; the machine's own needs nothing
fi
export PYTHONPATH=$t38:/tmp/ray:/tmp/fi:$PWD${PYTHONPATH:+:$PYTHONPATH}
export FLASHINFER_WORKSPACE_BASE=/tmp/fi-cache DG_JIT_CACHE_DIR=/tmp/dg-cache
export PATH=/tmp/ray/bin:$PATH
runs=/tmp/runs
logged() {  # NAME SECS PYTHON-ARGS...: python3 PYTHON-ARGS for at most SECS (SIGINT then), output to $OUT/NAME.log
  local name=$1 secs=$2; shift 2
  set +e
  timeout -s INT -k 30 "$secs" python3 "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  echo "$name: exit $rc" | tee -a "$OUT/$name.log"
  set -e
}
case "$stage" in
  stash)
    mkdir -p /tmp/stash && cp -v "$@" /tmp/stash/ ;;
  setup)
    for f in /tmp/stash/ray-site.tar.zst /tmp/stash/unzstd.py "$@"; do  # before minutes of unpacking, not after
      [ -f "$f" ] || { echo "setup: $f is missing; stash it first (benchmarks/README.md section 5)" >&2; exit 2; }
    done
    mkdir -p /tmp/ray
    if [ "$#" -gt 0 ]; then
      mkdir -p /tmp/t38
      cat /tmp/stash/part-00 "$@" | python3 /tmp/stash/unzstd.py | tar xf - -C /tmp/t38
      chmod +x /tmp/t38/triton/backends/nvidia/bin/*  # the pack is made from the wheel's zip, which keeps no modes
      export TRITON_BACKENDS_IN_TREE=1
    fi
    python3 /tmp/stash/unzstd.py < /tmp/stash/ray-site.tar.zst | tar xf - -C /tmp/ray
    python3 -c 'import triton, ray, torch; print("triton", triton.__version__, "ray", ray.__version__, "torch",
                torch.__version__, "gpus", torch.cuda.device_count())'
    nvidia-smi --query-gpu=index,name,memory.used,memory.total,driver_version --format=csv ;;
  tune|tune-kill)
    name=$1 secs=$2; shift 2
    mkdir -p "$runs"
    export TRITON_CACHE_DIR=/tmp/triton-cache-${name%%-*}  # w1 and main compile from cold caches of their own
    signal=INT; [ "$stage" = tune-kill ] && signal=KILL  # timeout signals its whole process group
    start=$(date +%s)
    set +e
    timeout -s "$signal" -k 60 "$secs" python3 "$(dirname "$0")/run_phases.py" "$OUT/$name.log" "$OUT/$name.phases.json" -- \
      python3 -m tuning.cli "$@" --vllm-src "${TUNE_MOE_STAGE_SRC:-/tmp/stash/fused_moe_v033.py}" \
      --vllm-version "${TUNE_MOE_STAGE_VLLM:-0.33.0}"
    rc=$?
    set -e
    echo "$name: exit $rc after $(( $(date +%s) - start )) s" | tee -a "$OUT/$name.log"
    out=$(sed -n 's/.* jobs already done in \(.*\)\/\.tune-moe;.*/\1/p' "$OUT/$name.log" | head -1)
    if [ -n "$out" ]; then
      cp "$out/.tune-moe/results.jsonl" "$OUT/$name.results.jsonl" 2>/dev/null || true
      cp "$out/.tune-moe/run.json" "$OUT/$name.run.json" 2>/dev/null || true
      (cd "$out" && tar cf "$OUT/$name.files.tar" --exclude=.tune-moe . 2>/dev/null) || true
    fi ;;
  pack-sources)
    py=${PYTHON:-python3}
    pkg=${VLLM_PKG:-$("$py" -c 'import importlib.util as u; print(u.find_spec("vllm").submodule_search_locations[0])')}
    dest=${SRC_DIR:-.gpu/vllm-src} dg=${DG_OUT:-.gpu/dg.tar.zst}
    "$py" -c 'import shutil, sys; from pathlib import Path; from tuning.bakeoff.vllm_helpers import FILES
root, dest = Path(sys.argv[1]).parent, Path(sys.argv[2])
for rel in FILES:
    (dest / rel).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(root / rel, dest / rel)
print("vLLM sources:", len(FILES), "files in", dest)' "$pkg" "$dest"
    tar cf - -C "$pkg/third_party" --exclude=__pycache__ deep_gemm | zstd -12 --long=27 -q -c > "$dg"
    ls -l "$dg" ;;
  pack-ops)
    py=${PYTHON:-python3}
    vllm=${VLLM_PKG:-$("$py" -c 'import importlib.util as u; print(u.find_spec("vllm").submodule_search_locations[0])')}
    dest=${OPS_DIR:-.gpu/vllm-ops}
    libs="_C_stable_libtorch.abi3.so _moe_C_stable_libtorch.abi3.so"
    stage_dir=$(mktemp -d)
    (cd "$vllm" && cp $libs "$stage_dir"/ && sha256sum $libs > "$stage_dir"/SHA256SUMS)
    rm -rf "$dest" && mkdir -p "$dest"
    tar cf - -C "$stage_dir" $libs SHA256SUMS | zstd -19 --long=27 -T2 -q -c | split -b 36M -d -a 2 - "$dest"/ops-part-
    rm -rf "$stage_dir"
    ls -l "$dest" ;;
  setup-ops)
    rm -rf /tmp/vllm-ops && mkdir -p /tmp/vllm-ops
    cat /tmp/stash/ops-part-* | python3 /tmp/stash/unzstd.py | tar xf - -C /tmp/vllm-ops
    (cd /tmp/vllm-ops && sha256sum -c --quiet SHA256SUMS) && echo "vLLM's ops in /tmp/vllm-ops, sums checked"
    python3 -c 'import torch
for lib in ("_C_stable_libtorch.abi3.so", "_moe_C_stable_libtorch.abi3.so"):
    torch.ops.load_library("/tmp/vllm-ops/" + lib)
for ns, op in (("_moe_C", "moe_sum"), ("_moe_C", "moe_align_block_size"), ("_C", "silu_and_mul"),
               ("_C", "silu_and_mul_per_block_quant"), ("_C", "per_token_group_fp8_quant")):
    print(getattr(getattr(torch.ops, ns), op).default._schema)
print("torch", torch.__version__, "loads these CUDA ops of vLLM")' ;;
  setup-t38)
    mkdir -p /tmp/t38
    cat /tmp/stash/part-00 "$@" | python3 /tmp/stash/unzstd.py | tar xf - -C /tmp/t38
    chmod +x /tmp/t38/triton/backends/nvidia/bin/*
    export TRITON_BACKENDS_IN_TREE=1  # set at the top only when /tmp/t38 already existed
    python3 -c 'import triton, torch; print("triton", triton.__version__, "torch", torch.__version__)' ;;
  setup-dg)
    mkdir -p /tmp/dg && python3 /tmp/stash/unzstd.py < /tmp/stash/dg.tar.zst | tar xf - -C /tmp/dg
    ls /tmp/dg/deep_gemm >/dev/null && echo "DeepGEMM in /tmp/dg" ;;
  flashinfer-setup)
    mkdir -p /tmp/fi && cat /tmp/stash/fi-part-* | python3 /tmp/stash/unzstd.py | tar xf - -C /tmp/fi
    python3 -c 'import flashinfer, tvm_ffi; from flashinfer.fused_moe import cutlass_fused_moe
print("flashinfer", flashinfer.__version__, "tvm_ffi", tvm_ffi.__version__)' ;;
  flashinfer-build)
    if [ "${1:-}" = full ]; then
      build=(python3 -c 'from flashinfer.fused_moe.core import get_cutlass_fused_moe_module as g
g("90"); print("built fused_moe_90")')
    else
      build=(python3 benchmarks/flashinfer_blockscale.py build)
    fi
    MAX_JOBS=$(nproc) setsid nohup "${build[@]}" > /tmp/fi-build.log 2>&1 < /dev/null &
    echo $! > /tmp/fi-build.pid
    echo "FlashInfer fused_moe_90 build (${1:-block-scale path}) started (log /tmp/fi-build.log)" ;;
  flashinfer-wait)
    end=$(( $(date +%s) + ${1:?seconds} ))
    while kill -0 "$(cat /tmp/fi-build.pid)" 2>/dev/null && [ "$(date +%s)" -lt "$end" ]; do sleep 5; done
    grep -v '^\[' /tmp/fi-build.log | tail -4; grep '^\[' /tmp/fi-build.log | tail -1
    grep -q "^built fused_moe_90" /tmp/fi-build.log ;;
  flashinfer-check)
    python3 benchmarks/flashinfer_blockscale.py check ;;
  flashinfer-pack)
    first=${1:-0}
    if [ ! -f /tmp/fi-aot/fi-aot.sha256 ]; then
      so=$(find /tmp/fi/flashinfer/data/aot /tmp/fi-cache -name fused_moe_90.so 2>/dev/null | head -1)
      [ -n "$so" ] || { echo "flashinfer-pack: fused_moe_90.so is not built (flashinfer-wait)"; exit 1; }
      mkdir -p /tmp/fi-aot
      (cd "$(dirname "$so")" && tar cf - fused_moe_90.so $(ls BUILD.json 2>/dev/null)) | xz -T0 -6 \
        | split -b 15m -d - /tmp/fi-aot/fi-aot-part-
      (cd /tmp/fi-aot && sha256sum fi-aot-part-* > fi-aot.sha256)
    fi
    parts=(/tmp/fi-aot/fi-aot-part-*)
    cp /tmp/fi-aot/fi-aot.sha256 "${parts[@]:$first:4}" "$OUT/"  # $OUT takes 64 MiB a call: four parts
    last=$(( first + 4 < ${#parts[@]} ? first + 3 : ${#parts[@]} - 1 ))
    echo "fi-aot: ${#parts[@]} parts of 15 MiB; brought back parts $first..$last$( [ "$last" -lt $(( ${#parts[@]} - 1 )) ] \
      && echo "; the rest: flashinfer-pack $(( last + 1 ))")" ;;
  flashinfer-aot)
    dest=/tmp/fi/flashinfer/data/aot/fused_moe_90  # flashinfer/jit/env.py get_aot_artifacts: loaded, never built
    (cd /tmp/stash && sha256sum -c fi-aot.sha256) && mkdir -p "$dest"
    cat /tmp/stash/fi-aot-part-* | xz -dc | tar xf - -C "$dest"
    FLASHINFER_DISABLE_JIT=1 python3 -c 'from flashinfer.fused_moe.core import get_cutlass_fused_moe_module as g
g("90"); print("fused_moe_90 loaded (AOT)")'  # never a JIT build here: a missing module is an error
    cat "$dest/BUILD.json" ;;
  bakeoff)
    name=$1 secs=$2; shift 2
    mkdir -p "$runs"
    export TRITON_CACHE_DIR=/tmp/triton-cache-bakeoff
    ops=()
    if [ -d /tmp/vllm-ops ]; then
      ops=(--vllm-ops /tmp/vllm-ops)
    fi
    set +e
    timeout -s INT -k 60 "$secs" python3 -m tuning.cli compare-backends "$@" --vllm-src "${TUNE_MOE_STAGE_SOURCES:-.gpu/vllm-src}" \
      --deep-gemm-path /tmp/dg ${ops[@]+"${ops[@]}"} --json-out "$OUT/$name.json" \
      --write-advice "$runs/backend_advice.json" > "$OUT/$name.log" 2>&1
    rc=$?
    set -e
    cp "$runs/backend_advice.json" "$OUT/$name.advice.json" 2>/dev/null || true
    echo "$name: exit $rc" | tee -a "$OUT/$name.log" ;;
  pack-vllm-extras)
    work=$(mktemp -d)
    PIP_CONSTRAINT='' python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d "$work/whl" \
      compressed-tensors==0.17.0 loguru==0.7.3
    for w in "$work"/whl/*.whl; do python3 -m zipfile -e "$w" "$work/site"; done
    mkdir -p .gpu/vllm026 && tar --owner=0 --group=0 -cf - -C "$work/site" . | zstd -19 -q -c > .gpu/vllm026/vllm026-extras.tar.zst
    rm -rf "$work" && ls -l .gpu/vllm026/vllm026-extras.tar.zst ;;
  pack-ray)
    work=$(mktemp -d)
    plat=(--python-version 3.12 --implementation cp --only-binary=:all: --platform manylinux2014_x86_64
          --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux1_x86_64)
    PIP_CONSTRAINT='' python3 -m pip download -q --no-deps "${plat[@]}" -d "$work/whl" ray==2.60.0 click jsonschema \
      jsonschema-specifications referencing rpds-py attrs msgpack protobuf pyyaml requests charset-normalizer idna \
      urllib3 certifi tqdm filelock packaging
    PIP_CONSTRAINT='' python3 -m pip install -q --no-deps --no-index --no-compile --target "$work/site" "${plat[@]}" \
      "$work"/whl/*.whl
    rm -rf "$work/site/ray/jars" "$work/site/bin"
    mkdir -p .gpu/ray && tar --owner=0 --group=0 -cf - -C "$work/site" . | zstd -19 --long=27 -T2 -q -c > .gpu/ray/ray-site.tar.zst
    rm -rf "$work" && ls -l .gpu/ray/ray-site.tar.zst ;;
  vllm-setup)
    cd /tmp/stash && cat vllm026-site.tar.xz.part? > vllm026-site.tar.xz  # every part stashed, in order
    sha256sum -c vllm026-site.tar.xz.sha256 && mkdir -p /tmp/v026site && xz -dc vllm026-site.tar.xz | tar x -C /tmp/v026site
    rm -f vllm026-site.tar.xz* && cd - >/dev/null
    if [ -f /tmp/stash/vllm026-extras.tar.zst ]; then
      python3 /tmp/stash/unzstd.py < /tmp/stash/vllm026-extras.tar.zst | tar xf - -C /tmp/v026site
    fi
    PYTHONPATH=/tmp/v026site:$PYTHONPATH python3 -c 'import vllm, torch, triton; print("vllm", vllm.__version__, "torch",
      torch.__version__, "triton", triton.__version__)' 2>&1 | tail -1 ;;
  serve-bg)
    name=$1; shift
    mkdir -p "$runs"
    PYTHONPATH=/tmp/v026site:$PYTHONPATH PATH=/tmp/v026site/bin:$PATH VLLM_USE_FLASHINFER_SAMPLER=0 \
      setsid nohup python3 -m tuning.cli validate-serve "$@" --out "$runs/$name" > "$runs/$name.log" 2>&1 < /dev/null &
    echo "validate-serve $name started (log $runs/$name.log; it outlives the call while the machine stays warm)" ;;
  serve-wait)
    name=$1 secs=$2
    end=$(( $(date +%s) + secs ))
    while pgrep -f "validate-serve .*$runs/$name" >/dev/null && [ "$(date +%s)" -lt "$end" ]; do sleep 5; done
    if pgrep -f "validate-serve .*$runs/$name" >/dev/null; then echo "$name: still running"; else echo "$name: ended"; fi
    tail -15 "$runs/$name.log"
    cp "$runs/$name.log" "$OUT/" && (cd "$runs" && tar cf "$OUT/$name.tar" "$name" 2>/dev/null) || true ;;
  ray)
    python3 -c "import sys; from ray.scripts.scripts import main; sys.argv[0] = 'ray'; main()" "$@" ;;
  cli)
    name=$1 secs=$2; shift 2
    logged "$name" "$secs" -m tuning.cli "$@"
    # a --keep-confirmed round added its board's head to heads to the ledger in --configs: bring it back
    configs=$(printf '%s\n' "$@" | sed -n '/^--configs$/{n;p;q}')
    if printf '%s\n' "$@" | grep -qx -- --keep-confirmed && [ -f "$configs/.tune-moe/judged.jsonl" ]; then
      cp "$configs/.tune-moe/judged.jsonl" "$OUT/$name.judged.jsonl"
    fi
    # and the set it wrote, as a tar: config file names (commas, '=', brackets) do not come back through $OUT
    kept=$(printf '%s\n' "$@" | sed -n '/^--keep-confirmed$/{n;p;q}')
    if [ -n "$kept" ] && [ -d "$kept" ]; then
      tar cf "$OUT/$name.out.tar" -C "$(dirname "$kept")" "$(basename "$kept")"
    fi
    exit "$rc" ;;  # the command's own exit (verify: 1 when an entry is below 0.98x of the default)
  py)
    logged "$@" ;;
  cli-smi)  # cli, its output lines stamped with the time, nvidia-smi sampling the GPU beside it every 200 ms
    name=$1 secs=$2; shift 2
    fields=timestamp,clocks.sm,clocks.mem,temperature.gpu,temperature.memory,power.draw,clocks_event_reasons.active
    nvidia-smi -i 0 --query-gpu=$fields --format=csv > /dev/null 2>&1 || fields=${fields/event/throttle}  # older names
    nvidia-smi -i 0 --query-gpu=$fields --format=csv,noheader,nounits -lms 200 > "$OUT/$name.smi.csv" &
    smi=$!
    set +e
    timeout -s INT -k 30 "$secs" python3 -m tuning.cli "$@" 2>&1 | python3 -uc 'import sys, time
for line in sys.stdin: print(f"{time.time():.3f} {line}", end="")' > "$OUT/$name.log"
    echo "$name: exit ${PIPESTATUS[0]}" | tee -a "$OUT/$name.log"
    set -e
    kill "$smi" 2>/dev/null || true ;;
  kill-after)
    secs=$1
    (sleep "$secs"; pid=$(pgrep -f 'ray::TuneWorker' | head -1)
     if [ -n "$pid" ]; then kill -9 "$pid" && echo "SIGKILL sent to worker pid $pid at $(date +%T)" >> "$OUT/kill.log"; fi) &
    ;;
  bg)
    mkdir -p /tmp/bg && rm -f /tmp/bg/done
    setsid nohup "$0" bg-run "$1" > /tmp/bg/bg.log 2>&1 < /dev/null &
    echo "started at $(date +%T): $1 (logs in /tmp/bg; bg-wait SECS brings them back)" ;;
  bg-run)  # bg's detached part, in a session of its own
    IFS=';' read -ra calls <<< "$1"
    for call in "${calls[@]}"; do
      read -ra words <<< "$call"
      vars=()  # leading VAR=value words: that stage's environment (e.g. TUNE_MOE_STAGE_SRC for another kernel)
      while [[ ${#words[@]} -gt 0 && ${words[0]} == [A-Z_]*=* ]]; do vars+=("${words[0]}"); words=("${words[@]:1}"); done
      OUT=/tmp/bg env "${vars[@]}" "$0" "${words[@]}" || true
    done
    date +%s > /tmp/bg/done ;;
  bg-wait)
    end=$(( $(date +%s) + $1 ))
    while [ ! -e /tmp/bg/done ] && [ "$(date +%s)" -lt "$end" ]; do sleep 5; done
    if [ -e /tmp/bg/done ]; then echo "bg: done"; skip=(); else echo "bg: still running"; skip=(--exclude='*.files.tar'); fi
    for log in /tmp/bg/*.log; do echo "== $log"; tail -c 600 "$log" | tr '\r' '\n' | tail -4; done
    tar cf "$OUT/bg.tar" "${skip[@]}" /tmp/bg $(ls -d "$runs"/*/.tune-moe 2>/dev/null) 2>/dev/null || true ;;
  *) sed -n '2,70p' "$0"; exit 2 ;;
esac
