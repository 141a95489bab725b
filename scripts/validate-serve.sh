#!/usr/bin/env bash
# validate-serve.sh: serve Step-3.5-Flash with the tuned fused-MoE configs, prove vLLM loaded them, benchmark.
#
# Usage: scripts/validate-serve.sh --layout TP4|DP4+EP --dtype bf16|fp8 [options]
#
# Builds the recipe's `vllm serve` command for the layout (with --mtp, the MTP flags), sets
# VLLM_TUNED_CONFIG_FOLDER to kernels_configs/vllm-X.Y/<device_name>/ (X.Y: the serve's vLLM release) and the variables of ./tune-moe-node.env,
# waits for GET /health, checks the server log for "Using configuration from <tuned folder>/...",
# runs the recipe's `vllm bench serve` (warm-up passes until two agree, discarded, then the measured one),
# always stops the whole server process group, and writes report.md and report.json into --out. --ab
# compares interleaved pairs of passes without and with the tuned folder (--pairs, default 5; one resident server per arm where
# both fit, else a fresh server per run: --ab-servers): interval and verdict. --reduced
# runs the layout's per-GPU MoE shape on one GPU (a reduced model with dummy weights).
#
# Examples (4xH200):
#   scripts/validate-serve.sh --layout TP4 --dtype bf16 --gpu H200 --print-command
#   scripts/validate-serve.sh --layout TP4 --dtype bf16 --ab
#   scripts/validate-serve.sh --layout DP4+EP --dtype fp8 --moe-backend triton
# One H200 (the TP4 shard, E=288 N=320):
#   scripts/validate-serve.sh --layout TP4 --dtype bf16 --reduced --ab --workload decode --measure-moe-share
#
# Runs from the repo root, so relative paths (--configs, --out, --log, --env-file) are taken from there.
# PYTHON selects the interpreter (default python3; it needs the tuning package's dependencies).
# Exit status: 0 pass, 1 the check or the serve failed, 2 bad input, 130/143 interrupted.
# All options: scripts/validate-serve.sh --help-all (tune-moe validate-serve --help).
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() {
    sed -n '2,/^set -euo pipefail$/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
}

case "${1:-}" in
    -h | --help) usage; exit 0 ;;
    --help-all) set -- --help ;;
esac

python="${PYTHON:-python3}"
if ! command -v "$python" >/dev/null 2>&1; then
    echo "validate-serve.sh: $python not found; install Python 3.11+ or set PYTHON=/path/to/python" >&2
    exit 2
fi
cd "$repo_root"
exec "$python" -m tuning.cli validate-serve "$@"
