#!/usr/bin/env bash
# Install vLLM into a virtual environment, then check that vllm, torch and
# triton import, that the installed vLLM is the one asked for, and that the
# driver supports the CUDA torch was built for. nvidia-smi must work: that is
# checked first, before anything is installed (--no-gpu-check skips both).
#
# Usage: install/install-vllm.sh [--pinned [VERSION] | --nightly | --offline DIR] [options]
#
# Modes (the default is --pinned):
#   --pinned [VERSION]  vllm==VERSION from PyPI (default: TUNE_MOE_VLLM_VERSION in
#                       install/versions.env)
#   --nightly           the recipe's nightly: uv pip install -U vllm --pre with the
#                       vLLM nightly and PyTorch cu129 indexes, unsafe-best-match
#   --offline DIR       no network: install from a wheelhouse made by
#                       install/build-wheelhouse.sh (its version and Python)
# Options:
#   --venv DIR          virtual environment to create or reuse (default: ./.venv)
#   --python X.Y        its Python (default: TUNE_MOE_PYTHON_VERSION)
#   --extra-index URL   another index for --pinned, e.g. a PyTorch CUDA index
#   --no-gpu-check      skip the driver checks (a host without a GPU)
#   -h, --help          this text
#
# Uses uv when it is on PATH (required for --nightly), else python3 -m venv and
# pip. Re-running is safe: the venv is reused and an installed requirement is
# left alone. Exit status: 0 installed and checked, 1 failed or drifted (one
# line on stderr says what), 2 bad arguments.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
tm_load_pins

mode="pinned"
version="$TUNE_MOE_VLLM_VERSION"
wheelhouse=""
venv="./.venv"
python_version="$TUNE_MOE_PYTHON_VERSION"
python_given=0
extra_index=""
gpu_check=1

parse_args() {
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --pinned)
        mode="pinned"
        if [[ $# -ge 2 && -z "$2" ]]; then
          tm_usage_error "--pinned: the version is empty; pass --pinned VERSION, or --pinned alone for TUNE_MOE_VLLM_VERSION"
        fi
        if [[ $# -ge 2 && "$2" != -* ]]; then version="$2"; shift; fi
        shift ;;
      --nightly) mode="nightly"; shift ;;
      --offline) tm_need_value "$@"; mode="offline"; wheelhouse="$2"; shift 2 ;;
      --venv) tm_need_value "$@"; venv="$2"; shift 2 ;;
      --python) tm_need_value "$@"; python_version="$2"; python_given=1; shift 2 ;;
      --extra-index) tm_need_value "$@"; extra_index="$2"; shift 2 ;;
      --no-gpu-check) gpu_check=0; shift ;;
      -h | --help) tm_usage "$0"; exit 0 ;;
      *) tm_unknown_option "$1" ;;
    esac
  done
  [[ "$version" =~ ^[0-9]+(\.[0-9]+)*([a-z0-9.+-]*)$ ]] || tm_usage_error "--pinned $version: not a version like 0.33.0"
  [[ "$python_version" =~ ^3\.[0-9]+$ ]] || tm_usage_error "--python $python_version: use a version like 3.12"
  tm_output_folder --venv "$venv"
  if [[ "$mode" == nightly ]] && ! command -v uv >/dev/null 2>&1; then
    tm_die "--nightly needs uv (the recipe installs with it); install uv from https://docs.astral.sh/uv/"
  fi
  if [[ "$mode" == offline ]]; then read_wheelhouse; fi
}

# --offline: the wheelhouse must exist, match its checksums, and name its vLLM and Python.
read_wheelhouse() {
  if [[ -e "$wheelhouse" && ! -d "$wheelhouse" ]]; then
    tm_usage_error "--offline $wheelhouse: not a folder; pass the folder install/build-wheelhouse.sh made"
  fi
  [[ -d "$wheelhouse" ]] || tm_usage_error "--offline $wheelhouse: no such folder; build it with install/build-wheelhouse.sh"
  local manifest="$wheelhouse/tune-moe-wheelhouse.env"
  [[ -r "$manifest" ]] || tm_die "$manifest is missing; rebuild the wheelhouse with install/build-wheelhouse.sh"
  version="$(sed -n 's/^TUNE_MOE_WHEELHOUSE_VLLM=//p' "$manifest")"
  [[ "$python_given" -eq 1 ]] || python_version="$(sed -n 's/^TUNE_MOE_WHEELHOUSE_PYTHON=//p' "$manifest")"
  [[ -n "$version" && -n "$python_version" ]] || tm_die "$manifest names no vLLM or Python version; rebuild the wheelhouse"
  if [[ -f "$wheelhouse/SHA256SUMS" ]]; then
    (cd "$wheelhouse" && sha256sum --check --quiet SHA256SUMS >/dev/null) ||
      tm_die "wheelhouse $wheelhouse does not match its SHA256SUMS; copy it again"
  fi
}

make_venv() {
  if [[ -x "$venv/bin/python" ]]; then
    tm_info "reusing the virtual environment $venv"
  elif command -v uv >/dev/null 2>&1; then
    tm_info "creating $venv (Python $python_version) with uv"
    local offline=()
    if [[ "$mode" == offline ]]; then offline=(--offline); fi
    uv venv "${offline[@]}" --python "$python_version" "$venv"
  else
    tm_info "creating $venv with python3 -m venv (uv not found)"
    python3 -m venv "$venv"
  fi
  [[ -x "$venv/bin/python" ]] || tm_die "no python in $venv after creating it; remove $venv and re-run"
}

# pip install ARGS... into the venv, with uv when there is one.
venv_install() {
  if command -v uv >/dev/null 2>&1; then
    uv pip install --python "$venv/bin/python" "$@"
  else
    "$venv/bin/python" -m pip install "$@"
  fi
}

install_vllm() {
  case "$mode" in
    nightly)
      tm_info "installing the vLLM nightly (the recipe's command)"
      uv pip install --python "$venv/bin/python" -U vllm --pre \
        --extra-index-url "$TUNE_MOE_NIGHTLY_INDEX" \
        --extra-index-url "$TUNE_MOE_NIGHTLY_TORCH_INDEX" \
        --index-strategy unsafe-best-match ;;
    pinned)
      tm_info "installing vllm==$version"
      local extra=()
      if [[ -n "$extra_index" ]]; then
        extra=(--extra-index-url "$extra_index")
        if command -v uv >/dev/null 2>&1; then extra+=(--index-strategy unsafe-best-match); fi
      fi
      local log
      log=$(mktemp)
      if ! venv_install "${extra[@]}" "vllm==$version" 2> >(tee "$log" >&2); then
        local why
        why=$(grep -E '^(ERROR|error): ' "$log" | tail -1 | sed -E 's/^(ERROR|error): //')
        rm -f "$log"
        tm_die "could not install vllm==$version: ${why:-the installer failed, see its output above}; install a release whose pins the index holds (--pinned VERSION, or TUNE_MOE_VLLM_VERSION in install/versions.env), or add the index that holds them (--extra-index URL)"
      fi
      rm -f "$log" ;;
    offline)
      tm_info "installing vllm==$version from the wheelhouse $wheelhouse"
      venv_install --no-index --find-links "$wheelhouse" "vllm==$version" ;;
  esac
}

# Prints name=version for torch, triton and vllm and torch_cuda=X.Y; error=... and exit 1 on a failed import.
installed_versions() {
  "$1" - <<'PY'
import importlib
import sys

for name in ("torch", "triton", "vllm"):
    try:
        module = importlib.import_module(name)
    except Exception as exc:
        first = (str(exc).splitlines() or [""])[0]
        print(f"error={name} does not import: {type(exc).__name__}: {first}")
        sys.exit(1)
    print(f"{name}={getattr(module, '__version__', '')}")
import torch
print(f"torch_cuda={torch.version.cuda or ''}")
PY
}

field() { sed -n "s/^$1=//p" <<<"$2" | sed -n 1p; }

check_install() {
  local out
  out="$(installed_versions "$venv/bin/python")" ||
    tm_die "$(field error "$out"): the install is broken; remove $venv and re-run"
  local vllm torch_version torch_cuda
  vllm="$(field vllm "$out")"
  torch_version="$(field torch "$out")"
  torch_cuda="$(field torch_cuda "$out")"
  if [[ "$mode" != nightly && "${vllm%%+*}" != "$version" ]]; then
    tm_die "vLLM $vllm is installed but $version was requested; re-run, or change the pin in install/versions.env"
  fi
  [[ -n "$torch_cuda" ]] || tm_die "torch $torch_version has no CUDA (a CPU build); install a CUDA build of torch"
  tm_info "vllm $vllm, torch $torch_version (CUDA $torch_cuda), triton $(field triton "$out")"
  check_driver "$torch_version" "$torch_cuda"
}

# Before installing: a missing or failing nvidia-smi ends the run with one line.
check_driver_usable() {
  [[ "$gpu_check" -eq 1 ]] || return 0
  tm_probe_driver
  [[ -z "$TM_DRIVER_PROBLEM" ]] ||
    tm_die "$(tm_driver_message), or pass --no-gpu-check on a host without a GPU"
}

check_driver() {
  if [[ "$gpu_check" -eq 0 ]]; then
    tm_warn "--no-gpu-check: the driver was not compared with torch's CUDA $2"
    return 0
  fi
  local driver_cuda
  driver_cuda="$(tm_driver_cuda)"
  [[ -n "$driver_cuda" ]] || tm_die "nvidia-smi reports no CUDA version; check the NVIDIA driver"
  tm_version_ge "$driver_cuda" "$2" ||
    tm_die "torch $1 is built for CUDA $2 but the driver supports only CUDA $driver_cuda; upgrade the driver or install a torch for CUDA <= $driver_cuda"
  tm_info "the driver supports CUDA $driver_cuda (torch needs $2)"
}

main() {
  parse_args "$@"
  check_driver_usable
  make_venv
  install_vllm
  check_install
  tm_info "done: source $venv/bin/activate"
}

main "$@"
