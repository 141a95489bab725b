#!/usr/bin/env bash
# Check that this node can serve Step-3.5-Flash as planned, then write the
# environment the serve step sources.
#
# Checks, one ok or FAIL line each: the GPUs (model and count) against --gpu
# and --num-gpus, that the weights fit in 92% of their memory (vLLM 0.33's
# default --gpu-memory-utilization), the driver and the CUDA version it
# supports, the CUDA toolkit (nvcc and cuobjdump, required for fp8: DeepGEMM
# compiles at run time), free space for the weights in the model cache and for
# environments and caches where this runs. Every check runs even when
# nvidia-smi is missing or fails: those that need it fail and say how to fix it.
#
# Usage: install/node-check.sh --gpu H200|H20|H20-3e|B200 [options]
#
# Options:
#   --gpu MODEL          the GPU this node should have (any H200-family name counts as H200)
#   --num-gpus N         GPUs the deployment uses; the node needs at least N (default: all found)
#   --dtype bf16|fp8     checkpoint to serve: BF16 ~394 GB, FP8 ~200 GB (default: bf16)
#   --env-out FILE       environment file to write (default: ./tune-moe-node.env)
#   --model-cache DIR    Hugging Face cache (default: $HF_HOME, else ~/.cache/huggingface)
#   --vllm-version X.Y.Z the vLLM the serve runs, for the tuned configs' folder (default: the vLLM
#                        installed in --venv, else for python3 on PATH when there is no such venv,
#                        else TUNE_MOE_VLLM_VERSION)
#   --venv DIR           the virtual environment the serve runs from (default: ./.venv, where
#                        install-vllm.sh installs); its vLLM is read from its package metadata
#   --configs-dir DIR    tuned configs, one folder per device (default: <repo>/kernels_configs/vllm-X.Y,
#                        X.Y of that vLLM: each release reads its own folder)
#   --min-driver-cuda X.Y  oldest CUDA the driver must support (default: TUNE_MOE_MIN_DRIVER_CUDA)
#   --min-free-gb N      free space needed where this runs (default: 50)
#   -h, --help           this text
#
# The env file holds `export NAME=value` lines: the GPU, dtype, GPU count and
# model, HF_HOME, VLLM_TUNED_CONFIG_FOLDER=<configs-dir>/<device name> and
# CUDA_HOME (when nvcc works). It is written only when every check passes, and
# re-running writes the same file. An info line names the vLLM release the
# folder is for and where that release came from; a warning says when that
# folder does not exist. Run it after install-vllm.sh, so that it reads the
# vLLM the serve runs. For fp8 on B200 a note line (not a check)
# says that vLLM 0.33 chooses the MoE backend per layer, set with
# `vllm serve --moe-backend`, and that `tune-moe preflight -- <serve command>`
# shows which backend each MoE layer kind will run.
# Exit status: 0 ready, 1 a check failed (each failure is printed, then how
# many failed), 2 bad arguments.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
tm_load_pins

# --gpu (lower case) -> the name nvidia-smi and torch report
declare -A GPU_NAMES=([h200]="NVIDIA H200" [h20]="NVIDIA H20" [h20-3e]="NVIDIA H20-3e" [b200]="NVIDIA B200")
declare -A GPU_KEYS=([NVIDIA_H200]="H200" [NVIDIA_H20]="H20" [NVIDIA_H20-3e]="H20-3e" [NVIDIA_B200]="B200")
# --dtype -> checkpoint and its size on disk (GB)
declare -A MODELS=([bf16]="stepfun-ai/Step-3.5-Flash" [fp8]="stepfun-ai/Step-3.5-Flash-FP8")
declare -A MODEL_GB=([bf16]=394 [fp8]=200)
GPU_MEMORY_SHARE=92  # percent of GPU memory vLLM 0.33 takes by default (--gpu-memory-utilization 0.92)

gpu=""
num_gpus=""
dtype="bf16"
env_out="./tune-moe-node.env"
model_cache="${HF_HOME:-$HOME/.cache/huggingface}"
vllm_version=""  # --vllm-version
venv="./.venv"
venv_given=0
configs_dir=""   # --configs-dir; else the folder of the serve's vLLM release (resolve_configs_dir)
release=""       # X.Y of that vLLM
release_from=""  # where that vLLM came from, for the info line
min_driver_cuda="$TUNE_MOE_MIN_DRIVER_CUDA"
min_free_gb=50
failures=0
found_count=0
gpu_rows=""     # nvidia-smi's rows, once check_gpus found the --gpu model
no_fit_check="" # otherwise, why check_memory cannot run
nvcc_path=""    # a working nvcc, for CUDA_HOME

parse_args() {
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --gpu) tm_need_value "$@"; gpu="$2"; shift 2 ;;
      --num-gpus) tm_need_value "$@"; num_gpus="$2"; shift 2 ;;
      --dtype) tm_need_value "$@"; dtype="$2"; shift 2 ;;
      --env-out) tm_need_value "$@"; env_out="$2"; shift 2 ;;
      --model-cache) tm_need_value "$@"; model_cache="$2"; shift 2 ;;
      --vllm-version) tm_need_value "$@"; vllm_version="$2"; shift 2 ;;
      --venv) tm_need_value "$@"; venv="$2"; venv_given=1; shift 2 ;;
      --configs-dir) tm_need_value "$@"; configs_dir="$2"; shift 2 ;;
      --min-driver-cuda) tm_need_value "$@"; min_driver_cuda="$2"; shift 2 ;;
      --min-free-gb) tm_need_value "$@"; min_free_gb="$2"; shift 2 ;;
      -h | --help) tm_usage "$0"; exit 0 ;;
      *) tm_unknown_option "$1" ;;
    esac
  done
  [[ -n "$gpu" ]] || tm_usage_error "--gpu is required: H200, H20, H20-3e or B200"
  [[ -n "${GPU_NAMES[${gpu,,}]:-}" ]] || tm_usage_error "--gpu $gpu: unknown GPU; use H200, H20, H20-3e or B200"
  gpu="${GPU_KEYS[$(tm_vllm_device_name "${GPU_NAMES[${gpu,,}]}")]}"
  if [[ -n "$num_gpus" ]]; then
    tm_is_whole_number "$num_gpus" 4 && [[ $((10#$num_gpus)) -gt 0 ]] ||
      tm_usage_error "--num-gpus $num_gpus: use a positive whole number (at most 9999)"
    num_gpus=$((10#$num_gpus))
  fi
  [[ -n "${MODELS[$dtype]:-}" ]] || tm_usage_error "--dtype $dtype: use bf16 or fp8"
  [[ "$min_driver_cuda" =~ ^[0-9]+\.[0-9]+$ ]] || tm_usage_error "--min-driver-cuda $min_driver_cuda: use a version like 13.0"
  tm_is_whole_number "$min_free_gb" 7 || tm_usage_error "--min-free-gb $min_free_gb: use a whole number of GB (at most 9999999)"
  min_free_gb=$((10#$min_free_gb))
  [[ -z "$vllm_version" || -n "$(release_of "$vllm_version")" ]] ||
    tm_usage_error "--vllm-version $vllm_version: use a vLLM version like 0.34.0"
  [[ "$venv_given" -eq 0 || -e "$venv/bin/python" || -L "$venv/bin/python" ]] ||
    tm_usage_error "--venv $venv: no $venv/bin/python; pass the virtual environment install-vllm.sh created"
  tm_output_file --env-out "$env_out"
}

# X.Y of a vLLM version (0.34.0, 0.34, 0.34.0rc1, 0.34.0.dev12+g1234); nothing when it is not one.
release_of() {
  local version_re='^([0-9]+)\.([0-9]+)([.+_a-zA-Z-][[:alnum:].+_-]*)?$'
  if [[ "$1" =~ $version_re ]]; then printf '%s.%s\n' "${BASH_REMATCH[1]}" "${BASH_REMATCH[2]}"; fi
}

# The vLLM version installed for PYTHON, read from the package metadata (vLLM is
# not imported); nothing when PYTHON does not run or has no vLLM.
installed_vllm() {
  "$1" -c 'import importlib.metadata as m; print(m.version("vllm"))' 2>/dev/null | sed -n '$p' || true
}

# The folder of tuned configs: --configs-dir, else kernels_configs/vllm-X.Y of
# the vLLM the serve runs: --vllm-version, else the one installed in --venv (or
# for python3 on PATH when there is no such venv), else TUNE_MOE_VLLM_VERSION.
resolve_configs_dir() {
  if [[ -n "$configs_dir" ]]; then
    release_from="--configs-dir"
    return
  fi
  local version="" python="" where="" missing=""
  if [[ -n "$vllm_version" ]]; then
    version="$vllm_version" release_from="--vllm-version $vllm_version"
  else
    if [[ -e "$venv/bin/python" || -L "$venv/bin/python" ]]; then
      python="$venv/bin/python" where="in $venv"
    elif python="$(command -v python3)"; then
      where="for python3, $python"
    fi
    if [[ -n "$python" ]]; then version="$(installed_vllm "$python")"; fi
    if [[ -n "$version" && -n "$(release_of "$version")" ]]; then
      release_from="$version installed $where"
    else
      if [[ -n "$version" ]]; then
        tm_warn "$python says its vLLM is '$version', not a version; using TUNE_MOE_VLLM_VERSION"
      fi
      if [[ -n "$python" ]]; then missing="no vLLM installed $where"; else missing="no $venv and no python3 on PATH"; fi
      version="$TUNE_MOE_VLLM_VERSION" release_from="TUNE_MOE_VLLM_VERSION=$TUNE_MOE_VLLM_VERSION; $missing"
      [[ -n "$(release_of "$version")" ]] ||
        tm_die "TUNE_MOE_VLLM_VERSION=$TUNE_MOE_VLLM_VERSION: not a vLLM version; set it like 0.33.0"
    fi
  fi
  release="$(release_of "$version")"
  configs_dir="$TM_REPO_ROOT/kernels_configs/vllm-$release"  # the files that vLLM release reads
}

pass() { printf 'ok    %-12s %s\n' "$1" "$2"; }
note() { printf 'note  %-12s %s\n' "$1" "${*:2}"; }
fail() {
  printf 'FAIL  %-12s %s\n' "$1" "$2" >&2
  failures=$((failures + 1))
}

# "3x NVIDIA H20 + 1x NVIDIA H200" from one name per line.
describe() { sort <<<"$1" | uniq -c | awk '{n=$1; $1=""; sub(/^ /, ""); printf "%s%sx %s", sep, n, $0; sep=" + "}'; }

check_gpus() {
  local rows names want wrong
  if [[ -n "$TM_DRIVER_PROBLEM" ]]; then
    fail gpus "cannot list the GPUs: $(tm_driver_message)"
    no_fit_check="without the GPUs' memory size: $TM_DRIVER_PROBLEM; $TM_DRIVER_FIX"
    return
  fi
  rows="$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader,nounits 2>/dev/null)" || rows=""
  if [[ -z "$rows" ]]; then
    fail gpus "nvidia-smi lists no NVIDIA GPU; check the driver (nvidia-smi -L) and run on the GPU node"
    no_fit_check="without the GPUs' memory size (see gpus)"
    return
  fi
  names="$(cut -d, -f1 <<<"$rows" | sed 's/^ *//; s/ *$//')"
  found_count="$(wc -l <<<"$names")"
  want="${GPU_NAMES[${gpu,,}]}"
  wrong="$(while read -r name; do
    [[ "$(tm_vllm_device_name "$name")" == "$(tm_vllm_device_name "$want")" ]] || printf '%s\n' "$name"
  done <<<"$names")"
  if [[ -n "$wrong" ]]; then
    local hint=""
    local other="${GPU_KEYS[$(tm_vllm_device_name "$(sed -n 1p <<<"$wrong")")]:-}"
    [[ -z "$other" ]] || hint="; pass --gpu $other"
    fail gpus "--gpu $gpu: this node has $(describe "$names"), not $want$hint"
    no_fit_check="on GPUs that are not $want (see gpus)"
    return
  fi
  gpu_rows="$rows"
  if [[ -n "$num_gpus" && "$found_count" -lt "$num_gpus" ]]; then
    fail gpus "--num-gpus $num_gpus: this node has only $found_count GPUs ($(describe "$names")); lower --num-gpus"
    return
  fi
  pass gpus "$(describe "$names")"
}

# Weights must fit in vLLM's share of the memory of the GPUs used.
check_memory() {
  if [[ -z "$gpu_rows" ]]; then
    fail memory "cannot check that the $dtype weights fit $no_fit_check"
    return
  fi
  local used="${num_gpus:-$found_count}" mib gb need="${MODEL_GB[$dtype]}"
  mib="$(sed -n 1p <<<"$gpu_rows" | cut -d, -f2 | tr -d ' ')"
  [[ "$mib" =~ ^[0-9]+$ ]] || { fail memory "nvidia-smi reported no memory size; check the driver (nvidia-smi -q -d MEMORY)"; return; }
  mib=$((10#$mib))
  gb=$((used * mib * 1048576 * GPU_MEMORY_SHARE / 100 / 1000000000))
  if [[ "$gb" -lt "$need" ]]; then
    local fix="use more GPUs"
    if [[ "$dtype" == bf16 ]]; then fix+=" or --dtype fp8"; fi
    fail memory "$dtype weights (~$need GB) do not fit in ${GPU_MEMORY_SHARE}% of ${used}x $((mib * 1048576 / 1000000000)) GB; $fix"
  else
    pass memory "$dtype weights ~$need GB in ${GPU_MEMORY_SHARE}% of ${used} GPUs = $gb GB"
  fi
}

check_driver() {
  local driver cuda
  if [[ -n "$TM_DRIVER_PROBLEM" ]]; then
    fail driver "cannot read the driver version: $TM_DRIVER_PROBLEM; $TM_DRIVER_FIX"
    return
  fi
  driver="$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | sed -n 1p | tr -d ' ')" || driver=""
  cuda="$(tm_driver_cuda)"
  if [[ -z "$driver" || -z "$cuda" ]]; then
    fail driver "cannot read the driver version from nvidia-smi; install the NVIDIA driver"
  elif ! tm_version_ge "$cuda" "$min_driver_cuda"; then
    fail driver "driver $driver supports CUDA $cuda, older than $min_driver_cuda; upgrade the driver (or pass --min-driver-cuda for an older vLLM)"
  else
    pass driver "$driver (CUDA $cuda, needs >= $min_driver_cuda)"
  fi
}

# nvcc and cuobjdump: required for fp8 (DeepGEMM's JIT), informational for bf16.
check_toolkit() {
  local found have="" note="needed for fp8 (DeepGEMM JIT)"
  found="$(tm_find_nvcc)" || found=""
  if [[ -n "$found" ]]; then have="$(tm_nvcc_release "$found")"; fi
  if [[ -z "$found" ]]; then
    toolkit_result nvcc "no nvcc found; install CUDA toolkit >= $TUNE_MOE_MIN_NVCC_FP8 and set CUDA_HOME ($note)"
  elif [[ -z "$have" ]]; then
    toolkit_result nvcc "'$found --version' failed or names no release; reinstall the CUDA toolkit or set CUDA_HOME to a working one ($note)"
  elif ! tm_version_ge "$have" "$TUNE_MOE_MIN_NVCC_FP8"; then
    nvcc_path="$found"
    toolkit_result nvcc "nvcc $have at $found is older than $TUNE_MOE_MIN_NVCC_FP8; install a newer CUDA toolkit ($note)"
  else
    nvcc_path="$found"
    pass nvcc "$have at $found"
  fi
  if command -v cuobjdump >/dev/null 2>&1; then
    pass cuobjdump "$(command -v cuobjdump)"
  else
    toolkit_result cuobjdump "cuobjdump is not on PATH; add the CUDA toolkit's bin/ to PATH ($note)"
  fi
}

toolkit_result() {
  if [[ "$dtype" == fp8 ]]; then fail "$1" "$2"; else tm_warn "$1: $2"; fi
}

# Free KB on the filesystem of DIR (its nearest existing parent); nothing when df fails.
free_kb() {
  local dir="$1"
  while [[ ! -d "$dir" ]]; do dir="$(dirname "$dir")"; done
  df -Pk "$dir" 2>/dev/null | awk 'NR == 2 { print $4 }' || true
}

device_of() {
  local dir="$1"
  while [[ ! -d "$dir" ]]; do dir="$(dirname "$dir")"; done
  df -Pk "$dir" 2>/dev/null | awk 'NR == 2 { print $1 }' || true
}

check_disk() {
  local model="${MODELS[$dtype]}" need_gb="${MODEL_GB[$dtype]}" have_kb here_kb present_kb="" present_gb=0
  have_kb="$(free_kb "$model_cache")"
  here_kb="$(free_kb "$PWD")"
  if [[ ! "$have_kb" =~ ^[0-9]+$ ]]; then
    fail disk "cannot read the free space of $model_cache (df failed); check that filesystem or pass --model-cache"
    return
  elif [[ ! "$here_kb" =~ ^[0-9]+$ ]]; then
    fail disk "cannot read the free space of $PWD (df failed); check that filesystem or run elsewhere"
    return
  fi
  local cached="$model_cache/hub/models--${model//\//--}"
  if [[ -d "$cached" ]]; then present_kb="$(du -skL "$cached" 2>/dev/null | cut -f1)" || true; fi
  if [[ "$present_kb" =~ ^[0-9]+$ ]]; then present_gb=$((present_kb / 1000000)); fi
  local missing_gb=$((need_gb > present_gb ? need_gb - present_gb : 0))
  local here_gb="$min_free_gb"
  if [[ "$(device_of "$model_cache")" == "$(device_of "$PWD")" ]]; then
    missing_gb=$((missing_gb + min_free_gb))
    here_gb=0
  fi
  local why="$((missing_gb - min_free_gb + here_gb)) GB of $model not cached yet"
  [[ "$here_gb" -gt 0 ]] || why+=" + $min_free_gb GB for environments and caches"
  if [[ $((have_kb / 1000000)) -lt "$missing_gb" ]]; then
    fail disk "$model_cache has $((have_kb / 1000000)) GB free, needs $missing_gb GB ($why); free space or pass --model-cache"
  else
    pass disk "$model_cache: $((have_kb / 1000000)) GB free, needs $missing_gb GB ($why)"
  fi
  if [[ "$here_gb" -gt 0 && $((here_kb / 1000000)) -lt "$here_gb" ]]; then
    fail disk "$PWD has less than $here_gb GB free for environments and JIT caches; free space or run elsewhere"
  fi
}

# fp8 on B200: how vLLM 0.33 picks the MoE backend. Information, not a check.
note_moe_backend() {
  [[ "$gpu" == B200 && "$dtype" == fp8 ]] || return 0
  note moe-backend "vLLM 0.33 chooses the MoE backend per layer, set with vllm serve --moe-backend;" \
    "tune-moe preflight -- <serve command> shows which backend each MoE layer kind will run"
}

write_env() {
  local device folder tmp
  device="$(tm_vllm_device_name "${GPU_NAMES[${gpu,,}]}")"
  folder="$configs_dir/$device"
  local label="tuned configs" of_release=""
  if [[ -n "$release" ]]; then label+=" for vLLM $release" of_release=" for vLLM $release"; fi
  tm_info "$label ($release_from): $folder"
  [[ -d "$folder" ]] || tm_warn "no tuned configs$of_release in $folder yet; vLLM falls back to its defaults until tune-moe writes them"
  if ! mkdir -p "$(dirname "$env_out")" 2>/dev/null || ! tmp="$(mktemp "$env_out.XXXXXX" 2>/dev/null)"; then
    tm_die "cannot write $env_out; pass --env-out in a writable folder"
  fi
  {
    printf '# Serving environment for Step-3.5-Flash (%s) on %s; written by install/node-check.sh.\n' "$dtype" "$gpu"
    printf '# Source it before vllm serve: source %s\n' "$(basename "$env_out")"
    env_line TUNE_MOE_GPU "$gpu"
    env_line TUNE_MOE_DTYPE "$dtype"
    env_line TUNE_MOE_NUM_GPUS "${num_gpus:-$found_count}"
    env_line TUNE_MOE_MODEL "${MODELS[$dtype]}"
    env_line HF_HOME "$model_cache"
    env_line VLLM_TUNED_CONFIG_FOLDER "$folder"
    if [[ -n "$nvcc_path" ]]; then env_line CUDA_HOME "$(dirname "$(dirname "$nvcc_path")")"; fi
  } >"$tmp"
  mv -f "$tmp" "$env_out"
  tm_info "wrote $env_out"
}

env_line() { printf 'export %s=%q\n' "$1" "$2"; }

main() {
  parse_args "$@"
  resolve_configs_dir
  tm_probe_driver
  check_gpus
  check_memory
  check_driver
  check_toolkit
  check_disk
  note_moe_backend
  if [[ "$failures" -gt 0 ]]; then
    tm_die "$failures check(s) failed; $env_out was not written"
  fi
  write_env
}

main "$@"
