"""Benchmark workloads for ``validate-serve``: the recipe's, and two that isolate one phase of serving.

A workload is data: the ``vllm bench serve`` random-dataset sizes, whether EOS is ignored (so every request
produces exactly its output length), the metric an A/B compares, and the tokens one fused-MoE call sees per
step, which is what decides the tuned batch size that runs:

- ``decode``: short prompts, long outputs, a fixed concurrency; after the first step every step decodes one
  token for each of the ``max_concurrency`` requests, so M = the concurrency;
- ``prefill``: long prompts and one output token, so every step is a prefill chunk of M = min(the chunk,
  concurrency x prompt) tokens; its throughput is the total (input) tokens per second;
- ``recipe``: the recipe's ``vllm bench serve`` (2048 in, 1024 out, 10 at a time): mostly decode steps of
  M = 10, with prefill chunks between them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

# Every pass sends prompts no other pass on its server sent (the random dataset's --seed), so none hits the
# prefix cache: warm-up pass i --seed WARMUP_SEED + i, an A/B's pair k --seed k on both arms (the same prompts),
# a single measured pass vLLM's default (0), the profiled pass PROFILE_SEED.
WARMUP_SEED = 1000
PROFILE_SEED = 2000
# A server is warm when two warm-up passes in a row agree within STEADY on the workload's metric: the fused-MoE
# configs of every batch size the workload reaches are compiled and loaded (one pass is not always enough: the
# prefill chunks' sizes, and so the configs they need, vary from pass to pass).
STEADY = 0.03
MAX_WARMUP_PASSES = 4
# The profiled pass (vLLM's torch profiler, --profiler-config): PROFILE_STEPS engine steps, after PROFILE_DELAY steps
# in a decode or mixed workload. A wave's prefill takes ceil(concurrency x prompt / chunk) steps (2 at 128 x 128
# tokens and chunks of 8192), more while requests still arrive; 64 steps in, every request of the wave decodes, so
# the window holds the steps the workload is about, not its first prefill chunks. A prefill workload's steps are
# all prefill chunks: its window starts at once.
PROFILE_STEPS = 16
PROFILE_DELAY = 64


def steady(before: dict, after: dict, key: str) -> bool:
    """Whether two passes in a row agree within ``STEADY`` on ``key`` (a result JSON's metric)."""
    a, b = before.get(key), after.get(key)
    return bool(a) and bool(b) and abs(b / a - 1.0) <= STEADY


@dataclass(frozen=True)
class Workload:
    name: str
    label: str  # "" or what the workload is, ahead of its sizes
    input_len: int
    output_len: int
    max_concurrency: int
    num_prompts: int
    ignore_eos: bool
    phase: str  # "decode", "prefill" or "mixed"
    primary: str  # the result key an A/B's verdict compares (higher is better)

    @property
    def what(self) -> str:
        out = "one output token" if self.output_len == 1 else f"{self.output_len}-token outputs" + (
            " with EOS ignored" if self.ignore_eos else "")
        sizes = f"{self.input_len}-token prompts, {out}, {self.max_concurrency} at a time, {self.num_prompts} prompts"
        return f"{self.label}: {sizes}" if self.label else sizes

    def sized(self, **sizes: int | None) -> Workload:
        """This workload with the sizes given (input_len, output_len, max_concurrency, num_prompts; None: its own):
        what the benchmark sends, so the M per step, the profile window and the prediction follow it."""
        return replace(self, **{k: v for k, v in sizes.items() if v is not None})

    def profile_window(self) -> tuple[int, int]:
        """(delay, steps) of the profiled pass: the steps that dominate this workload (``PROFILE_DELAY``), and
        never past the end of the outputs."""
        if self.phase == "prefill":
            return 0, PROFILE_STEPS
        return max(0, min(PROFILE_DELAY, self.output_len - PROFILE_STEPS - 1)), PROFILE_STEPS

    def as_dict(self) -> dict:
        return {**self.__dict__, "what": self.what}

    def tokens_per_step(self, max_num_batched_tokens: int) -> int:
        """M of the fused MoE in the steps that dominate this workload."""
        if self.phase == "prefill":
            return min(max_num_batched_tokens, self.max_concurrency * self.input_len)
        return self.max_concurrency

    def m_phrase(self, max_num_batched_tokens: int) -> str:
        m = self.tokens_per_step(max_num_batched_tokens)
        if self.phase == "prefill":
            return f"M = {m} tokens per step (prefill chunks of at most {max_num_batched_tokens} tokens)"
        if self.phase == "decode":
            return f"M = {m} tokens per step (one decode token for each of {self.max_concurrency} requests)"
        return f"M = {m} in most steps (decode of {self.max_concurrency} requests), prefill chunks between them"


WORKLOADS: dict[str, Workload] = {w.name: w for w in (
    Workload("recipe", "the recipe's benchmark", 2048, 1024, 10, 100, False, "mixed", "output_throughput"),
    Workload("decode", "", 128, 1024, 32, 64, True, "decode", "output_throughput"),
    Workload("prefill", "", 8192, 1, 8, 64, True, "prefill", "total_token_throughput"),
)}


def profiler_config(folder: Path, workload: Workload) -> str:
    """--profiler-config (its keys in vLLM 0.26 and 0.33): torch, GPU kernels, the workload's window of steps."""
    delay, steps = workload.profile_window()
    return json.dumps({"profiler": "torch", "torch_profiler_dir": str(folder.absolute()),
                       "torch_profiler_with_stack": False, "ignore_frontend": True,
                       "delay_iterations": delay, "max_iterations": steps})
