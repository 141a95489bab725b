"""Deployment layouts and the fused-MoE shapes vLLM asks for under each.

A layout is ``TP<t>``, ``DP<d>``, ``TP<t>+EP`` or ``DP<d>+EP`` (or ``DP<d>+TP<t>+EP``).
With expert parallelism vLLM splits the experts over all tp*dp ranks and does not
split their width; without it, tensor parallelism splits the width.
How vLLM treats an FP8 shard that the quantisation block does not divide depends
on its version: ``FP8_SHARD_RULES`` is that table.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .errors import UsageError
from .models import ModelGeometry

DTYPES = ("bf16", "fp8")
# vLLM's tuning batch sizes (benchmarks/kernels/benchmark_moe.py).
BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024, 1536, 2048, 3072, 4096)
DEFAULT_VLLM_VERSION = "0.33"
MAX_BATCH = 1 << 20  # tokens in one fused-MoE call: beyond any serve's prefill chunk times its DP ranks


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    dp: int = 1
    ep: bool = False

    @property
    def gpus(self) -> int:
        return self.tp * self.dp

    @property
    def name(self) -> str:
        parts = ([f"DP{self.dp}"] if self.dp > 1 else []) + ([f"TP{self.tp}"] if self.tp > 1 or self.dp == 1 else [])
        return "+".join(parts + (["EP"] if self.ep else []))

    def vllm_flags(self) -> list[str]:
        flags = ["--tensor-parallel-size", str(self.tp)] if self.tp > 1 else []
        flags += ["--data-parallel-size", str(self.dp)] if self.dp > 1 else []
        return flags + (["--enable-expert-parallel"] if self.ep else [])


_PART = re.compile(r"^(TP|DP)(\d+)$|^EP(\d*)$")


def parse_layout(text: str) -> Layout:
    tp = dp = 1
    ep, ep_size = False, ""
    for part in text.upper().replace(" ", "").split("+"):
        m = _PART.match(part)
        if not m:
            raise UsageError(f"layout {text!r}: cannot read {part!r}; write layouts like TP4, DP4+EP, TP2+EP")
        if m.group(1) == "TP":
            tp = int(m.group(2))
        elif m.group(1) == "DP":
            dp = int(m.group(2))
        else:
            ep, ep_size = True, m.group(3)
    if tp < 1 or dp < 1 or (ep and tp * dp == 1):
        raise UsageError(f"layout {text!r}: sizes must be >= 1 and EP needs more than one GPU; e.g. DP4+EP")
    if ep_size and int(ep_size) != tp * dp:
        raise UsageError(f"layout {text!r}: vLLM's EP size is TP x DP = {tp * dp}; write EP or EP{tp * dp}")
    return Layout(tp, dp, ep)


def default_layouts(num_gpus: int) -> list[Layout]:
    """TP1/2/4/8, TPn+EP and DPn+EP for every power of two that fits the node."""
    sizes = [n for n in (1, 2, 4, 8) if n <= num_gpus]
    out = [Layout(tp=n) for n in sizes]
    out += [Layout(tp=n, ep=True) for n in sizes if n > 1]
    return out + [Layout(dp=n, ep=True) for n in sizes if n > 1]


@dataclass(frozen=True)
class MoeShape:
    """One fused-MoE problem as vLLM's kernel sees it on one GPU."""

    num_experts: int  # E: experts on this GPU
    global_experts: int  # experts the router picks from
    n: int  # N in vLLM's file name: w2.shape[2], the per-GPU expert width
    k: int  # hidden size
    top_k: int
    dtype: str  # "bf16" or "fp8"
    block_shape: tuple[int, int] | None = None

    @property
    def expert_parallel(self) -> bool:
        return self.num_experts < self.global_experts

    @property
    def vllm_dtype(self) -> str | None:
        return "fp8_w8a8" if self.dtype == "fp8" else None

    def file_name(self, device_name: str) -> str:
        """vLLM's get_config_file_name, exactly."""
        name = f"E={self.num_experts},N={self.n},device_name={device_name}"
        if self.vllm_dtype:
            name += f",dtype={self.vllm_dtype}"
        if self.block_shape and all(self.block_shape):
            name += f",block_shape=[{self.block_shape[0]},{self.block_shape[1]}]"
        return name + ".json"

    @property
    def label(self) -> str:
        block = f" [{self.block_shape[0]},{self.block_shape[1]}]" if self.block_shape else ""
        return f"{self.dtype} E={self.num_experts} N={self.n}{block}"


@dataclass(frozen=True)
class Refusal:
    layout: Layout
    reason: str
    by_vllm: bool = True  # vLLM refuses the layout; else the layout runs but reads no tuned file
    of_backend: bool = False  # decided by the serve's explicit --moe-backend


@dataclass(frozen=True)
class Fp8ShardRule:
    since: tuple[int, int]
    action: str  # "refuse" | "refine" (auto backend) / "pad" (explicit non-Triton backend)


# Newest first; a release takes the first row at or below it. Releases between two rows take the older
# row (unchecked). Each row was read in that release's source (vllm/model_executor/layers/...):
# - 0.33 refines the block (auto backend, or one whose kernels take the refined block) or pads the shard
#   (another explicit backend): fused_moe/oracle/fp8.py:355 resolve_fp8_moe_weight_block_shape and
#   fused_moe/oracle/fp8.py:324 pad_tp_shard_to_weight_blocks.
# - 0.26 refuses whatever the backend: quantization/fp8.py:562-574, Fp8MoEMethod.create_weights raises
#   ValueError("... = 320 is not divisible by weight quantization block_n = 128."). Nothing refines or pads
#   first: Fp8MoEMethod keeps the base maybe_roundup_sizes (fused_moe/fused_moe_method_base.py:74-104, width
#   unchanged), and 0.26 has neither function of 0.33's oracle.
# - the recipe's vLLM (~0.16) refuses.
FP8_SHARD_RULES = (Fp8ShardRule((0, 33), "refine"), Fp8ShardRule((0, 26), "refuse"), Fp8ShardRule((0, 0), "refuse"))


def parse_batch_sizes(text: str | None, option: str = "--batch-sizes") -> tuple[int, ...]:
    """The one parser of batch-size lists: positive integers separated by commas; ``vllm`` stands for
    vLLM's 18 tuning sizes (so ``vllm,32768`` adds a size a serve reaches). None: the 18."""
    if text is None:
        return BATCH_SIZES
    sizes: list[int] = []
    try:
        for word in (w.strip() for w in text.split(",")):  # an empty word ("1,,2") is a number left out: refused
            sizes += BATCH_SIZES if word == "vllm" else [int(word)]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1 or max(sizes) > MAX_BATCH:
        raise UsageError(f"{option} {text!r}: write integers from 1 to {MAX_BATCH} separated by commas "
                         "(vllm: its 18 sizes), e.g. 1,16,256 or vllm,32768")
    return tuple(sorted(set(sizes)))


def parse_version(text: str) -> tuple[int, int]:
    m = re.match(r"^v?(\d+)\.(\d+)", text.strip())
    if not m:
        raise UsageError(f"--vllm-version {text!r}: write it as MAJOR.MINOR, e.g. 0.33")
    return int(m.group(1)), int(m.group(2))


def shape_for(model: ModelGeometry, layout: Layout, dtype: str, vllm_version: str = DEFAULT_VLLM_VERSION,
              moe_backend: str = "auto") -> MoeShape | Refusal:
    """The shape vLLM's fused MoE runs for ``layout``, or why vLLM refuses the layout."""
    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype}: unknown; use one of {', '.join(DTYPES)}")
    E, I = model.num_experts, model.moe_intermediate_size
    ep_size = layout.gpus if layout.ep else 1
    moe_tp = 1 if layout.ep else layout.gpus  # vLLM shards expert width over DP x TP without EP
    if E % ep_size:
        return Refusal(layout, f"{E} experts do not split over {ep_size} EP ranks; use an EP size that divides {E}")
    shard = I // moe_tp
    if I % moe_tp:
        return Refusal(layout, f"expert width {I} does not split over {layout.name}; use a TP size that divides {I}")
    block = None
    if dtype == "fp8":
        if model.weight_block_size is None:
            return Refusal(layout, f"{model.name} has no block-FP8 weights; use the -FP8 checkpoint or --dtype bf16")
        block = model.weight_block_size
        tp_split = moe_tp > 1
        if shard % block[0] or (tp_split and shard % block[1]):
            fixed = _fix_fp8_shard(model, layout, shard, block, vllm_version, moe_backend)
            if isinstance(fixed, Refusal):
                return fixed
            shard, block = fixed
    return MoeShape(E // ep_size, E, shard, model.hidden_size, model.top_k, dtype, block)


def fp8_shard_rule(vllm_version: str) -> Fp8ShardRule:
    """The row of ``FP8_SHARD_RULES`` a release takes: the first at or below it."""
    version = parse_version(vllm_version)
    return next(r for r in FP8_SHARD_RULES if version >= r.since)


def _fix_fp8_shard(model, layout, shard, block, vllm_version, moe_backend):
    if fp8_shard_rule(vllm_version).action == "refuse":
        return Refusal(
            layout,
            f"vLLM {vllm_version} needs the per-GPU expert width {model.moe_intermediate_size}/{layout.gpus}={shard} "
            f"to be a multiple of the FP8 block {block[0]}; use DP{layout.gpus}+EP or a smaller TP, or vLLM >= 0.33",
        )
    refine = math.gcd(block[0], block[1], shard, model.hidden_size)
    if moe_backend != "auto" and (moe_backend != "triton" or refine < 32):  # an explicit backend pads what it
        padded = -(-shard // block[0]) * block[0]                            # cannot refine
        return padded, block
    if refine < 32:
        return Refusal(layout, f"vLLM cannot refine the FP8 block for width {shard} (gcd {refine} < 32), and the "
                               "auto backend does not pad it; use EP, or --moe-backend triton (pads the shard)")
    return shard, (refine, refine)


# The inverse of MoeShape.file_name: E, N, device, dtype (None: bf16), block n, block k. vLLM writes each number
# as Python prints a positive int: ASCII digits, no leading zero (a zero block leaves block_shape out of the name).
_COUNT = r"[1-9][0-9]*"
FILE_NAME = re.compile(rf"^E=({_COUNT}),N=({_COUNT}),device_name=([^,]+)(?:,dtype=([a-z0-9_]+))?"
                       rf"(?:,block_shape=\[({_COUNT}),({_COUNT})\])?\.json$")
# the same layout with anything between the separators: which number of a name FILE_NAME refuses is wrong
_NUMBERS = re.compile(r"^E=([^,]*),N=([^,]*),device_name=[^,]+(?:,dtype=[^,]*)?(?:,block_shape=\[([^,\]]*),([^\]]*)\])?"
                      r"\.json$")


def file_name_error(name: str, where: object = None) -> UsageError:
    """The one line refusing ``name`` (shown as ``where``, default the name itself), which FILE_NAME does not match:
    the number vLLM would never write, where that is what is wrong."""
    m = _NUMBERS.match(name)
    keys = ("E", "N", "block_shape[0]", "block_shape[1]")
    bad = next((f"{k}={v}" for k, v in zip(keys, m.groups() if m else ()) if v is not None
                and not re.fullmatch(_COUNT, v)), None)
    why = f" ({bad}: vLLM writes a positive integer in ASCII digits there)" if bad else ""
    return UsageError(f"{where or name}: not a vLLM fused-MoE config file name{why}; expected "
                      "E=..,N=..,device_name=...json; rename or remove it")


def layouts_of(model: ModelGeometry, dtype: str, vllm_version: str, moe_backend: str = "auto",
               max_gpus: int = 64) -> dict[MoeShape, list[Layout]]:
    """Every shape ``model`` runs on a TPn, TPn+EP or DPn+EP layout of up to ``max_gpus`` GPUs, with its layouts
    (FP8 TP shards as vLLM refines them, or pads them for --moe-backend deep_gemm or the backend given)."""
    out: dict[MoeShape, list[Layout]] = {}
    for n in range(1, max_gpus + 1):
        for layout in {Layout(tp=n), Layout(tp=n, ep=n > 1), Layout(dp=n, ep=n > 1)}:
            for backend in dict.fromkeys((moe_backend, "auto", "deep_gemm")):
                shape = shape_for(model, layout, dtype, vllm_version, backend)
                if isinstance(shape, MoeShape) and layout not in out.setdefault(shape, []):
                    out[shape].append(layout)
    return {s: sorted(lays, key=lambda lay: (lay.gpus, lay.dp, lay.ep)) for s, lays in out.items()}


def shapes_from_file_names(names: list[str], model: ModelGeometry, device_name: str) -> list[MoeShape]:
    """Shapes behind vLLM config file names (e.g. from a log), for ``model`` on ``device_name``."""
    out = []
    for name in names:
        m = FILE_NAME.match(name)
        if not m:
            raise file_name_error(name)
        if m.group(3) != device_name:
            raise UsageError(f"{name} is for {m.group(3)}, not {device_name}; run on that GPU or pass its --gpu")
        if m.group(4) not in (None, "fp8_w8a8"):
            raise UsageError(f"{name}: dtype {m.group(4)} is not tuned by tune-moe (bf16 and fp8_w8a8 are)")
        if m.group(4) and not m.group(5):
            raise UsageError(f"{name}: per-tensor FP8 (--quantization fp8 on a bf16 checkpoint) is not tuned by "
                             "tune-moe; serve the block-FP8 checkpoint (-FP8), whose files carry block_shape")
        block = (int(m.group(5)), int(m.group(6))) if m.group(5) else None
        dtype = "fp8" if m.group(4) else "bf16"
        out.append(MoeShape(int(m.group(1)), model.num_experts, int(m.group(2)), model.hidden_size, model.top_k,
                            dtype, block))
    return out
