"""What a vLLM server log says about fused-MoE configs and the MoE backend."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UsageError

USING = re.compile(r"Using configuration from (\S+\.json) for MoE layer")
MISSING = re.compile(r"Using default MoE config\. Performance might be sub-optimal! Config file not found at (.+)$")
BACKEND = re.compile(r"Using (\S+) (Fp8|Unquantized) MoE backend")


@dataclass
class MoeLogFacts:
    loaded: list[str] = field(default_factory=list)  # full paths vLLM loaded
    missing: list[str] = field(default_factory=list)  # file names vLLM looked for and did not find
    backends: list[str] = field(default_factory=list)  # e.g. "TRITON (Fp8)"


def read_log(text: str) -> MoeLogFacts:
    facts = MoeLogFacts()
    for line in text.splitlines():
        if m := USING.search(line):
            facts.loaded.append(m.group(1))
        elif m := MISSING.search(line):
            name = Path(_first_path(m.group(1))).name
            if name not in facts.missing:
                facts.missing.append(name)
        elif m := BACKEND.search(line):
            entry = f"{m.group(1)} ({m.group(2)})"
            if entry not in facts.backends:
                facts.backends.append(entry)
    return facts


def _first_path(paths: str) -> str:
    # vLLM joins the paths it tried with ", "; file names themselves contain commas but no spaces.
    return paths.split(", ")[0].strip()


def missing_config_files(log: Path) -> list[str]:
    try:
        text = Path(log).read_text(errors="replace")
    except OSError as exc:
        raise UsageError(f"--from-vllm-log {log}: cannot read it ({exc.strerror}); pass the vLLM server log file") from None
    missing = read_log(text).missing
    if not missing:
        raise UsageError(f"--from-vllm-log {log}: vLLM reported no missing MoE config; nothing to tune")
    return missing
