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

# tm_need_value FLAG "$@": the option FLAG must be followed by a value, one
# that is not empty and does not start with '-' (that is the next option).
tm_need_value() {
  if [[ $# -lt 2 || -z "$2" ]]; then
    tm_usage_error "$1 needs a value; see --help"
  elif [[ "$2" == -* ]]; then
    tm_usage_error "$1 needs a value, not $2 (a value cannot start with '-'); see --help"
  fi
}

# tm_unknown_option ARG: the one line for an argument no option takes.
tm_unknown_option() {
  if [[ -z "$1" ]]; then tm_usage_error "an empty argument; remove it; see --help"; fi
  tm_usage_error "unknown option $1; see --help"
}

# The nearest existing path at or above PATH (itself when it exists; a link counts).
tm_existing_ancestor() {
  local path="$1"
  while [[ ! -e "$path" && ! -L "$path" ]]; do path="$(dirname "$path")"; done
  printf '%s\n' "$path"
}

# tm_output_folder FLAG DIR: DIR must be a folder this script can create or
# write in; otherwise a usage error, before anything is done.
tm_output_folder() {
  local flag="$1" path="$2" up
  if [[ -e "$path" || -L "$path" ]] && [[ ! -d "$path" ]]; then
    tm_usage_error "$flag $path: exists and is not a folder; pass a folder path"
  fi
  up="$(tm_existing_ancestor "$path")"
  [[ -d "$up" ]] || tm_usage_error "$flag $path: $up is a file, not a folder; pass a folder path"
  [[ -w "$up" && -x "$up" ]] || tm_usage_error "$flag $path: $up is not writable; pass a folder you can write to"
}

# tm_output_file FLAG FILE: FILE must be a file path this script can (re)write,
# its folder created when missing; otherwise a usage error, before anything is done.
tm_output_file() {
  local flag="$1" path="$2" up
  if [[ -d "$path" || "$path" == */ ]]; then
    tm_usage_error "$flag $path: is a folder; pass a file path"
  fi
  up="$(tm_existing_ancestor "$(dirname "$path")")"
  [[ -d "$up" ]] || tm_usage_error "$flag $path: $up is a file, not a folder; pass a file path in a folder"
  [[ -w "$up" && -x "$up" ]] || tm_usage_error "$flag $path: $up is not writable; pass a file path in a folder you can write to"
  if [[ -e "$path" || -L "$path" ]]; then
    [[ -f "$path" ]] || tm_usage_error "$flag $path: exists and is not a regular file; pass a file path"
    [[ -w "$path" ]] || tm_usage_error "$flag $path: exists and is read-only; pass another file path"
  fi
}

# tm_is_whole_number VALUE MAX_DIGITS: true when VALUE is plain decimal digits,
# at most MAX_DIGITS of them after any leading zeros. Read it in base 10
# ($((10#$VALUE))): bash takes a leading 0 for octal.
tm_is_whole_number() {
  [[ "$1" =~ ^0*([0-9]{1,$2})$ ]]
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

# Helpers that print a value (tm_nvcc_release, tm_driver_cuda) exit 0 and print
# nothing when it cannot be read (a tool missing or failing), so `x="$(helper)"`
# never ends a script silently under `set -euo pipefail`; the caller checks for "".
# tm_find_nvcc returns 1 when there is no nvcc: call it as `x="$(tm_find_nvcc)" || ...`.

# First X.Y of "release X.Y" in `NVCC --version`; nothing when NVCC fails.
tm_nvcc_release() {
  local out
  out="$("$1" --version 2>/dev/null)" || return 0
  sed -n 's/.*release \([0-9][0-9]*\.[0-9][0-9]*\).*/\1/p' <<<"$out" | sed -n 1p
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

# Highest CUDA version the driver supports, from nvidia-smi's banner ("CUDA
# Version: 13.0"); nothing when nvidia-smi is missing or fails.
tm_driver_cuda() {
  local out
  out="$(nvidia-smi 2>/dev/null)" || return 0
  sed -n 's/.*CUDA Version: *\([0-9][0-9]*\.[0-9][0-9]*\).*/\1/p' <<<"$out" | sed -n 1p
}

# Can this host use the NVIDIA driver? Runs nvidia-smi once and sets
# TM_DRIVER_PROBLEM (empty when nvidia-smi works; else what is wrong),
# TM_DRIVER_FIX (what to do about it) and TM_DRIVER_SAID (the first line a
# failing nvidia-smi printed). Always returns 0; call it, then test the variables.
tm_probe_driver() {
  TM_DRIVER_PROBLEM="" TM_DRIVER_FIX="" TM_DRIVER_SAID=""
  if ! command -v nvidia-smi >/dev/null 2>&1; then
    TM_DRIVER_PROBLEM="nvidia-smi not found: no NVIDIA driver on this host"
    TM_DRIVER_FIX="install the NVIDIA driver or run on the GPU node"
    return 0
  fi
  local out rc=0
  out="$(nvidia-smi 2>&1)" || rc=$?
  if [[ "$rc" -ne 0 ]]; then
    TM_DRIVER_PROBLEM="nvidia-smi failed (exit $rc): the NVIDIA driver is not usable"
    TM_DRIVER_FIX="fix the driver"
    TM_DRIVER_SAID="$(sed -n 's/^[[:space:]]*//; s/[[:space:]]*$//; /./ { p; q; }' <<<"$out")"
  fi
  return 0
}

# After tm_probe_driver found a problem, the line that says it:
# "PROBLEM (what nvidia-smi said); FIX". Callers may add ", or ..." to the fix.
tm_driver_message() {
  printf '%s%s; %s\n' "$TM_DRIVER_PROBLEM" "${TM_DRIVER_SAID:+ ($TM_DRIVER_SAID)}" "$TM_DRIVER_FIX"
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
