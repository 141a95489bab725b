"""What a vLLM server log says about fused-MoE configs and the MoE backend; whether it proves the tuned folder was used.

The lines read (vLLM 0.33, ``fused_moe.get_moe_configs`` and the MoE backend oracles), each behind a
prefix such as ``(EngineCore_DP0 pid=123) (Worker_TP0 pid=456) WARNING 11-29 05:40:01 [fused_moe.py:1165] ``:

- ``Using configuration from <path> for MoE layer.`` (info, logged once by the global first rank);
- ``Using default MoE config. Performance might be sub-optimal! Config file not found at <paths>``
  (warning, once per node), ``<paths>`` being ``$VLLM_TUNED_CONFIG_FOLDER/<name>, <vllm>/configs/<name>``
  joined with ", " -- the names hold commas but no spaces;
- ``Using TRITON Fp8 MoE backend out of potential backends: [...]`` (or ``Unquantized``; names such as
  ``FlashInfer CUTLASS`` hold spaces), logged once per distinct backend (``logger.info_once``): a serve
  whose two MoE layer kinds (SiLU and clamped SwiGLU) pick two backends logs both.

- ``Triton kernel JIT compilation during inference: fused_moe_kernel (constexprs={...}; ...). This causes a
  latency spike; ...`` (vLLM 0.26 and 0.33, ``utils/jit_monitor.py``, active once the server has warmed up):
  a kernel compiled while serving. Logged once per server, or for every compile (with the kernel's
  constexprs) under ``--jit-monitor-verbose``, which validate-serve passes: ``jit_compiles`` reads them.

``prove_tuned`` says whether a log proves the tuned folder was used; ``agreement`` whether the log
agrees with what preflight predicted per layer kind (the backends, and the files vLLM looked up).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UsageError

ANSI = re.compile(r"\x1b\[[0-9;]*m")
LOGGER = re.compile(r"\b(DEBUG|INFO|WARNING|ERROR|CRITICAL) \d\d-\d\d \d\d:\d\d:\d\d(\.\d+)? \[")  # vLLM's log format
USING = re.compile(r"Using configuration from (.+?\.json) for MoE layer\.")
MISSING = re.compile(r"Using default MoE config\. Performance might be sub-optimal! "
                     r"Config file not found at (.+?\.json)\s*$")
BACKEND = re.compile(r"Using (.+?) (Fp8|Unquantized) MoE backend\b")
JIT = re.compile(r"\b(Triton kernel JIT compilation|CuTeDSL JIT compilation|TileLang JIT compilation) during "
                 r"inference: (\S+?)(?: \(|\. This causes)")
JIT_VERBOSE = "--jit-monitor-verbose"  # vLLM 0.26's and 0.33's: log every JIT compile while serving, not the first
# Backends whose reading of a tuned file proves the tuned configs ran as tuned: TritonExperts, where M is
# the tokens of the call, as the file's keys mean. BATCHED_TRITON reads the same file but runs the batched
# kernel, where M is the tokens per expert; DEEPGEMM reads it only for its Triton fallback.
TRITON_BACKENDS = ("TRITON",)
BATCHED = "BATCHED_TRITON"
READERS = (*TRITON_BACKENDS, BATCHED, "DEEPGEMM")  # backends that may look a tuned file up at all


@dataclass
class MoeLogFacts:
    loaded: list[str] = field(default_factory=list)  # full paths vLLM loaded
    missing: list[str] = field(default_factory=list)  # file names vLLM looked for and did not find
    backends: list[str] = field(default_factory=list)  # e.g. "TRITON (Fp8)"
    searched: list[str] = field(default_factory=list)  # every path vLLM tried for a missing file

    @property
    def backend_names(self) -> list[str]:
        return [b.split(" (")[0] for b in self.backends]


def read_log(text: str) -> MoeLogFacts:
    facts = MoeLogFacts()
    for line in ANSI.sub("", text).splitlines():
        if m := USING.search(line):
            _add(facts.loaded, m.group(1))
        elif m := MISSING.search(line):
            paths = m.group(1).split(", ")
            _add(facts.missing, file_name_of(paths[-1]))
            for path in paths:
                _add(facts.searched, path)
        elif m := BACKEND.search(line):
            _add(facts.backends, f"{m.group(1)} ({m.group(2)})")
    return facts


def jit_compiles(text: str) -> list[str]:
    """The kernels vLLM's JIT monitor saw compiled while serving, one entry per compile (e.g. fused_moe_kernel)."""
    return [m.group(2) for m in JIT.finditer(ANSI.sub("", text))]


def file_name_of(path: str) -> str:
    # vLLM tries the user folder then its bundled folder, both ending in the same name; the last
    # path is vLLM's own, so a user folder holding spaces or ", " cannot shift the split.
    return path.replace("\\", "/").rsplit("/", 1)[-1]


def _add(items: list[str], item: str) -> None:
    if item not in items:
        items.append(item)


def missing_config_files(log: Path) -> list[str]:
    try:
        text = Path(log).read_text(errors="replace")
    except OSError as exc:
        raise UsageError(f"--from-vllm-log {log}: cannot read it ({exc.strerror}); pass the vLLM server log file") \
            from None
    missing = read_log(text).missing
    if not missing and not LOGGER.search(ANSI.sub("", text)):
        raise UsageError(f"--from-vllm-log {log}: not a vLLM server log (no line of vLLM's logger, such as "
                         "'INFO 12-04 10:00:00 [...]'); pass the log the server wrote")
    if not missing:
        raise UsageError(f"--from-vllm-log {log}: vLLM reported no missing MoE config; nothing to tune")
    return missing


@dataclass(frozen=True)
class ConfigProof:
    """Whether a server log shows vLLM used (or, for a baseline, did not use) the tuned files."""

    ok: bool
    expected: tuple[str, ...]  # file names the layout needs
    loaded: tuple[str, ...]  # paths vLLM loaded
    missing: tuple[str, ...]  # file names vLLM fell back to its default for
    backends: tuple[str, ...]
    problems: tuple[str, ...]  # one line each: what is wrong and what to do

    def as_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}


def prove_tuned(facts: MoeLogFacts, expected: list[str], folder: Path, log: Path,
                tune: str = "tune-moe --gpu <GPU> --dtype <dtype>") -> ConfigProof:
    """Every expected file was loaded from ``folder``, vLLM used no default config, and no layer ran the
    batched Triton kernel (whose reading of the file proves nothing about the tuned configs)."""
    problems = []
    if BATCHED in facts.backend_names:
        read = ", ".join(file_name_of(p) for p in facts.loaded)
        problems.append(f"vLLM ran the {BATCHED} MoE backend{' and read ' + read if read else ''}: that backend runs "
                        "the batched kernel, where M means tokens per expert, not the tokens the file's batch keys "
                        "mean, so reading a tuned file does not prove the tuned configs ran as tuned (only TRITON, "
                        "vLLM's TritonExperts, runs them as tuned)")
    if facts.missing:
        problems.append(f"vLLM used its default MoE config for {', '.join(facts.missing)} (not found in {folder}); "
                        f"tune them: {tune} --from-vllm-log {log}")
    for name in expected:
        path = _loaded_path(facts, name)
        if path is None and name not in facts.missing:
            problems.append(_not_reported(facts, name))
        elif path is not None and not _inside(path, folder):
            problems.append(f"vLLM loaded {name} from {path}, not from the tuned folder {folder}; "
                            "check that VLLM_TUNED_CONFIG_FOLDER reaches the server")
    return _proof(facts, expected, problems)


def prove_default(facts: MoeLogFacts, expected: list[str], log: Path) -> ConfigProof:
    """The baseline of an A/B run: vLLM reported its default config for every expected file."""
    problems = []
    for name in expected:
        path = _loaded_path(facts, name)
        if path is not None:
            problems.append(f"the baseline server loaded {path}; unset VLLM_TUNED_CONFIG_FOLDER in the env file "
                            "and shell, and make sure vLLM ships no config of that name")
        elif name not in facts.missing:
            problems.append(_not_reported(facts, name) + f" (log: {log})")
    return _proof(facts, expected, problems)


def _proof(facts: MoeLogFacts, expected: list[str], problems: list[str]) -> ConfigProof:
    return ConfigProof(not problems, tuple(expected), tuple(facts.loaded), tuple(facts.missing),
                       tuple(facts.backends), tuple(problems))


def _loaded_path(facts: MoeLogFacts, name: str) -> str | None:
    return next((p for p in facts.loaded if file_name_of(p) == name), None)


def _inside(path: str, folder: Path) -> bool:
    return Path(path).resolve().parent == Path(folder).resolve()


def _not_reported(facts: MoeLogFacts, name: str) -> str:
    if facts.backends and not any(n in READERS for n in facts.backend_names):
        return (f"vLLM ran only the {', '.join(facts.backends)} MoE backend, which reads no Triton tuned file, so "
                f"{name} was never looked up")
    return (f"vLLM never reported a config for {name} (no 'Using configuration from' line); "
            "keep VLLM_LOGGING_LEVEL at INFO or DEBUG and check the layout and dtype match the served model")


# -- the log against preflight's per-layer-kind prediction ---------------------------------------------


@dataclass(frozen=True)
class Predicted:
    """What preflight says one MoE layer kind runs: vLLM's backend value (as the log spells it) and the tuned
    file it reads as tuned (None when it reads none)."""

    kind: str  # "SiLU layers" or "SwiGLU-step layers"
    backend: str
    file: str | None = None
    down_file: str | None = None  # the `_down.json` vLLM 0.34 also looks up beside ``file`` (logged only when found)


def agreement(facts: MoeLogFacts, predicted: list[Predicted]) -> tuple[str, ...]:
    """Problems where the log disagrees with ``predicted``: the set of backends vLLM logged (once per distinct
    backend) must be the set predicted, and every file vLLM looked up (loaded, or defaulted) must be one a layer
    kind was predicted to read (its tuned file, or the `_down.json` beside it). (A predicted file vLLM never looked
    up is ``prove_tuned``'s problem.)"""
    out = []
    said = "; ".join(f"{p.kind}: {p.backend}" for p in predicted)
    logged = list(dict.fromkeys(facts.backend_names))
    if set(logged) != {p.backend for p in predicted}:
        out.append(f"vLLM's log disagrees with preflight on the MoE backend: vLLM logged "
                   f"{', '.join(logged) or 'no backend line'}; preflight predicted {said}")
    looked = list(dict.fromkeys([file_name_of(p) for p in facts.loaded] + facts.missing))
    files = {f for p in predicted for f in (p.file, p.down_file) if f}
    batched = any(p.backend == BATCHED for p in predicted)  # reads a file preflight does not count as tuned
    extra = [] if batched else [n for n in looked if n not in files]
    if extra:
        wanted = "; ".join(f"{p.kind}: {p.file or 'no tuned file'}" for p in predicted)
        out.append(f"vLLM's log disagrees with preflight on the tuned files: vLLM looked up {', '.join(extra)}, "
                   f"which preflight did not predict (preflight predicted {wanted})")
    return tuple(out)
