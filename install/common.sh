#!/usr/bin/env bash
# Helpers shared by install/*.sh: help text, errors, pins, version checks.
# Sourced by the other scripts; running it only prints this text.
#
# Usage: source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
set -euo pipefail

TM_PROG="$(basename "$0")"
TM_INSTALL_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck disable=SC2034  # read by the scripts that source this file
TM_REPO_ROOT="$(dirname "$TM_INSTALL_DIR")"

# Print the header comment of a script (line 2 to the first non-comment line).
tm_usage() {
  awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "${1:-$0}"
}

tm_info() { printf '==> %s\n' "$*"; }
tm_warn() { printf '%s: warning: %s\n' "$TM_PROG" "$*" >&2; }

# A failure: one line on stderr, exit 1.
tm_die() {
  printf '%s: error: %s\n' "$TM_PROG" "$*" >&2
  exit 1
}

# Bad arguments: one line on stderr, exit 2.
tm_usage_error() {
  printf '%s: error: %s\n' "$TM_PROG" "$*" >&2
  exit 2
}

# tm_need_value FLAG "$@": the option FLAG must be followed by a value.
tm_need_value() {
  if [[ $# -lt 2 || -z "$2" || "$2" == --* ]]; then
    tm_usage_error "$1 needs a value; see --help"
  fi
}

tm_load_pins() {
  local pins="${TUNE_MOE_VERSIONS_FILE:-$TM_INSTALL_DIR/versions.env}"
  [[ -r "$pins" ]] || tm_die "cannot read the pins file $pins; restore install/versions.env"
  # shellcheck source=versions.env
  source "$pins"
}

# tm_version_ge A B: true when version A >= version B (dotted numbers).
tm_version_ge() {
  [[ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | sed -n 1p)" == "$2" ]]
}

# First X.Y of "release X.Y" in `nvcc --version`.
tm_nvcc_release() {
  "$1" --version 2>/dev/null | sed -n 's/.*release \([0-9][0-9]*\.[0-9][0-9]*\).*/\1/p' | sed -n 1p
}

# The nvcc DeepGEMM would use: $CUDA_HOME/bin/nvcc, else the one on PATH, else /usr/local/cuda.
tm_find_nvcc() {
  local candidate
  for candidate in "${CUDA_HOME:+$CUDA_HOME/bin/nvcc}" "$(command -v nvcc || true)" /usr/local/cuda/bin/nvcc; do
    if [[ -n "$candidate" && -x "$candidate" ]]; then
      printf '%s\n' "$candidate"
      return 0
    fi
  done
  return 1
}

# Highest CUDA version the driver supports, from nvidia-smi's banner ("CUDA Version: 13.0").
tm_driver_cuda() {
  nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9][0-9]*\.[0-9][0-9]*\).*/\1/p' | sed -n 1p
}

# vLLM's device name for a GPU name: spaces and '/' become '_', any H200 is NVIDIA_H200.
tm_vllm_device_name() {
  local name
  name="$(printf '%s' "$1" | sed -E 's#[[:space:]/]+#_#g')"
  if [[ "_${name}_" == *_H200_* ]]; then
    printf 'NVIDIA_H200\n'
  else
    printf '%s\n' "$name"
  fi
}

# tm_reinstall_wheel PYTHON WHEEL: (re)install one wheel into PYTHON's environment.
tm_reinstall_wheel() {
  if "$1" -m pip --version >/dev/null 2>&1; then
    "$1" -m pip install --force-reinstall --no-deps "$2"
  elif command -v uv >/dev/null 2>&1; then
    uv pip install --python "$1" --reinstall --no-deps "$2"
  else
    tm_die "$1 has no pip and uv is not installed; install one of them"
  fi
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  tm_usage "$0"
  exit 0
fi
