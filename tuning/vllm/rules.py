"""What vLLM 0.33 decides at run time for a Step-3.5-Flash MoE layer: one home for every such rule.

Each rule names the vLLM 0.33 code it mirrors. The mirror answers on nodes where vLLM cannot be
imported; CI (``tests/test_vllm_rules.py``) drives vLLM's own functions through ``vllm_probe`` over
every row of the serve grid and asserts this mirror gives the same answer. Torch-free.

- the accepted ``--moe-backend`` values and their normalisation (``config/kernel.py`` MoEBackend);
- refine or pad an FP8 shard the 128 block does not divide (``oracle/fp8.py``
  ``resolve_fp8_moe_weight_block_shape``);
- the MoE backend per layer kind, SiLU or clamped SwiGLU (``oracle/fp8.py`` ``select_fp8_moe_backend``,
  ``oracle/unquantized.py`` ``select_unquantized_moe_backend`` and each experts class's
  ``is_supported_config``), assuming FlashInfer and DeepGEMM are usable on the serving node;
- DeepGEMM's E8M0 switch and its per-call dispatch (``utils/deep_gemm.py``, ``experts/triton_deep_gemm_moe.py``);
- the naive block assignment threshold and the nearest-batch-key lookup (``fused_moe.py``);
- where releases launch the kernel differently (``LAUNCH_RULES``: 0.26 and 0.33, each row from that release's source).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from ..errors import UsageError
from ..shapes import MoeShape, fp8_shard_rule, parse_version
from .source import KNOWN_SOURCES

VLLM_VERSION = "0.33"
# The releases whose per-layer backend choice the mirror gives: 0.33, and 0.34 where it differs (a CI test drives
# each release's own selection code over the probe's grid and compares).
MIRRORED = (VLLM_VERSION, "0.34")


def mirrored(vllm_version: str) -> bool:
    """Whether the mirror holds ``vllm_version``'s own rules (a release of ``MIRRORED``)."""
    return parse_version(vllm_version) in {parse_version(v) for v in MIRRORED}

# vllm/config/kernel.py MoEBackend, in vLLM's order.
MOE_BACKENDS = (
    "auto", "triton", "batched_triton", "deep_gemm", "deep_gemm_mega_moe", "cutlass", "flashinfer_trtllm",
    "flashinfer_cutlass", "flashinfer_cutedsl", "flashinfer_moe_ep_cutedsl", "flashinfer_b12x", "b12x",
    "flashinfer_moe_ep_mega_deep_gemm", "marlin", "humming", "triton_unfused", "aiter", "aiter_mega_moe",
    "aiter_triton_mxfp4_bf16", "aiter_triton_mxfp4_mxfp4", "flydsl", "hpc", "emulation", "rdna3",
)
ACTIVATIONS = ("silu", "swiglustep")  # step3p5.py: "swiglustep" where swiglu_limits[layer] is set (7.0)
KIND = {"silu": "SiLU layers", "swiglustep": "SwiGLU-step layers"}  # the layer kinds as the tool names them
DEEPGEMM_ALIGN = 128  # DeepGEMM's get_mk_alignment_for_contiguous_layout() on sm90 and sm100
DEEPGEMM_MIN_N = 513  # experts/deep_gemm_moe.py _valid_deep_gemm: "DeepGemm disabled for N <= 512"
# Backends that run vLLM's fused_moe_kernel with the tuned file as the file means it: M = tokens.
READS_TUNED_FILE = ("TRITON",)


def normalize_moe_backend(text: str) -> str:
    """vLLM's normalisation of ``--moe-backend`` (lower case, '-' -> '_'); one line for an unknown value."""
    value = text.lower().replace("-", "_")
    if value not in MOE_BACKENDS:
        raise UsageError(f"--moe-backend {text!r}: not a vLLM {VLLM_VERSION} value; use one of {', '.join(MOE_BACKENDS)}")
    return value


@dataclass(frozen=True, kw_only=True)
class ServeFacts:
    """What decides a MoE layer's backend (the same record ``vllm_probe`` hands to vLLM)."""

    arch: str  # "sm90" (H200, H20) or "sm100" (B200)
    dtype: str  # "bf16" or "fp8" (the block-FP8 [128,128] checkpoint)
    tp: int = 1
    dp: int = 1
    ep: bool = False
    moe_backend: str = "auto"
    env: tuple[tuple[str, str], ...] = ()  # VLLM_* variables set for the serve
    num_experts: int = 288
    intermediate: int = 1280
    hidden: int = 4096
    top_k: int = 8
    vllm: str = VLLM_VERSION  # the release that serves, MAJOR.MINOR[.PATCH]: where releases choose differently

    def var(self, name: str) -> str | None:
        return dict(self.env).get(name)

    def flag(self, name: str, default: bool) -> bool:
        """A boolean vLLM variable as vllm.envs reads it (``bool(int(value))``: ValueError where int() cannot)."""
        value = self.var(name)
        return default if value is None else bool(int(value))


# The boolean variables the mirror reads, each as vllm.envs does: bool(int(value)). Another value raises where
# vLLM's selection code reads it, which stops the serve (``layer_runtime`` reports it so).
FLAGS = ("VLLM_USE_DEEP_GEMM", "VLLM_USE_DEEP_GEMM_E8M0", "VLLM_MOE_USE_DEEP_GEMM", "VLLM_BATCH_INVARIANT")


def unreadable_flags(env) -> list[str]:
    """The FLAGS that ``env`` (a mapping) sets to a value vLLM's int() cannot read."""
    def readable(value: str) -> bool:
        try:
            int(value)
        except ValueError:
            return False
        return True
    return [name for name in FLAGS if name in env and not readable(env[name])]


def flag_fix(error: str, env) -> str | None:
    """The fix for a start-up ``error`` (LayerRuntime.error) that an unreadable FLAGS variable of ``env`` causes."""
    names = unreadable_flags(env) if error.startswith("ValueError: invalid literal for int()") else []
    return f"set {' and '.join(names)} to 0 or 1 (vLLM reads it as a whole number)" if names else None


@dataclass(frozen=True, kw_only=True)
class LayerRuntime:
    backend: str | None  # vLLM's backend enum value, e.g. "TRITON"; None when the serve fails
    experts: str | None  # the FusedMoEExperts class vLLM picks
    error: str | None  # the start-up failure: "ExceptionType: first line"
    n: int | None  # per-GPU expert width the fused MoE runs
    block: tuple[int, int] | None  # weight block the kernels see (refined, or the checkpoint's)
    e8m0: bool  # is_deep_gemm_e8m0_used()

    @property
    def reads_tuned_file(self) -> bool:
        """vLLM's fused_moe_kernel runs with the tuned file (TritonExperts, or DeepGEMM's Triton fallback)."""
        return self.backend in READS_TUNED_FILE or (self.backend == "DEEPGEMM" and not self.e8m0)


# ---- FP8: the shard, the block and the quantisation key ------------------------------------------

def moe_tp(s: ServeFacts) -> int:
    """The fused MoE's TP size (FusedMoEParallelConfig): TP x DP without EP; 1 with EP, which splits experts."""
    return 1 if s.ep else s.tp * s.dp


def fp8_shard(s: ServeFacts, block: tuple[int, int] = (128, 128)) -> tuple[int, tuple[int, int], bool]:
    """(per-GPU width, block the kernels see, refined?) as resolve_fp8_moe_weight_block_shape decides; a release
    older than that function (``shapes.FP8_SHARD_RULES``: 0.26) keeps the checkpoint's block, which
    ``_unblocked`` then refuses as its Fp8MoEMethod.create_weights does."""
    tp = moe_tp(s)
    n = s.intermediate // tp
    bn, bk = block
    if n % bn == 0 and (tp == 1 or n % bk == 0):
        return n, block, False
    if fp8_shard_rule(s.vllm).action == "refuse":
        return n, block, False
    refine = math.gcd(bn, bk, n, s.hidden)
    refined = (refine, refine) if refine >= 32 else None
    if s.moe_backend != "auto" and not (refined and _refinable(_fp8_request(s))):
        return -(-n // bn) * bn, block, False  # pad_tp_shard_to_weight_blocks
    return (n, refined, True) if refined else (n, block, False)


# ---- which experts class supports what (modular_kernel.is_supported_config, per class) ----------

@dataclass(frozen=True)
class Supports:
    """What one FusedMoEExperts class accepts, for Step-3.5-Flash's layers on CUDA."""

    archs: tuple[str, ...] = ("sm90", "sm100")
    activations: tuple[str, ...] = ACTIVATIONS
    fp8: tuple[str, ...] = ("sm90", "sm100")  # archs where it takes the 128-block FP8 scheme
    refined: bool = False  # takes a refined (e.g. [64,64]) FP8 block
    bf16: bool = True
    batch_invariant: bool = False
    needs_deep_gemm: bool = False
    activations_since: tuple[tuple[str, tuple[int, int]], ...] = ()  # (activation, first release that takes it)

    def refuses(self, s: ServeFacts, act: str, refined: bool) -> str | None:
        """The reason vLLM's is_supported_config gives, or None when the class is supported."""
        if s.arch not in self.archs or (self.needs_deep_gemm and not s.flag("VLLM_USE_DEEP_GEMM", True)):
            return "current device cuda"
        if act not in self.activations and not any(a == act and parse_version(s.vllm) >= since
                                                   for a, since in self.activations_since):
            return f"MoEActivation.{act.upper()} activation"
        if (s.dtype == "fp8" and (s.arch not in self.fp8 or (refined and not self.refined))) or \
                (s.dtype == "bf16" and not self.bf16):
            return "quantization scheme"
        if s.flag("VLLM_BATCH_INVARIANT", False) and not self.batch_invariant:
            return "batch invariance"
        return None


CLASSES = {
    "TritonExperts": Supports(refined=True, batch_invariant=True),
    "BatchedTritonExperts": Supports(fp8=()),
    "TritonOrDeepGemmExperts": Supports(bf16=False, needs_deep_gemm=True),
    "MarlinExperts": Supports(bf16=False),
    "FlashInferExperts": Supports(activations=("silu",), fp8=("sm90",)),
    "TrtLlmFp8ExpertsMonolithic": Supports(archs=("sm100",), activations=("silu",), bf16=False),
    # 0.34: experts/trtllm_bf16_moe.py:140-143 takes SWIGLUSTEP where FlashInfer has the activation (its 0.7.3 pin)
    "TrtLlmBf16ExpertsMonolithic": Supports(archs=("sm100",), activations=("silu",), fp8=(),
                                            activations_since=(("swiglustep", (0, 34)),)),
}
EXPERTS = {  # backend -> its experts classes in vLLM's order (oracle/*.py backend_to_kernel_cls)
    "TRITON": ("TritonExperts",),
    "BATCHED_TRITON": ("BatchedTritonExperts",),
    "DEEPGEMM": ("TritonOrDeepGemmExperts",),
    "MARLIN": ("MarlinExperts",),
    "FLASHINFER_CUTLASS": ("FlashInferExperts",),
    "FLASHINFER_TRTLLM": ("TrtLlmFp8ExpertsMonolithic",),
    "FlashInfer CUTLASS": ("FlashInferExperts",),
    "FlashInfer TRTLLM": ("TrtLlmBf16ExpertsMonolithic",),
}
FP8_REQUEST = {"triton": "TRITON", "deep_gemm": "DEEPGEMM", "flashinfer_trtllm": "FLASHINFER_TRTLLM",
               "flashinfer_cutlass": "FLASHINFER_CUTLASS", "marlin": "MARLIN"}
BF16_REQUEST = {"triton": "TRITON", "batched_triton": "BATCHED_TRITON", "flashinfer_trtllm": "FlashInfer TRTLLM",
                "flashinfer_cutlass": "FlashInfer CUTLASS"}
DISABLED = {"cutlass": "vLLM CUTLASS FP8 MoE backend is disabled for this configuration"}  # allow_vllm_cutlass=False


def _fp8_request(s: ServeFacts) -> str | None:
    return FP8_REQUEST.get(s.moe_backend)


def _refinable(backend: str | None) -> bool:
    """oracle/fp8.py: only Triton-based kernels consume a refined block."""
    return backend is not None and all(CLASSES[c].refined for c in EXPERTS[backend])


def _pick(s: ServeFacts, act: str, order: list[str], refined: bool) -> tuple[str, str] | str:
    """The first (backend, class) vLLM accepts in ``order``; else the last refusal's reason."""
    why = ""
    for backend in order:
        for cls in EXPERTS[backend]:
            why = CLASSES[cls].refuses(s, act, refined)
            if why is None:
                return backend, cls
    return why


def _select(s: ServeFacts, act: str, order: list[str], refined: bool, kind: str) -> tuple[str, str] | str:
    """The first supported (backend, class) of ``order``, or the error vLLM raises: one requested backend that
    refuses (ValueError, _return_or_raise), or none left (NotImplementedError)."""
    found = _pick(s, act, order, refined)
    if isinstance(found, tuple):
        return found
    if len(order) == 1:
        return (f"ValueError: {kind} MoE backend {order[0]} does not support the deployment configuration since "
                f"kernel does not support {found}.")
    return f"NotImplementedError: No {kind} MoE backend supports the deployment configuration."


def _fp8_order(s: ServeFacts) -> list[str]:
    """oracle/fp8.py _get_priority_backends for block FP8 on CUDA (the ones that apply to this model)."""
    order = ["FLASHINFER_TRTLLM", "FLASHINFER_CUTLASS", "DEEPGEMM", "TRITON", "MARLIN"]
    if s.arch == "sm90":
        first = "FLASHINFER_CUTLASS" if s.ep and s.tp * s.dp > 1 else "TRITON"
        order.insert(0, order.pop(order.index(first)))
    return order


def e8m0_used(s: ServeFacts) -> bool:
    """utils/deep_gemm.py is_deep_gemm_e8m0_used: DeepGEMM usable and VLLM_USE_DEEP_GEMM_E8M0 (default on)."""
    return s.flag("VLLM_USE_DEEP_GEMM", True) and s.flag("VLLM_USE_DEEP_GEMM_E8M0", True)


def _fp8_layer(s: ServeFacts, act: str) -> tuple[str, str] | str:
    """oracle/fp8.py select_fp8_moe_backend: (backend, class), or the start-up error."""
    _, _, refined = fp8_shard(s)
    order = _fp8_order(s)
    if s.moe_backend != "auto":
        if s.moe_backend in DISABLED:
            return f"ValueError: {DISABLED[s.moe_backend]}"
        backend = _fp8_request(s)
        if backend is None:
            return f"ValueError: moe_backend='{s.moe_backend}' is not supported for FP8 MoE"
        order = [backend]
    elif s.var("VLLM_USE_DEEP_GEMM") is not None or s.var("VLLM_MOE_USE_DEEP_GEMM") is not None:
        if s.flag("VLLM_USE_DEEP_GEMM", True) and s.flag("VLLM_MOE_USE_DEEP_GEMM", True):
            order = ["DEEPGEMM"]
        else:
            order.remove("DEEPGEMM")
    return _select(s, act, order, refined, "FP8")


def _bf16_layer(s: ServeFacts, act: str) -> tuple[str, str] | str:
    """oracle/unquantized.py select_unquantized_moe_backend on CUDA: (backend, class), or the error."""
    order = ["FlashInfer TRTLLM", "FlashInfer CUTLASS", "TRITON", "BATCHED_TRITON"]
    if s.arch == "sm90":
        order = ["TRITON", "BATCHED_TRITON", "FlashInfer TRTLLM", "FlashInfer CUTLASS"]
    if s.dp > 1:
        order.append(order.pop(order.index("FlashInfer CUTLASS")))
    if s.moe_backend not in ("auto", "humming", "marlin"):
        backend = BF16_REQUEST.get(s.moe_backend)
        if backend is None:
            return f"ValueError: moe_backend='{s.moe_backend}' is not supported for unquantized MoE"
        order = [backend]
    return _select(s, act, order, False, "Unquantized")


def _unsplit(s: ServeFacts) -> str | None:
    """FusedMoEConfig.__post_init__ (fused_moe/config.py): the expert width must split evenly over the MoE's TP."""
    return None if s.intermediate % moe_tp(s) == 0 else \
        "AssertionError: assert self.intermediate_size % tp_size == 0 (fused_moe/config.py)"


def _unblocked(n: int, refined: bool, tp: int, block: tuple[int, int] = (128, 128)) -> str | None:
    """Fp8MoEMethod.create_weights: an unrefined shard must be whole checkpoint blocks
    (fp8_utils.validate_fp8_block_shape_moe, under the serve's tensor-parallel size)."""
    if refined:
        return None
    if n % block[0]:
        return f"ValueError: The output_size of gate's and up's weight = {n} is not divisible by weight " \
               f"quantization block_n = {block[0]}."
    if tp > 1 and n % block[1]:
        return f"ValueError: The input_size of down's weight = {n} is not divisible by weight quantization " \
               f"block_k = {block[1]}."
    return None


UNBLOCKED = ("ValueError: The output_size of gate's and up's weight", "ValueError: The input_size of down's weight")


def unblocked_fix(error: str, vllm_version: str) -> str | None:
    """The fix for ``_unblocked``'s start-up error on a serve of ``vllm_version``: whole experts per GPU, fewer
    TP ranks, and what that release does with an explicit backend (0.33 pads the shard) or a newer one."""
    if not error.startswith(UNBLOCKED):
        return None
    other = ("an explicit --moe-backend (vLLM pads the shard to whole blocks)"
             if fp8_shard_rule(vllm_version).action == "refine"
             else "vLLM 0.33 or later (it refines the block or pads the shard)")
    return f"add --enable-expert-parallel (each GPU then holds whole experts), lower -tp, or serve with {other}"


def layer_runtime(s: ServeFacts, activation: str) -> LayerRuntime:
    """The backend and shard vLLM runs one MoE layer of ``activation`` with (the mirror)."""
    try:
        e8m0 = e8m0_used(s)
    except ValueError:  # reported below where the selection reads the variable
        e8m0 = False
    try:
        found = _unsplit(s) or (_fp8_layer(s, activation) if s.dtype == "fp8" else _bf16_layer(s, activation))
    except ValueError as e:  # a FLAGS variable int() cannot read, where vLLM's selection reads it
        found = f"ValueError: {e}"
    if s.dtype == "fp8" and not isinstance(found, str):
        n, _, refined = fp8_shard(s)
        found = _unblocked(n, refined, s.tp) or found
    if isinstance(found, str):
        return LayerRuntime(backend=None, experts=None, error=found, n=None, block=None, e8m0=e8m0)
    backend, experts = found
    if s.dtype == "fp8":
        n, block, _ = fp8_shard(s)
    else:  # unquantized_round_up_hidden_size_and_intermediate_size: TRT-LLM wants whole 128 columns
        n, block = s.intermediate // moe_tp(s), None
        n = -(-n // 128) * 128 if backend == "FlashInfer TRTLLM" else n
    return LayerRuntime(backend=backend, experts=experts, error=None, n=n, block=block, e8m0=e8m0)


# ---- per call: DeepGEMM or its Triton fallback, naive assignment, the batch key -------------------

def deepgemm_runs(m: int, n: int, k: int, e8m0: bool) -> bool:
    """TritonOrDeepGemmExperts._select_experts_impl: DeepGEMM when E8M0 is used, else for aligned M >= 128
    and N > 512 (M is the tokens of the call, N the per-GPU expert width)."""
    return e8m0 or (m >= DEEPGEMM_ALIGN and n % DEEPGEMM_ALIGN == 0 and k % DEEPGEMM_ALIGN == 0
                    and n >= DEEPGEMM_MIN_N)


def naive_block_assignment(m: int, top_k: int, global_experts: int, has_expert_map: bool) -> bool:
    """fused_moe.py: one (token, expert) pair per block, no moe_align, when M * top_k * 4 <= E and no expert map."""
    return not has_expert_map and m * top_k * 4 <= global_experts


def down_file_name(file_name: str) -> str:
    """fused_moe.py get_moe_configs(..., down_moe=True): the tuned file's name with `_down.json` for `.json`."""
    return file_name.removesuffix(".json") + "_down.json"


def looks_up_down_file(r: "LayerRuntime", *, vllm_version: str, dtype: str) -> bool:
    """From vLLM 0.34, every TritonExperts call on block-FP8 [128,128] (DeepGEMM's Triton fallback too) looks the
    `_down.json` beside the layer's tuned file up, whatever the activation, layout or GPU (experts/triton_moe.py
    436-447): get_moe_configs(..., down_moe=True) logs "Using configuration from ..." when it finds one, else
    nothing."""
    return (parse_version(vllm_version) >= (0, 34) and r.reads_tuned_file and dtype == "fp8"
            and tuple(r.block or ()) == (128, 128))


def reads_down_file(r: "LayerRuntime", activation: str, *, vllm_version: str, arch: str, expert_parallel: bool,
                    dtype: str) -> bool:
    """The serve-level terms of ``sorted_down_runs``: of the layers that look the `_down.json` up
    (``looks_up_down_file``), only TritonExperts' SiLU layers without EP, with DeepGEMM's E8M0 in use, on sm90 can
    take the sorted path (the rest is decided per call)."""
    return (looks_up_down_file(r, vllm_version=vllm_version, dtype=dtype) and r.backend == "TRITON"
            and activation == "silu" and r.e8m0 and not expert_parallel and arch == "sm90")


def sorted_down_runs(*, down: dict | None, activation: str, e8m0: bool, expert_parallel: bool, naive: bool,
                     capability: int, block_shape, block_m: int, hidden: int, n: int) -> bool:
    """vLLM 0.34 experts/triton_moe.py:436-478: TritonExperts takes the sorted-activation path of the down
    projection when the `_down.json` entry nearest to M (``down``, read only for FP8 [128,128] with no
    --moe-backend config override) says "USE_TMA": true, for SiLU without a clamp, no LoRA, DeepGEMM's E8M0 in
    use, a dynamic activation scale, aligned slots (not the naive assignment), no expert map, bf16 activations,
    on compute capability 9.0 only, with w13's BLOCK_SIZE_M a multiple of 16, hidden >= 4096 and divided by the
    entry's BLOCK_SIZE_N, and the per-GPU width ``n`` a multiple of 128."""
    return bool(down and down.get("USE_TMA", False) and activation == "silu" and e8m0 and not expert_parallel
                and not naive and capability == 90 and tuple(block_shape or ()) == (128, 128)
                and block_m % 16 == 0 and hidden >= 4096 and hidden % down["BLOCK_SIZE_N"] == 0 and n % 128 == 0)


def nearest_key(keys, m: int) -> int:
    """fused_moe.py try_get_optimal_moe_config: the config whose batch key is nearest to M."""
    return min(keys, key=lambda k: abs(k - m))


def nearest_entry(table: dict, m: int):
    """The entry vLLM runs for M from a loaded config table: the one at its ``nearest_key``."""
    return table[nearest_key(table, m)]


# ---- how a release launches the kernel, where releases differ ----------------------------------

@dataclass(frozen=True)
class LaunchRules:
    """What a vLLM release's TritonExperts does around fused_moe_kernel beyond the kernel's parameter list (which
    the launcher reads from the kernel itself: a parameter the kernel lacks, such as 0.26's missing USE_TD, is
    not passed)."""

    since: tuple[int, int]  # first release the row applies to
    read_in: tuple[int, int]  # the release whose source the row was read in
    # Expert parallelism: moe_align_block_size(ignore_invalid_experts=True) drops the slots routed to remote
    # experts. Without it they are aligned too, their blocks get expert id -1, and the kernel writes zeros there.
    drop_remote_slots: bool
    # stride_bsn is 0 when the weight scales have a single N block (B_scale.size(1) == 1).
    zero_bsn_for_one_block: bool
    # Block-FP8 weights are loaded through a TMA descriptor (USE_TMA_B) on compute capability 9.x and 10.x, unless
    # the config says "USE_TMA": false, where the weights are contiguous and the N and K tiles divide them.
    tma_weights: bool = False


# Newest first; a release takes the first row at or below it. Rows are read from each release's source
# (vllm/model_executor/layers/fused_moe/); releases between two rows take the older row, and releases after
# the newest row take that row (both unchecked: ``read_in`` says which release each row was read in).
# 0.34: fused_moe.py:883-905 (invoke_fused_moe_triton_kernel) sets use_tma_b from config.pop("USE_TMA", True),
#       use_fp8_w8a8, all(block_shape), is_device_capability_family(90) or (100), B contiguous,
#       B.size(1) % BLOCK_SIZE_N == 0 and B.size(2) % BLOCK_SIZE_K == 0 (BLOCK_SIZE_K clamped to the block), and
#       passes TensorDescriptor.from_tensor(B, [1, BLOCK_SIZE_N, BLOCK_SIZE_K]) as b_desc; a_desc and
#       C_IS_SORTED serve only the sorted-activation path of a `_down.json` file (experts/triton_moe.py:436-485).
#       experts/triton_moe.py:412-431 and fused_moe.py:966-970 keep 0.33's remote-slot drop and stride_bsn.
# 0.33: experts/triton_moe.py:371-392 passes ignore_invalid_experts=skip_invalid (true under EP, no LoRA,
#       block FP8 or bf16); fused_moe.py:890-892 zeroes stride_bsn for one N block.
# 0.26: experts/triton_moe.py:293-305 calls _prepare_expert_assignment without ignore_invalid_experts (default
#       False, fused_moe.py:1491), so moe_align_block_size.py:100 maps the aligned experts through expert_map to -1
#       and fused_moe_kernel writes zeros for those blocks (fused_moe.py:418-430); fused_moe.py:833 passes
#       B_scale.stride(1) whatever B_scale.size(1) is. (Its stride_bse, fused_moe.py:831, differs from 0.33 only
#       for a 1-D per-tensor scale, which tune-moe does not launch.)
LAUNCH_RULES = (
    LaunchRules(since=(0, 34), read_in=(0, 34), drop_remote_slots=True, zero_bsn_for_one_block=True, tma_weights=True),
    LaunchRules(since=(0, 33), read_in=(0, 33), drop_remote_slots=True, zero_bsn_for_one_block=True),
    LaunchRules(since=(0, 0), read_in=(0, 26), drop_remote_slots=False, zero_bsn_for_one_block=False),
)


@functools.lru_cache(maxsize=None)
def launch_rules(vllm_version: str) -> LaunchRules:
    """The row of ``LAUNCH_RULES`` for a version written MAJOR.MINOR[.PATCH]."""
    release = parse_version(vllm_version)
    return next(rule for rule in LAUNCH_RULES if release >= rule.since)


def launch_read_in(vllm_version: str) -> str:
    """Where the rules tune-moe launches ``vllm_version``'s kernel with were read: "" for that release itself,
    else a note naming the release read in its place."""
    read = launch_rules(vllm_version).read_in
    if parse_version(vllm_version) == read:
        return ""
    return f" (read in vLLM {read[0]}.{read[1]}'s source; {vllm_version}'s own launch is not checked)"


def launch_changes(tuned: str, serving: str, shape: MoeShape) -> list[str]:
    """What ``serving`` does differently from ``tuned`` when it launches the kernel of ``shape``'s file (its dtype
    and expert parallelism): the reasons a file tuned under one release is not the tune of the other. Empty when
    alike."""
    fp8, ep = shape.dtype == "fp8", shape.expert_parallel
    old, new = launch_rules(tuned), launch_rules(serving)
    changes = []
    if fp8 and old.tma_weights != new.tma_weights:
        changes.append("reads block-FP8 weights through a TMA descriptor" if new.tma_weights else
                       "reads block-FP8 weights by pointer, not through a TMA descriptor")
    if ep and old.drop_remote_slots != new.drop_remote_slots:
        changes.append("drops the remote experts' slots" if new.drop_remote_slots else
                       "aligns the remote experts' slots too")
    if fp8 and old.zero_bsn_for_one_block != new.zero_bsn_for_one_block:
        changes.append("passes another weight-scale stride for a single N block")
    return changes


def kernel_launch_changes(tuned_sha: str, other_sha: str, shape: MoeShape) -> list[str] | None:
    """``launch_changes`` between two kernel files, by their sha256: [] for one file, or for two known releases'
    files that launch ``shape``'s kernel alike (0.33's and 0.34's for a bf16 file); None where either file is no
    known release's, so nothing can be said of it."""
    if tuned_sha == other_sha:
        return []
    was, now = KNOWN_SOURCES.get(tuned_sha), KNOWN_SOURCES.get(other_sha)
    return launch_changes(was, now, shape) if was and now else None
