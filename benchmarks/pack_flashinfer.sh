#!/usr/bin/env bash
# Pack FlashInfer 0.7.2.post1 for the lent GPU machine (no network, at most 64 MiB carried per call).
#
# Usage: benchmarks/pack_flashinfer.sh [--out DIR] [--part-mib N]     (default .gpu/flashinfer, 56)
#
# Downloads, for CPython 3.12 on manylinux x86_64, flashinfer-python and the one dependency it needs at run time
# that the GPU machine lacks (apache-tvm-ffi), installs both into one folder with pip (--target, no deps), and
# writes that folder as a zstd tar (--long, so it shrinks a lot: the wheel's CUDA sources repeat) split into
# parts of at most N MiB, with SHA256SUMS. benchmarks/gpu_stage.sh flashinfer-setup unpacks them into /tmp.
#
# Run-time requirements (the wheel's Requires-Dist) and why each is or is not packed:
#   apache-tvm-ffi        packed: flashinfer.jit imports tvm_ffi, and its JIT build links it
#   numpy packaging requests tabulate tqdm einops click ninja nvidia-ml-py torch
#                         on the GPU machine already (its image's package list, .library/device/KINDS.md)
#   cuda-python           the machine has cuda-bindings, cuda-core and cuda-pathfinder (`import cuda` works)
#   nvidia-cutlass-dsl cuda-tile nvidia-cudnn-frontend nccl4py nccl-extensions
#                         optional here: flashinfer imports them only when present (is_cute_dsl_available,
#                         try/except), and the CUTLASS fused MoE (C++ CUTLASS, JIT-built with nvcc) needs none.
# Any other hard requirement in the metadata stops the script, so a new version cannot slip through unchecked.
# Safe to re-run: the output folder is rebuilt. The parts are git-ignored; never commit them.
set -euo pipefail
cd "$(dirname "$0")/.."

FLASHINFER=flashinfer-python==0.7.2.post1
TVM_FFI=apache-tvm-ffi==0.1.15.post2  # flashinfer requires >=0.1.11,<0.2
KNOWN="apache-tvm-ffi numpy packaging requests tabulate tqdm einops click ninja nvidia-ml-py torch cuda-python \
nvidia-cutlass-dsl cuda-tile nvidia-cudnn-frontend nccl4py nccl-extensions"
out=.gpu/flashinfer part_mib=56
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out=${2:?--out needs a folder}; shift 2 ;;
    --part-mib) part_mib=${2:?--part-mib needs a number}; shift 2 ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "pack_flashinfer.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$part_mib" in ''|*[!0-9]*) echo "pack_flashinfer.sh: --part-mib $part_mib is not a whole number" >&2; exit 2 ;; esac
[ "$part_mib" -ge 1 ] && [ "$part_mib" -le 60 ] || { echo "pack_flashinfer.sh: --part-mib must be 1..60" >&2; exit 2; }
command -v zstd >/dev/null || { echo "pack_flashinfer.sh: needs zstd (apt-get install zstd)" >&2; exit 1; }
py=${PYTHON:-python3}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
tags=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
"$py" -m pip download -q --no-deps "${tags[@]}" -d "$work/wheels" "$FLASHINFER" "$TVM_FFI"

# every hard requirement must be one this script has an answer for
wheel=$(ls "$work"/wheels/flashinfer_python-*.whl)
unknown=$("$py" - "$wheel" "$KNOWN" <<'EOF'
import re, sys, zipfile
whl, known = sys.argv[1], set(sys.argv[2].split())
with zipfile.ZipFile(whl) as z:
    meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
reqs = [l.split(":", 1)[1].strip() for l in meta.splitlines() if l.startswith("Requires-Dist:")]
names = {re.split(r"[ <>=!~;\[(]", r, maxsplit=1)[0].lower() for r in reqs if "extra ==" not in r}
print(" ".join(sorted(names - known)))
EOF
)
[ -z "$unknown" ] || { echo "pack_flashinfer.sh: $FLASHINFER now requires $unknown; decide whether to pack it" >&2; exit 1; }

"$py" -m pip install -q --no-deps --no-compile --no-index "${tags[@]}" --find-links "$work/wheels" --target "$work/site" \
  "$FLASHINFER" "$TVM_FFI"
rm -rf "$out" && mkdir -p "$out"
tar cf - -C "$work/site" . | zstd -19 --long=27 -T0 -q -c | split -b "${part_mib}M" -d - "$out/fi-part-"
(cd "$out" && sha256sum fi-part-* > SHA256SUMS)
echo "$FLASHINFER $TVM_FFI" > "$out/VERSIONS"

# verify: the parts reassemble into a tree holding both packages at the pinned versions
cat "$out"/fi-part-* | zstd -d --long=27 -q -c | tar tf - > "$work/list"
for dist in flashinfer_python-0.7.2.post1.dist-info apache_tvm_ffi-0.1.15.post2.dist-info; do
  grep -q "^\./$dist/METADATA$" "$work/list" || { echo "pack_flashinfer.sh: $dist missing from the pack" >&2; exit 1; }
done
ls -l "$out"/fi-part-* | awk '{printf "%s %.1f MiB\n", $NF, $5 / 1048576}'
