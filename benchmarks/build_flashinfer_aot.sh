#!/usr/bin/env bash
# Build FlashInfer 0.7.2.post1's fused_moe_90 module (the block-scale path vLLM runs; benchmarks/flashinfer_blockscale.py)
# on this machine, no GPU needed, and pack it for the lent H200, where `gpu_stage.sh flashinfer-aot` installs it as
# FlashInfer's AOT module: nothing is compiled there, so none of its device time goes to nvcc.
#
# Usage: PYTHON=.venv/bin/python benchmarks/build_flashinfer_aot.sh [--out DIR] [--jobs N]
#        (default .gpu/flashinfer: fi-aot-part-NN of 15 MiB and fi-aot.sha256, next to pack_flashinfer.sh's parts)
#
# The compiler is the H200 machine's: CUDA 13.0's nvcc, runtime, CCCL, CRT and NVVM from their PyPI wheels, in
# .gpu/cuda130. FlashInfer and apache-tvm-ffi are the versions pack_flashinfer.sh packs for that machine, so the
# module links the same libtvm_ffi. The cuBLAS, NVRTC and cuRAND headers and libnvrtc come from PYTHON's environment
# (vLLM's pins nvidia-cublas, nvidia-cuda-nvrtc and nvidia-curand 13); libcuda is a stub with the driver's soname that defines the driver
# functions the module calls (flashinfer_blockscale.py writes it; the driver resolves them at load time). sm_90a only (FLASHINFER_CUDA_ARCH_LIST=9.0a), as FlashInfer builds it on an H200.
# Needs gcc, ninja, binutils (nm, objcopy), xz and PyPI. On 2 cores the 28 files take about an hour; a build
# already done (the library in .gpu/fi-build) is packed again, not rebuilt.
set -euo pipefail
cd "$(dirname "$0")/.."

out=.gpu/flashinfer jobs=$(nproc)
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out=${2:?--out needs a folder}; shift 2 ;;
    --jobs) jobs=${2:?--jobs needs a number}; shift 2 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "build_flashinfer_aot.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$jobs" in ''|*[!0-9]*|0) echo "build_flashinfer_aot.sh: --jobs $jobs is not a positive number" >&2; exit 2 ;; esac
py=${PYTHON:-python3}
for tool in gcc ninja nm objcopy readelf xz; do
  command -v "$tool" >/dev/null || { echo "build_flashinfer_aot.sh: needs $tool (apt-get install gcc ninja-build binutils xz-utils)" >&2; exit 1; }
done
nvidia=$("$py" -c 'import importlib.util as u; print(u.find_spec("nvidia").submodule_search_locations[0])' 2>/dev/null) \
  && [ -f "$nvidia/cu13/include/cublasLt.h" ] && [ -f "$nvidia/cu13/lib/libnvrtc.so.13" ] \
  || { echo "build_flashinfer_aot.sh: $py has no nvidia-cublas/nvidia-cuda-nvrtc 13 (set PYTHON to vLLM's environment, e.g. .venv/bin/python)" >&2; exit 1; }

# CUDA 13.0, as the H200 machine has it (nvcc 13.0)
cuda=.gpu/cuda130/cu13
if [ ! -x "$cuda/bin/nvcc" ]; then
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  "$py" -m pip download -q --no-deps -d "$work" nvidia-cuda-nvcc==13.0.88 nvidia-cuda-runtime==13.0.96 \
    nvidia-cuda-cccl==13.0.85 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88
  for whl in "$work"/*.whl; do "$py" -m zipfile -e "$whl" "$work/x"; done
  rm -rf "$cuda" && mkdir -p "$(dirname "$cuda")" && mv "$work/x/nvidia/cu13" "$cuda"
  chmod +x "$cuda"/bin/* "$cuda"/nvvm/bin/cicc
  cp -rn "$nvidia"/cu13/include/. "$cuda/include/"  # cuBLAS, NVRTC, cuRAND headers the module includes (no clobber)
  cp "$nvidia/cu13/lib/libnvrtc.so.13" "$cuda/lib/"
  ln -sfn libnvrtc.so.13 "$cuda/lib/libnvrtc.so" && ln -sfn libcudart.so.13 "$cuda/lib/libcudart.so" && ln -sfn lib "$cuda/lib64"
fi
"$cuda/bin/nvcc" --version | grep -q "release 13.0" || { echo "build_flashinfer_aot.sh: $cuda/bin/nvcc is not CUDA 13.0" >&2; exit 1; }

# FlashInfer and tvm-ffi at the versions the H200 machine gets (pack_flashinfer.sh)
site=.gpu/fi-build/site
if [ ! -f "$site/flashinfer_python-0.7.2.post1.dist-info/METADATA" ]; then
  rm -rf "$site"
  "$py" -m pip install -q --no-deps --no-compile --target "$site" flashinfer-python==0.7.2.post1 apache-tvm-ffi==0.1.15.post2
fi
aot=$site/flashinfer/data/aot/fused_moe_90
if [ ! -f "$aot/fused_moe_90.so" ]; then
  CUDA_HOME=$PWD/$cuda PATH=$PWD/$cuda/bin:$PATH FLASHINFER_CUDA_ARCH_LIST=9.0a \
    FLASHINFER_WORKSPACE_BASE=$PWD/.gpu/fi-build/work PYTHONPATH=$PWD/$site:$PWD MAX_JOBS=$jobs \
    FLASHINFER_BLOCKSCALE_CUDA_STUB=$PWD/$cuda/lib/stubs/libcuda.so \
    "$py" benchmarks/flashinfer_blockscale.py build
fi

mkdir -p "$out" && rm -f "$out"/fi-aot-part-* "$out/fi-aot.sha256"
tar cf - -C "$aot" fused_moe_90.so BUILD.json | xz -T0 -6 | split -b 15m -d - "$out/fi-aot-part-"
(cd "$out" && sha256sum fi-aot-part-* > fi-aot.sha256)
ls -l "$out"/fi-aot-part-* | awk '{printf "%s %.1f MiB\n", $NF, $5 / 1048576}'
echo "carry $out/fi-aot-part-* and $out/fi-aot.sha256 to the GPU machine; gpu_stage.sh flashinfer-aot installs them"
