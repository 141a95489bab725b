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

from dataclasses import dataclass

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


def steady(before: dict, after: dict, key: str) -> bool:
    """Whether two passes in a row agree within ``STEADY`` on ``key`` (a result JSON's metric)."""
    a, b = before.get(key), after.get(key)
    return bool(a) and bool(b) and abs(b / a - 1.0) <= STEADY


@dataclass(frozen=True)
class Workload:
    name: str
    what: str
    input_len: int
    output_len: int
    max_concurrency: int
    num_prompts: int
    ignore_eos: bool
    phase: str  # "decode", "prefill" or "mixed"
    primary: str  # the result key an A/B's verdict compares (higher is better)

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
    Workload("recipe", "the recipe's benchmark: 2048-token prompts, 1024-token outputs, 10 at a time",
             2048, 1024, 10, 100, False, "mixed", "output_throughput"),
    Workload("decode", "128-token prompts, 1024-token outputs with EOS ignored, 32 at a time",
             128, 1024, 32, 64, True, "decode", "output_throughput"),
    Workload("prefill", "8192-token prompts, one output token, 8 at a time",
             8192, 1, 8, 64, True, "prefill", "total_token_throughput"),
)}
