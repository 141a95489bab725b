"""Ask vLLM 0.33's own selection code what it runs for a Step-3.5-Flash MoE layer.

``probe`` sends (ServeFacts, activation) pairs to one ``python -m tuning.vllm.probe`` subprocess
(JSON on stdin and stdout); importing this module imports neither vLLM nor torch, and the
caller's process is never patched. The subprocess first imports the vLLM modules on the
selection path under the platform vLLM finds here, then sets the ``__class__`` of the one
platform instance (``vllm.platforms.current_platform``, which every module imported by name)
to a ``CudaPlatformBase`` subclass saying 9.0 "NVIDIA H200" or 10.0 "NVIDIA B200": swapping
the shared instance's class reaches every holder, and importing first keeps the CUDA ops some
modules call at import time on a CUDA platform from running here (where cuda.py cannot load
its op extension for want of a driver, the extension is stubbed; selection runs no kernel).
It assumes the serving node's full install: FlashInfer's CUTLASS and TRT-LLM fused MoE and
DeepGEMM answer available in every vLLM module that imported the checks, and DeepGEMM's
``_fp8_gemm_nt_impl`` is present. Per case it sets the serve's ``VLLM_*`` variables (clearing
the others that matter), drops vLLM's env cache and the cached DeepGEMM answers, builds the
FusedMoEConfig as ``FusedMoEFactory`` does for step3p5's layer (parallel sizes from
``FusedMoEParallelConfig.make`` as rank 0, model type "step3p5" in the current vLLM config),
and runs what ``Fp8MoEMethod.__init__`` runs (resolve the block, derive the weight key,
``select_fp8_moe_backend``) or ``select_unquantized_moe_backend`` and the round-up
``RoutedExperts`` applies for the unquantized backend chosen.
"""

from __future__ import annotations

import argparse
import enum
import json
import os
import subprocess
import sys
import tempfile
import traceback
from dataclasses import asdict
from pathlib import Path
from types import MethodType, SimpleNamespace

from .serve_command import BOUNDS, GRAPH_KEYS, out_of_bounds, sizes_below_one
from .rules import ACTIVATIONS, FLAGS, VLLM_VERSION as VLLM_SERIES, LayerRuntime, ServeFacts

ARCHS = {"sm90": ((9, 0), "NVIDIA H200"), "sm100": ((10, 0), "NVIDIA B200")}
DTYPES = ("bf16", "fp8")
CLEARED_ENV = (*FLAGS, "VLLM_TRITON_USE_TD")  # the variables the rules read: a case sets them, or they are unset
CHECKPOINT_BLOCK = (128, 128)
# The releases whose selection code this probe drives: 0.33, and 0.34 over the same 7392 serve rows (benchmarks
# README §2w: they answer alike but for B200 bf16 SwiGLU-step layers, which 0.34 runs on FlashInfer TRT-LLM).
# Its serve op runs either release's parser and VllmConfig._set_cudagraph_sizes (0.34 splits prefill and decode).
PROBED = (VLLM_SERIES, "0.34")


def _within(value, key: str) -> bool:
    """Whether vLLM's own pydantic field (the config class ``BOUNDS`` names) takes ``value`` for ``key``."""
    import typing

    import pydantic
    import vllm.config

    field = getattr(vllm.config, BOUNDS[key][0]).__pydantic_fields__[key]
    try:
        pydantic.TypeAdapter(typing.Annotated[int, field]).validate_python(value)
    except pydantic.ValidationError:
        return False
    return True


def _ask(request: dict) -> object:
    """Run one request in a ``python -m tuning.vllm.probe`` subprocess; its JSON answer."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_")}
    env["VLLM_LOGGING_LEVEL"] = "ERROR"
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    with tempfile.TemporaryDirectory(prefix="tune-moe-probe-") as scratch:
        env["HUMMING_TMP_DIR"] = scratch  # vLLM's import of the humming kernels leaves a lock file there
        proc = subprocess.run([sys.executable, "-m", "tuning.vllm.probe"], input=json.dumps(request), env=env,
                              capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        raise RuntimeError(lines[-1] if lines else f"vllm_probe exited with {proc.returncode}")
    return json.loads(proc.stdout)


def probe(cases: list[tuple[ServeFacts, str]]) -> list[LayerRuntime]:
    """vLLM's answer for each (serve, activation), all in one subprocess."""
    for serve, activation in cases:
        if serve.arch not in ARCHS or serve.dtype not in DTYPES or activation not in ACTIVATIONS:
            raise ValueError(f"cannot probe {serve} with activation {activation!r}")
    answers = _ask({"op": "layers", "cases": [{"serve": asdict(s), "activation": a} for s, a in cases]})
    return [LayerRuntime(**{**d, "block": d["block"] and tuple(d["block"])}) for d in answers]


def model_configs(commands: list[list[str]]) -> list[dict]:
    """For each serve command (the words after ``vllm serve``), vLLM's ``ModelConfig``: the Step-3.5 geometry
    its model code reads from the config, --hf-overrides applied; or {"error": message}. One subprocess."""
    return _ask({"op": "model", "requests": [{"argv": argv} for argv in commands]})


def serve_flags() -> dict[str, list]:
    """vLLM's own ``vllm serve`` parser: option -> [destination, takes a value, value stored without one]."""
    return _ask({"op": "flags"})


def preflight(argv: list[str], arch: str, memory_gb: float, env: dict[str, str]) -> dict:
    """One subprocess for ``tune-moe preflight``: vLLM's reading of the serve command (as ``serve_plans``),
    and, for the checkpoint it names, vLLM's backend per activation under ``env``; or {"error": ...}."""
    return _ask({"op": "preflight", "argv": argv, "arch": arch, "memory_gb": memory_gb, "env": env})


def serve_plans(requests: list[tuple[list[str], str, float, int]]) -> list[dict]:
    """For each (serve argv after ``vllm serve``, arch, GPU memory in GB, the checkpoint's MTP modules): what
    vLLM's parser reads, its batch defaults for ``vllm serve`` and the CUDA-graph capture sizes
    ``VllmConfig._set_cudagraph_sizes`` gives; or {"error": the parser's or VllmConfig's message}."""
    return _ask({"op": "serve", "requests": [{"argv": a, "arch": arch, "memory_gb": m, "mtp_layers": k}
                                             for a, arch, m, k in requests]})


# -- the subprocess side ---------------------------------------------------------------------------

class _Mismatch(Exception):
    pass


class _Oracle:
    """vLLM's selection code on a patched platform; one per subprocess."""

    def __init__(self) -> None:
        import vllm

        version = vllm.__version__
        if not version.startswith(tuple(series + "." for series in PROBED)):
            raise _Mismatch(f"vLLM {version} is installed; the probe reads vLLM {' and '.join(PROBED)}")
        try:
            self._import()
            self.gpu = _swap_platform()
            self._assume_full_install()
        except (ImportError, AttributeError) as e:
            raise _Mismatch(f"vLLM {version}: internals differ from {VLLM_SERIES} ({type(e).__name__}: {e})") from None
        self.vllm_config = self.VllmConfig()
        self.vllm_config.model_config = SimpleNamespace(hf_text_config=SimpleNamespace(model_type="step3p5"))
        self.baseline = dict(os.environ)

    def _import(self) -> None:
        import torch
        import vllm.envs as envs
        import vllm.model_executor.layers.fused_moe.config as cfg
        import vllm.model_executor.layers.fused_moe.oracle.fp8 as fp8
        import vllm.model_executor.layers.fused_moe.oracle.unquantized as unq
        import vllm.model_executor.layers.quantization.fp8  # noqa: F401  (what Fp8MoEMethod imports)
        import vllm.model_executor.layers.quantization.online.base  # noqa: F401  (what ModelConfig's check imports)
        import vllm.model_executor.layers.quantization.utils.quant_utils as qu
        import vllm.utils.deep_gemm as dg
        from vllm.config import VllmConfig, set_current_vllm_config
        from vllm.model_executor.layers.fused_moe.activation import MoEActivation

        self.torch, self.envs, self.cfg, self.fp8, self.unq, self.qu, self.dg = torch, envs, cfg, fp8, unq, qu, dg
        self.VllmConfig, self.set_config, self.MoEActivation = VllmConfig, set_current_vllm_config, MoEActivation
        for oracle, backends in ((fp8, fp8.Fp8MoeBackend), (unq, unq.UnquantizedMoeBackend)):
            for backend in backends:  # the experts modules selection imports lazily
                try:
                    oracle.backend_to_kernel_cls(backend)
                except (ImportError, ValueError):
                    pass  # not a CUDA backend

    def _assume_full_install(self) -> None:
        import vllm.utils.flashinfer as fi
        import vllm.utils.import_utils as iu

        for module, name in ((fi, "has_flashinfer_cutlass_fused_moe"), (fi, "has_flashinfer_trtllm_fused_moe"),
                             (iu, "has_deep_gemm")):
            _replace_everywhere(module, name, lambda: True)
        self.dg._fp8_gemm_nt_impl = _deep_gemm_stub

    def parser(self):
        from vllm.entrypoints.common.cli_args import make_arg_parser
        from vllm.utils.argparse_utils import FlexibleArgumentParser

        return make_arg_parser(FlexibleArgumentParser(prog="vllm serve"))  # its errors say "vllm serve: error:"

    def flags(self) -> dict:
        """option -> [destination, how many values it takes (0, 1, "+" or "?"), the value it stores with none]."""
        def stored(action, opt: str):
            if action.nargs != 0:
                return None
            negative = getattr(action, "negative_option_strings", None)  # vLLM's EnableDisableAction
            if negative is not None:
                return opt not in negative
            if isinstance(action, argparse.BooleanOptionalAction):
                return not opt.startswith("--no-")
            return action.const

        registered = self.parser()._option_string_actions  # hidden spellings too (e.g. --no-enable-x)
        return {opt: [a.dest, 1 if a.nargs is None else a.nargs, stored(a, opt)] for opt, a in registered.items()}

    def serve(self, request: dict) -> dict:
        """vLLM's parser, batch defaults and capture sizes for one serve command on one GPU; ``mtp_layers``: the
        checkpoint's MTP modules (the draft config's ``n_predict``)."""
        parsed = self._parse_serve(request)
        if "error" in parsed:
            return parsed
        try:
            plan = self._plan(parsed["ns"], parsed["command"], request["memory_gb"], request.get("mtp_layers", 1))
        except (ValueError, AssertionError) as e:  # what VllmConfig raises for the sizes
            return {"error": _first_line(e)}
        return {"command": parsed["command"], "plan": plan}

    def _parse_serve(self, request: dict) -> dict:
        """The serve command as vLLM's parser reads it, with EngineArgs' shorthand flags applied: {"ns",
        "command"} (ServeCommand's fields), or {"error": the parser's message}."""
        import contextlib
        import io
        import typing

        from vllm.config import CompilationConfig
        from vllm.config.speculative import MTPModelTypes

        self._enter(ServeFacts(arch=request["arch"], dtype="bf16"))
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                ns = self.parser().parse_args(request["argv"])
        except SystemExit:
            lines = err.getvalue().strip().splitlines()
            first = next((i for i, line in enumerate(lines) if ": error: " in line), len(lines) - 1)
            return {"error": " ".join(line.strip() for line in lines[first:first + 3]) or "unparseable"}
        except (KeyError, ValueError) as e:  # a value the parser's type hook cannot take
            return {"error": f"{type(e).__name__}: {e}"}
        if str(ns.optimization_level) not in {"0", "1", "2", "3"}:
            return {"error": f"-O {ns.optimization_level!r} is not an optimization level"}
        if not isinstance(ns.compilation_config, CompilationConfig):
            ns.compilation_config = CompilationConfig(**(ns.compilation_config or {}))
        cc, spec = ns.compilation_config, dict(ns.speculative_config or {})
        for flag, key in (("cudagraph_capture_sizes", "cudagraph_capture_sizes"),
                          ("max_cudagraph_capture_size", "max_cudagraph_capture_size")):  # create_engine_config
            if getattr(ns, flag) is not None:
                if getattr(cc, key) is not None:
                    return {"error": f"{flag} and compilation_config.{key} are mutually exclusive"}
                setattr(cc, key, getattr(ns, flag))
        for flag, key in (("--spec-method", "method"), ("--spec-model", "model"),  # create_speculative_config
                          ("--spec-tokens", "num_speculative_tokens")):
            value = getattr(ns, flag[2:].replace("-", "_"))
            if value is not None:
                if key in spec:
                    return {"error": f"{flag} and --speculative-config['{key}'] are mutually exclusive"}
                spec[key] = value
        spec = {k.replace("-", "_"): v for k, v in spec.items()}
        if spec.get("num_speculative_tokens") is not None and not _within(spec["num_speculative_tokens"],
                                                                          "num_speculative_tokens"):
            return {"error": out_of_bounds("num_speculative_tokens", spec["num_speculative_tokens"])}
        method = spec.get("method")
        if method in typing.get_args(MTPModelTypes):
            method = "mtp"
        elif spec and method is None and spec.get("model") in (None, "ngram", "[ngram]"):
            method = "ngram" if spec.get("model") else "draft_model"
        ns.speculative_config = {**spec, "method": method} if spec else None
        graph = {k: _plain(getattr(cc, k, None)) for k in GRAPH_KEYS if getattr(cc, k, None) is not None}
        if problem := next(filter(None, (sizes_below_one(k, v) for k, v in graph.items() if k.endswith("sizes"))), None):
            return {"error": problem}
        command = {"model": ns.model_tag or ns.model, "tp": ns.tensor_parallel_size, "dp": ns.data_parallel_size,
                   "ep": bool(ns.enable_expert_parallel), "moe_backend": ns.moe_backend,
                   "quantization": ns.quantization, "num_speculative_tokens": int(spec.get("num_speculative_tokens") or 0),
                   "speculative_method": method,
                   "adaptive_verification": bool(spec.get("enable_adaptive_verification", False))
                   and hasattr(self.VllmConfig, "get_varlen_decode_cudagraph_token_sizes"),
                   "max_num_seqs": ns.max_num_seqs, "max_num_batched_tokens": ns.max_num_batched_tokens,
                   "enforce_eager": bool(ns.enforce_eager), "optimization_level": int(ns.optimization_level),
                   "compilation": graph, "performance_mode": ns.performance_mode,
                   "hf_overrides": dict(ns.hf_overrides or {})}
        return {"ns": ns, "command": command}

    def _plan(self, ns, command: dict, memory_gb: float, mtp_layers: int) -> dict:
        """``EngineArgs.get_batch_defaults``, the CUDA-graph mode (-O's default, ``_normalize_piecewise_cudagraph_mode``)
        and ``VllmConfig._set_cudagraph_sizes`` on a stand-in VllmConfig that carries vLLM's own methods."""
        from vllm.config.compilation import CompilationMode
        from vllm.config.speculative import SpeculativeConfig
        from vllm.config.vllm import OPTIMIZATION_LEVEL_TO_CONFIG, OptimizationLevel
        from vllm.engine.arg_utils import EngineArgs
        from vllm.usage.usage_lib import UsageContext

        memory = int(memory_gb * 1e9)
        self.gpu.get_device_total_memory = classmethod(lambda cls, device_id=0: memory)
        tokens, seqs = (d[UsageContext.OPENAI_API_SERVER] for d in EngineArgs.get_batch_defaults(ns.tensor_parallel_size))
        if ns.performance_mode == "throughput":
            tokens, seqs = tokens * 2, seqs * 2
        tokens, seqs = ns.max_num_batched_tokens or tokens, ns.max_num_seqs or seqs
        for key, value in (("tensor_parallel_size", ns.tensor_parallel_size),
                           ("data_parallel_size", ns.data_parallel_size), ("max_num_seqs", seqs),
                           ("max_num_batched_tokens", tokens)):
            if not _within(value, key):
                raise ValueError(out_of_bounds(key, value))
        cc, level = ns.compilation_config, OptimizationLevel(int(ns.optimization_level))
        if cc.cudagraph_mode is None:
            cc.cudagraph_mode = OPTIMIZATION_LEVEL_TO_CONFIG[level]["compilation_config"]["cudagraph_mode"]
        if cc.mode is None:
            cc.mode = CompilationMode.VLLM_COMPILE if level > OptimizationLevel.O0 else CompilationMode.NONE
        k = command["num_speculative_tokens"]
        spec = None
        if ns.speculative_config is not None:
            spec = SimpleNamespace(**{"num_speculative_tokens_per_batch_size": None, "index_share_for_mtp_iteration": None,
                                      "enable_adaptive_verification": False, **ns.speculative_config,
                                      "num_speculative_tokens": k})
            spec.draft_model_config = SimpleNamespace(hf_config=SimpleNamespace(model_type="step3p5_mtp",
                                                                               n_predict=mtp_layers))
            _bind(spec, SpeculativeConfig, ("use_multi_module_mtp", "use_gemma4_mtp", "num_mtp_modules",
                                            "uses_dynamic_speculative_decoding"))
        stand_in = SimpleNamespace(
            model_config=SimpleNamespace(enforce_eager=bool(ns.enforce_eager)), compilation_config=cc,
            scheduler_config=SimpleNamespace(max_num_seqs=seqs, max_num_batched_tokens=tokens),
            uniform_decode_query_len=1 + k, speculative_config=spec, performance_mode=ns.performance_mode,
            num_speculative_tokens=k)
        _bind(stand_in, self.VllmConfig, ("_normalize_piecewise_cudagraph_mode", "get_decode_cudagraph_query_lens",
                                          "get_draft_decode_cudagraph_request_sizes",
                                          "get_varlen_decode_cudagraph_token_sizes", "_split_cudagraph_capture_sizes",
                                          "_set_cudagraph_sizes"))
        stand_in._normalize_piecewise_cudagraph_mode(breakable_cudagraph_enabled=False)
        if ns.enforce_eager:
            cc.cudagraph_mode = type(cc.cudagraph_mode).NONE
        stand_in._set_cudagraph_sizes()
        return {"max_num_seqs": seqs, "max_num_batched_tokens": tokens,
                "capture_sizes": list(cc.cudagraph_capture_sizes or [])}

    def model(self, request: dict) -> dict:
        """``EngineArgs.create_model_config`` for the serve command, and what step3p5.py reads of its hf_config:
        ``_is_moe_layer`` per layer, the ``swiglu_limits`` entry ``FusedMoEBlock`` takes, the expert geometry."""
        from vllm.engine.arg_utils import EngineArgs
        from vllm.model_executor.models.step3p5 import _is_moe_layer

        self._enter(ServeFacts(arch=request["arch"], dtype="bf16"))
        ns = self.parser().parse_args(request["argv"])
        ns.model = ns.model_tag or ns.model
        try:
            config = EngineArgs.from_cli_args(ns).create_model_config()
        except (ValueError, OSError) as e:
            return {"error": f"{type(e).__name__}: {e}"}
        hf = config.hf_text_config
        limits = list(hf.swiglu_limits or [])
        layers = [{"moe": _is_moe_layer(hf, i), "swiglu_limit": limits[i] if i < len(limits) else None,
                   "layer_type": hf.layer_types[i]} for i in range(hf.num_hidden_layers)]
        quant = getattr(hf, "quantization_config", None) or {}
        return {"architectures": list(hf.architectures or config.hf_config.architectures or []),
                "model_type": hf.model_type, "num_experts": hf.moe_num_experts, "top_k": hf.moe_top_k,
                "intermediate": hf.moe_intermediate_size, "hidden": hf.hidden_size, "vocab_size": hf.vocab_size,
                "quantization": config.quantization, "weight_block_size": quant.get("weight_block_size"),
                "max_model_len": config.max_model_len, "layers": layers}

    def preflight(self, request: dict) -> dict:
        from ..errors import UsageError
        from ..models import checkpoint, mtp_layers

        parsed = self._parse_serve(request)
        if "error" in parsed:
            return parsed
        c = parsed["command"]
        try:
            model, dtype = checkpoint(c["model"], c["quantization"], c["hf_overrides"])
            answer = {"command": c, "plan": self._plan(parsed["ns"], c, request["memory_gb"], mtp_layers(c["model"]))}
        except UsageError as e:  # tune-moe's own refusal (the checkpoint's), not vLLM's
            return {"error": str(e) if str(e).startswith("preflight:") else f"preflight: {e}"}
        except (ValueError, AssertionError) as e:  # what VllmConfig raises for the sizes
            return {"error": _first_line(e)}
        facts = ServeFacts(arch=request["arch"], dtype=dtype, tp=c["tp"], dp=c["dp"], ep=c["ep"],
                           moe_backend=c["moe_backend"], env=tuple(sorted(request["env"].items())),
                           num_experts=model.num_experts, intermediate=model.moe_intermediate_size,
                           hidden=model.hidden_size, top_k=model.top_k)
        cases = [{"serve": asdict(facts), "activation": act} for act in ACTIVATIONS]
        return {**answer, "dtype": dtype, "layers": self.run_all(cases)}

    def run_all(self, cases: list[dict]) -> list[dict]:
        with self.set_config(self.vllm_config):
            return [asdict(self.run(ServeFacts(**{**c["serve"], "env": tuple(map(tuple, c["serve"]["env"]))}),
                                    c["activation"])) for c in cases]

    def run(self, serve: ServeFacts, activation: str) -> LayerRuntime:
        self._enter(serve)
        try:
            e8m0 = bool(self.dg.is_deep_gemm_e8m0_used())
        except ValueError:  # a DeepGEMM variable int() cannot read: an error below where vLLM's selection reads it
            e8m0 = False
        try:
            config = self._moe_config(serve, activation)
            if serve.dtype == "fp8":
                backend, experts, n, block = self._select_fp8(config, serve)
            else:
                backend, experts, n, block = self._select_bf16(config)
        except Exception as e:  # what vLLM raises at start-up
            first = (str(e).strip().splitlines() or [""])[0] or _failed_line(e)
            return LayerRuntime(backend=None, experts=None, error=f"{type(e).__name__}: {first}", n=None,
                                block=None, e8m0=e8m0)
        return LayerRuntime(backend=backend.value, experts=experts and experts.__name__, error=None, n=n,
                            block=block, e8m0=e8m0)

    def _enter(self, serve: ServeFacts) -> None:
        self.gpu.capability, self.gpu.name = ARCHS[serve.arch]
        os.environ.clear()
        os.environ.update({k: v for k, v in self.baseline.items() if k not in CLEARED_ENV})
        os.environ.update(dict(serve.env))
        self.envs.disable_envs_cache()
        self.dg.is_deep_gemm_supported.cache_clear()
        self.dg.is_deep_gemm_e8m0_used.cache_clear()

    def _parallel(self, serve: ServeFacts):
        """``FusedMoEParallelConfig.make`` as rank 0 of a TP x DP serve (no PCP, no SP)."""
        parallel = self.vllm_config.parallel_config
        parallel.enable_expert_parallel = serve.ep
        rank0 = {"get_tensor_model_parallel_rank": lambda: 0,
                 "get_dp_group": lambda: SimpleNamespace(rank_in_group=0)}
        saved = {name: getattr(self.cfg, name) for name in rank0}
        try:
            vars(self.cfg).update(rank0)
            return self.cfg.FusedMoEParallelConfig.make(
                tp_size_=serve.tp, pcp_size_=1, dp_size_=serve.dp, sp_size_=1, vllm_parallel_config=parallel)
        finally:
            vars(self.cfg).update(saved)

    def _moe_config(self, serve: ServeFacts, activation: str):
        """``FusedMoEFactory``'s FusedMoEConfig for step3p5's layer: sigmoid + bias, renormalised."""
        parallel = self._parallel(serve)
        return self.cfg.FusedMoEConfig(
            num_experts=serve.num_experts, experts_per_token=serve.top_k, hidden_dim=serve.hidden,
            intermediate_size=serve.intermediate, num_logical_experts=serve.num_experts,
            num_local_experts=-(-serve.num_experts // parallel.ep_size),  # rank 0's share
            moe_parallel_config=parallel, in_dtype=self.torch.bfloat16, moe_backend=serve.moe_backend,
            router_logits_dtype=self.torch.float32, device="cuda",
            max_num_tokens=self.vllm_config.scheduler_config.max_num_batched_tokens,
            activation=self.MoEActivation.from_str(activation),
            routing_method=self.cfg.get_routing_method_type("sigmoid", serve.top_k, True, None, True))

    def _select_fp8(self, config, serve: ServeFacts):
        """``Fp8MoEMethod.__init__`` (quantization/fp8.py) for the serialized block-FP8 checkpoint, then what its
        ``create_weights`` checks of a shard it did not refine: ``validate_fp8_block_shape_moe`` under the serve's
        tensor-parallel size (a shard of 80 columns, TP16, is no whole number of 128 blocks)."""
        import vllm.distributed as dist
        from vllm.model_executor.layers.quantization.utils.fp8_utils import validate_fp8_block_shape_moe

        act_key = self.qu.kFp8Dynamic128Sym
        block, refine = self.fp8.resolve_fp8_moe_weight_block_shape(config, list(CHECKPOINT_BLOCK), act_key, True)
        weight_key = self.qu.create_fp8_quant_key(static=True, group_shape=self.qu.GroupShape(*block))
        backend, experts = self.fp8.select_fp8_moe_backend(
            config=config, weight_key=weight_key, activation_key=act_key, allow_vllm_cutlass=False)
        if refine is None:
            saved = dist.get_tensor_model_parallel_world_size
            dist.get_tensor_model_parallel_world_size = lambda: serve.tp
            try:
                validate_fp8_block_shape_moe(config.intermediate_size_per_partition, list(CHECKPOINT_BLOCK))
            finally:
                dist.get_tensor_model_parallel_world_size = saved
        return backend, experts, config.intermediate_size_per_partition, tuple(block)

    def _select_bf16(self, config):
        """``UnquantizedFusedMoEMethod``: the backend, then ``maybe_roundup_sizes`` for it."""
        backend, experts = self.unq.select_unquantized_moe_backend(config)
        _, n = self.unq.unquantized_round_up_hidden_size_and_intermediate_size(
            backend, config.hidden_dim, config.intermediate_size_per_partition)
        return backend, experts, n, None


def _failed_line(e: BaseException) -> str:
    """A bare ``assert`` has no message: the statement that failed, and where (``fused_moe/config.py:1352``)."""
    frame = traceback.extract_tb(e.__traceback__)[-1]
    where = Path(frame.filename)
    return f"{frame.line} ({where.parent.name}/{where.name}:{frame.lineno})"


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _bind(stand_in: SimpleNamespace, cls: type, names: tuple[str, ...]) -> None:
    """Give ``stand_in`` the methods ``names`` of vLLM's ``cls`` that this release has, bound to it."""
    for name in names:
        if hasattr(cls, name):
            setattr(stand_in, name, MethodType(getattr(cls, name), stand_in))


def _plain(value):
    """A CompilationConfig value as ServeCommand holds it: an enum by name (CUDAGraphMode) or number."""
    if isinstance(value, enum.IntEnum):
        return int(value)
    return value.name if isinstance(value, enum.Enum) else value


def _swap_platform() -> type:
    """Make the shared platform instance a CUDA GPU whose arch ``_Oracle._enter`` sets per case."""
    import vllm.platforms as platforms
    from vllm.platforms.interface import DeviceCapability

    platform = platforms.current_platform
    try:
        from vllm.platforms import cuda
    except ImportError:  # no CUDA driver: cuda.py's custom-op extension cannot load here
        sys.modules.setdefault("vllm._C_stable_libtorch", type(sys)("vllm._C_stable_libtorch"))
        from vllm.platforms import cuda

    class ServeGpu(cuda.CudaPlatformBase):
        capability, name = ARCHS["sm90"]

        @classmethod
        def get_device_capability(cls, device_id: int = 0) -> DeviceCapability:
            return DeviceCapability(*cls.capability)

        @classmethod
        def get_device_name(cls, device_id: int = 0) -> str:
            return cls.name

    platform.__class__ = ServeGpu
    return ServeGpu


def _replace_everywhere(module, name: str, value) -> None:
    """Rebind ``module.name`` and every vLLM module's copy of it imported by name."""
    old = getattr(module, name)
    for mod in list(sys.modules.values()):
        if getattr(mod, "__name__", "").startswith("vllm") and vars(mod).get(name) is old:
            setattr(mod, name, value)


def _deep_gemm_stub(*_args, **_kwargs):
    raise RuntimeError("vllm_probe stands in for DeepGEMM; no kernel runs here")


def main() -> int:
    request = json.load(sys.stdin)
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # vLLM logs to stdout: keep the answer channel clean
    sys.stdout = sys.stderr
    try:
        oracle = _Oracle()
    except _Mismatch as e:
        print(e, file=sys.stderr)
        return 2
    if request["op"] == "layers":
        answer = oracle.run_all(request["cases"])
    elif request["op"] == "flags":
        answer = oracle.flags()
    elif request["op"] == "preflight":
        answer = oracle.preflight(request)
    elif request["op"] == "model":
        answer = [oracle.model({"arch": "sm90", **r}) for r in request["requests"]]
    else:
        answer = [oracle.serve(r) for r in request["requests"]]
    json.dump(answer, answers)
    answers.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
