"""The recipe's serve and benchmark commands (seed: vLLM's Step-3.5-Flash recipe), built from data.

``ServeSpec.argv`` is the ``vllm serve`` command of one layout, with the recipe's parser flags, MTP and
``--moe-backend`` when asked; ``BenchSpec.argv`` its ``vllm bench serve``. ``serve_line`` is the same
command as one shell-quoted line for a terminal or a README, with the tuned folder in front.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, replace
from pathlib import Path

from ..configs import TUNED_VAR
from ..models import DEFAULT_MODEL
from ..shapes import Layout
from .workloads import WARMUP_SEED

SECRET = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|KEY", re.IGNORECASE)
CHECKPOINTS = {"bf16": DEFAULT_MODEL, "fp8": DEFAULT_MODEL + "-FP8"}
RECIPE_FLAGS = ("--reasoning-parser", "step3p5", "--tool-call-parser", "step3p5", "--enable-auto-tool-choice",
                "--trust-remote-code")
MTP_FLAGS = ("--hf-overrides", '{"num_nextn_predict_layers": 1}',
             "--speculative-config", '{"method": "step3p5_mtp", "num_speculative_tokens": 1}')
# The recipe's 4xH200 bf16 TP4 result for its `vllm bench serve` command.
RECIPE_LABEL = "recipe 4xH200 bf16 TP4"
RECIPE_METRICS = {"output_throughput": 811.94, "mean_tpot_ms": 11.91, "mean_ttft_ms": 422.62}


@dataclass(frozen=True, kw_only=True)
class ServeSpec:
    """One ``vllm serve`` of the recipe: what runs, with which environment. Built by name."""

    model: str
    layout: Layout
    dtype: str
    port: int | None = None
    mtp: bool = False
    moe_backend: str = "auto"
    tuned_folder: Path | None = None  # None: serve with vLLM's own configs (the A/B baseline)
    env: tuple[tuple[str, str], ...] = ()  # from the node env file (and what a reduced serve adds)
    model_args: tuple[str, ...] = ()  # right after the model: a reduced serve's --load-format and --hf-overrides
    extra_args: tuple[str, ...] = ()

    def argv(self) -> list[str]:
        argv = ["vllm", "serve", self.model, *self.model_args, *self.layout.vllm_flags(), *RECIPE_FLAGS]
        argv += MTP_FLAGS if self.mtp else ()
        argv += ["--moe-backend", self.moe_backend] if self.moe_backend != "auto" else []
        argv += ["--port", str(self.port)] if self.port is not None else []
        return argv + list(self.extra_args)

    def env_updates(self) -> dict[str, str]:
        """What this serve adds to the caller's environment."""
        env = {k: v for k, v in self.env if k != TUNED_VAR}
        return {**env, TUNED_VAR: str(self.tuned_folder)} if self.tuned_folder else env

    def environ(self, base: dict[str, str]) -> dict[str, str]:
        return {**{k: v for k, v in base.items() if k != TUNED_VAR}, **self.env_updates()}

    def shown_env(self) -> dict[str, str]:
        """``env_updates()`` fit for a terminal or a report: secrets (tokens, keys, passwords) hidden."""
        return {k: "<hidden>" if SECRET.search(k) else v for k, v in self.env_updates().items()}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass(frozen=True, kw_only=True)
class BenchSpec:
    """The recipe's ``vllm bench serve`` parameters."""

    backend: str = "vllm"
    endpoint: str = "/v1/completions"
    dataset: str = "random"
    input_len: int = 2048
    output_len: int = 1024
    max_concurrency: int = 10
    num_prompts: int = 100
    ignore_eos: bool = False  # every request produces exactly output_len tokens
    seed: int | None = None  # the random dataset's --seed (vLLM's default is 0)
    profile: bool = False  # --profile: /start_profile and /stop_profile around the run
    extra_args: tuple[str, ...] = ()

    def argv(self, serve: ServeSpec, result: Path) -> list[str]:
        return ["vllm", "bench", "serve", "--backend", self.backend, "--model", serve.model,
                "--endpoint", self.endpoint, "--dataset-name", self.dataset,
                "--random-input-len", str(self.input_len), "--random-output-len", str(self.output_len),
                "--max-concurrency", str(self.max_concurrency), "--num-prompts", str(self.num_prompts),
                "--host", "127.0.0.1", "--port", str(serve.port),
                "--save-result", "--result-dir", str(result.parent), "--result-filename", result.name,
                *self._options(), *self.extra_args]

    def warmup(self, i: int) -> BenchSpec:
        """Warm-up pass i (from 1): prompts no measured pass sends, --seed WARMUP_SEED + i; never profiled."""
        return replace(self, seed=WARMUP_SEED + i, profile=False)

    def for_pair(self, pair: int | None) -> BenchSpec:
        """An A/B's pair k: both arms send the same prompts, --seed k; a single pass keeps its seed."""
        return self if pair is None else replace(self, seed=pair)

    def _options(self) -> list[str]:
        seed = ["--seed", str(self.seed)] if self.seed is not None else []
        return (["--ignore-eos"] if self.ignore_eos else []) + seed + (["--profile"] if self.profile else [])


def serve_line(spec: ServeSpec) -> str:
    """``spec`` as one shell line: the environment it adds, then ``vllm serve ...``, every word quoted."""
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in spec.shown_env().items())
    return (env + " " if env else "") + shlex.join(spec.argv())
