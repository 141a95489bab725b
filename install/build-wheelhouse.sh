#!/usr/bin/env bash
# Build a wheelhouse for air-gapped GPU nodes: every wheel vllm==VERSION needs,
# for the nodes' Python and platform, downloaded on a connected machine with
# pip download. Copy the folder to the node and run
#   install/install-vllm.sh --offline DIR
#
# Usage: install/build-wheelhouse.sh [options]
#
# Options:
#   --out DIR            the wheelhouse (default: ./wheelhouse)
#   --vllm VERSION       vLLM to fetch (default: TUNE_MOE_VLLM_VERSION in install/versions.env)
#   --python X.Y         the nodes' Python (default: TUNE_MOE_PYTHON_VERSION)
#   --glibc X.Y          newest glibc of the nodes; manylinux wheels up to it are
#                        accepted (default: TUNE_MOE_WHEEL_GLIBC)
#   --arch ARCH          the nodes' CPU, x86_64 or aarch64 (default: TUNE_MOE_WHEEL_ARCH)
#   --extra-index URL    another index, e.g. a PyTorch CUDA index
#   --pip PY             the Python whose pip downloads (default: python3)
#   -h, --help           this text
#
# Writes DIR/tune-moe-wheelhouse.env (the vLLM and Python it holds) and
# DIR/SHA256SUMS, which install-vllm.sh --offline reads and checks. Re-running
# is safe: wheels already there are kept. Exit status: 0 built, 1 failed,
# 2 bad arguments.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
tm_load_pins

out="./wheelhouse"
version="$TUNE_MOE_VLLM_VERSION"
python_version="$TUNE_MOE_PYTHON_VERSION"
glibc="$TUNE_MOE_WHEEL_GLIBC"
arch="$TUNE_MOE_WHEEL_ARCH"
extra_index=""
pip_python="python3"

parse_args() {
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --out) tm_need_value "$@"; out="$2"; shift 2 ;;
      --vllm) tm_need_value "$@"; version="$2"; shift 2 ;;
      --python) tm_need_value "$@"; python_version="$2"; shift 2 ;;
      --glibc) tm_need_value "$@"; glibc="$2"; shift 2 ;;
      --arch) tm_need_value "$@"; arch="$2"; shift 2 ;;
      --extra-index) tm_need_value "$@"; extra_index="$2"; shift 2 ;;
      --pip) tm_need_value "$@"; pip_python="$2"; shift 2 ;;
      -h | --help) tm_usage "$0"; exit 0 ;;
      *) tm_unknown_option "$1" ;;
    esac
  done
  [[ "$version" =~ ^[0-9]+(\.[0-9]+)*([a-z0-9.+-]*)$ ]] || tm_usage_error "--vllm $version: not a version like 0.33.0"
  [[ "$python_version" =~ ^3\.[0-9]+$ ]] || tm_usage_error "--python $python_version: use a version like 3.12"
  [[ "$glibc" =~ ^2\.[1-9][0-9]{1,2}$ && $((10#${glibc#2.})) -ge 17 ]] || tm_usage_error "--glibc $glibc: use a version like 2.35 (2.17 or newer)"
  [[ "$arch" == x86_64 || "$arch" == aarch64 ]] || tm_usage_error "--arch $arch: use x86_64 or aarch64"
  tm_output_folder --out "$out"
  "$pip_python" -m pip --version >/dev/null 2>&1 || tm_usage_error "--pip $pip_python: it has no pip; pass a Python with pip"
}

# One --platform per manylinux tag the nodes accept (pip matches them exactly).
platform_args() {
  local minor
  for ((minor = 10#${glibc#2.}; minor >= 17; minor--)); do
    printf -- '--platform\nmanylinux_2_%s_%s\n' "$minor" "$arch"
  done
  printf -- '--platform\nmanylinux2014_%s\n' "$arch"
}

download() {
  local args
  mapfile -t args < <(platform_args)
  if [[ -n "$extra_index" ]]; then args+=(--extra-index-url "$extra_index"); fi
  mkdir -p "$out"
  tm_info "downloading vllm==$version and its dependencies for Python $python_version, glibc <= $glibc, $arch into $out"
  "$pip_python" -m pip download --dest "$out" --only-binary=:all: \
    --python-version "$python_version" --implementation cp "${args[@]}" "vllm==$version" ||
    tm_die "pip download failed; a dependency may have no wheel for this target (see above), try --glibc or --extra-index"
}

write_manifest() {
  compgen -G "$out/vllm-$version-*.whl" >/dev/null ||
    tm_die "no vllm-$version wheel in $out after the download; check --vllm"
  local tmp
  tmp="$(mktemp "$out/.manifest.XXXXXX")"
  {
    printf '# Written by install/build-wheelhouse.sh; read by install/install-vllm.sh --offline\n'
    printf 'TUNE_MOE_WHEELHOUSE_VLLM=%s\n' "$version"
    printf 'TUNE_MOE_WHEELHOUSE_PYTHON=%s\n' "$python_version"
    printf 'TUNE_MOE_WHEELHOUSE_GLIBC=%s\n' "$glibc"
    printf 'TUNE_MOE_WHEELHOUSE_ARCH=%s\n' "$arch"
  } >"$tmp"
  mv -f "$tmp" "$out/tune-moe-wheelhouse.env"
  (cd "$out" && find . -maxdepth 1 -name '*.whl' -printf '%f\n' | LC_ALL=C sort | xargs -r sha256sum >SHA256SUMS.tmp &&
    mv -f SHA256SUMS.tmp SHA256SUMS)
  tm_info "wheelhouse ready: $(find "$out" -maxdepth 1 -name '*.whl' | wc -l) wheels in $out"
}

main() {
  parse_args "$@"
  download
  write_manifest
}

main "$@"
