#!/usr/bin/env bash
# Make DeepGEMM available to vLLM's Python, then verify it on this GPU.
#
# vLLM >= 0.20 bundles DeepGEMM (vllm.third_party.deep_gemm) and an installed
# deep_gemm package takes precedence over it: when either is there, the build is
# skipped. Otherwise the GPU generation is read from nvidia-smi (or --arch; a
# missing or failing nvidia-smi stops it), nvcc must run and be new enough for
# it (>= 12.3 for sm90, >= 12.9 for sm100), DeepGEMM is cloned at the pinned
# ref, its submodules are updated after the checkout, and the wheel is built
# (python setup.py bdist_wheel) and installed. Last, `python -m
# tuning.deepgemm.check` (tune-moe check-deepgemm) runs and its exit status
# decides this script's.
#
# Usage: install/install-deepgemm.sh [options]
#
# Options:
#   --python PY        interpreter whose environment gets DeepGEMM
#                      (default: python3 on PATH, e.g. after `source .venv/bin/activate`)
#   --ref REF          DeepGEMM tag, branch or commit (default: TUNE_MOE_DEEPGEMM_REF
#                      in install/versions.env)
#   --repo URL         DeepGEMM git remote (default: TUNE_MOE_DEEPGEMM_REPO)
#   --src-dir DIR      the clone, reused by re-runs (default: $TUNE_MOE_SRC_DIR/DeepGEMM;
#                      TUNE_MOE_SRC_DIR defaults to ~/.cache/tune-moe/src)
#   --arch sm90|sm100  GPU to build for (default: read from nvidia-smi)
#   --force-build      build even when DeepGEMM is already available
#   --wheel-dir DIR    also copy the built wheel into DIR
#   --report FILE      the verifier's JSON report (default: ./deepgemm-check.json)
#   --skip-verify      do not run the verifier (a build host without the GPU)
#   -h, --help         this text
#
# Re-running is safe: the clone is reused, fetched, and checked out again at the
# ref. Exit status: 0 DeepGEMM available and verified, 1 failed (never 0 without
# an installed DeepGEMM), 2 bad arguments.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
tm_load_pins

python_bin="python3"
ref="$TUNE_MOE_DEEPGEMM_REF"
repo="$TUNE_MOE_DEEPGEMM_REPO"
src_dir="${TUNE_MOE_SRC_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/tune-moe/src}/DeepGEMM"
arch=""
force_build=0
wheel_dir=""
report="./deepgemm-check.json"
verify=1

parse_args() {
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --python) tm_need_value "$@"; python_bin="$2"; shift 2 ;;
      --ref) tm_need_value "$@"; ref="$2"; shift 2 ;;
      --repo) tm_need_value "$@"; repo="$2"; shift 2 ;;
      --src-dir) tm_need_value "$@"; src_dir="$2"; shift 2 ;;
      --arch) tm_need_value "$@"; arch="$2"; shift 2 ;;
      --force-build) force_build=1; shift ;;
      --wheel-dir) tm_need_value "$@"; wheel_dir="$2"; shift 2 ;;
      --report) tm_need_value "$@"; report="$2"; shift 2 ;;
      --skip-verify) verify=0; shift ;;
      -h | --help) tm_usage "$0"; exit 0 ;;
      *) tm_unknown_option "$1" ;;
    esac
  done
  case "$arch" in
    "" | sm90 | sm100) ;;
    *) tm_usage_error "--arch $arch: use sm90 (H200, H20) or sm100 (B200)" ;;
  esac
  command -v "$python_bin" >/dev/null 2>&1 || tm_usage_error "--python $python_bin: not found; pass the venv's python"
  local major
  major="$("$python_bin" -c 'import sys; print(sys.version_info[0])' 2>/dev/null)" || major=""
  [[ "$major" == 3 ]] || tm_usage_error "--python $python_bin: does not run as a Python 3; pass the venv's python, e.g. .venv/bin/python"
  # Where it writes, checked before anything is built or installed.
  if [[ -n "$wheel_dir" ]]; then tm_output_folder --wheel-dir "$wheel_dir"; fi
  if [[ "$verify" -eq 1 ]]; then tm_output_file --report "$report"; fi
}

# Prints state=installed|bundled|none, origin=DIR, vllm=VERSION for python_bin's environment.
deepgemm_state() {
  "$python_bin" - <<'PY'
import importlib.metadata as md
import importlib.util as iu
import os

def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return ""

state, origin = "none", ""
spec = iu.find_spec("deep_gemm")
if spec is not None and spec.origin:
    state, origin = "installed", os.path.dirname(spec.origin)
else:
    vllm = iu.find_spec("vllm")
    for root in (vllm.submodule_search_locations or []) if vllm else []:
        folder = os.path.join(root, "third_party", "deep_gemm")
        if os.path.isfile(os.path.join(folder, "__init__.py")):
            state, origin = "bundled", folder
            break
print(f"state={state}")
print(f"origin={origin}")
print(f"vllm={version('vllm')}")
PY
}

# The GPU generation to build for: --arch, else the first GPU's compute capability.
# Sets arch; a missing or failing nvidia-smi ends the run with one line.
detect_arch() {
  [[ -z "$arch" ]] || return 0
  tm_probe_driver
  [[ -z "$TM_DRIVER_PROBLEM" ]] ||
    tm_die "$(tm_driver_message), or pass --arch sm90|sm100 (and --skip-verify) on a build host without a GPU"
  local cap
  cap="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | sed -n 1p | tr -d '[:space:]')" || cap=""
  case "$cap" in
    9.0) arch=sm90 ;;
    10.*) arch=sm100 ;;
    "") tm_die "nvidia-smi reports no compute capability; check the driver, or pass --arch sm90|sm100" ;;
    *) tm_die "GPU compute capability '${cap}' is not supported by DeepGEMM (needs 9.0 or 10.x)" ;;
  esac
}

# nvcc must exist and be new enough for the GPU; exports CUDA_HOME for setup.py.
check_nvcc() {
  local target="$1" need nvcc have
  need="$TUNE_MOE_NVCC_MIN_SM90"
  if [[ "$target" == sm100 ]]; then need="$TUNE_MOE_NVCC_MIN_SM100"; fi
  nvcc="$(tm_find_nvcc)" ||
    tm_die "nvcc not found; install CUDA toolkit >= $need and set CUDA_HOME (or put its bin/ on PATH)"
  have="$(tm_nvcc_release "$nvcc")"
  [[ -n "$have" ]] ||
    tm_die "'$nvcc --version' failed or names no release; reinstall the CUDA toolkit or set CUDA_HOME to a working one"
  tm_version_ge "$have" "$need" ||
    tm_die "nvcc $have ($nvcc) is too old for $target, DeepGEMM needs >= $need; install a newer CUDA toolkit and set CUDA_HOME to it"
  export CUDA_HOME="${CUDA_HOME:-$(dirname "$(dirname "$nvcc")")}"
  tm_info "nvcc $have at $nvcc (>= $need for $target)"
}

# Clone once, then fetch; check out the ref (detached) and update submodules after it.
checkout_source() {
  command -v git >/dev/null 2>&1 || tm_die "git is not installed; install git"
  if [[ -d "$src_dir/.git" ]]; then
    tm_info "reusing the clone in $src_dir"
    git -C "$src_dir" remote set-url origin "$repo"
    git -C "$src_dir" fetch --quiet --tags --force --prune origin
  elif [[ -e "$src_dir" && -n "$(ls -A "$src_dir" 2>/dev/null)" ]]; then
    tm_die "$src_dir exists and is not a git clone; remove it or pass --src-dir"
  else
    tm_info "cloning $repo into $src_dir"
    mkdir -p "$(dirname "$src_dir")"
    git clone --quiet "$repo" "$src_dir"
  fi
  local sha
  sha="$(resolve_ref)" || tm_die "ref '$ref' is not in $repo; pass an existing tag, branch or commit with --ref"
  git -C "$src_dir" checkout --quiet --force --detach "$sha"
  git -C "$src_dir" clean -ffdxq
  git -C "$src_dir" submodule sync --quiet --recursive
  git -C "$src_dir" submodule update --quiet --init --recursive --force
  tm_info "DeepGEMM at $ref ($sha), submodules updated"
}

# The commit of the ref: a remote branch first, then a tag or commit (fetched on demand).
resolve_ref() {
  git -C "$src_dir" rev-parse --verify --quiet "refs/remotes/origin/$ref^{commit}" ||
    git -C "$src_dir" rev-parse --verify --quiet "$ref^{commit}" ||
    { git -C "$src_dir" fetch --quiet origin "$ref" 2>/dev/null &&
      git -C "$src_dir" rev-parse --verify --quiet "FETCH_HEAD^{commit}"; }
}

build_and_install() {
  tm_info "building the DeepGEMM wheel (python setup.py bdist_wheel)"
  (cd "$src_dir" && "$python_bin" setup.py bdist_wheel) || tm_die "the DeepGEMM build failed; see the output above"
  local wheels
  mapfile -t wheels < <(find "$src_dir/dist" -maxdepth 1 -name '*.whl' 2>/dev/null | sort)
  [[ ${#wheels[@]} -eq 1 ]] || tm_die "expected one wheel in $src_dir/dist after the build, found ${#wheels[@]}"
  tm_reinstall_wheel "$python_bin" "${wheels[0]}"
  if [[ -n "$wheel_dir" ]]; then
    mkdir -p "$wheel_dir"
    cp -f "${wheels[0]}" "$wheel_dir/"
  fi
  tm_info "installed $(basename "${wheels[0]}")"
}

run_verifier() {
  if [[ "$verify" -eq 0 ]]; then
    tm_warn "--skip-verify: DeepGEMM was not checked on a GPU; run tune-moe check-deepgemm on the node"
    return 0
  fi
  tm_info "verifying: $python_bin -m tuning.deepgemm.check --json-out $report"
  PYTHONPATH="$TM_REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}" "$python_bin" -m tuning.deepgemm.check --json-out "$report" ||
    tm_die "DeepGEMM is installed but failed verification; see the lines above and $report"
}

main() {
  parse_args "$@"
  local state origin vllm_version
  state="$(deepgemm_state)" || tm_die "$python_bin could not inspect its packages; check --python"
  origin="$(sed -n 's/^origin=//p' <<<"$state")"
  vllm_version="$(sed -n 's/^vllm=//p' <<<"$state")"
  state="$(sed -n 's/^state=//p' <<<"$state")"
  case "$state" in
    installed | bundled | none) ;;
    *) tm_die "$python_bin did not report DeepGEMM's state (got '${state}'); check --python" ;;
  esac
  if [[ "$state" != none && "$force_build" -eq 0 ]]; then
    case "$state" in
      installed) tm_info "deep_gemm is already installed at $origin (it takes precedence over vLLM's copy); skipping the build" ;;
      bundled) tm_info "vLLM ${vllm_version} bundles DeepGEMM at $origin; skipping the build" ;;
    esac
    run_verifier
    return
  fi
  if [[ "$state" == none && -n "$vllm_version" ]] && tm_version_ge "$vllm_version" "$TUNE_MOE_VLLM_BUNDLES_DEEPGEMM_SINCE"; then
    tm_warn "vLLM $vllm_version should bundle DeepGEMM but its third_party/deep_gemm is missing; building from source"
  fi
  tm_output_folder --src-dir "$src_dir"
  detect_arch
  check_nvcc "$arch"
  checkout_source
  build_and_install
  run_verifier
}

main "$@"
