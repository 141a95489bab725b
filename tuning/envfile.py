"""The node env file install/node-check.sh writes, read without running a shell."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from .errors import UsageError

ENV_FILE = "tune-moe-node.env"  # written by install/node-check.sh

_ASSIGN = re.compile(r"^(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)$")
_REF = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")


def read_env_file(path: Path, base: dict[str, str]) -> tuple[tuple[str, str], ...]:
    """``export NAME=value`` lines, parsed without a shell: quotes as in sh, ``$NAME`` expanded, no commands."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--env-file {path}: cannot read it ({exc}); pass the file install/node-check.sh wrote") \
            from None
    env: dict[str, str] = {}
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _ASSIGN.match(line)
        if not m:
            raise UsageError(f"{path}:{number}: not an 'export NAME=value' line; "
                             "fix it or re-run install/node-check.sh")
        env[m.group(1)] = _env_value(m.group(2), {**base, **env}, f"{path}:{number}")
    return tuple(env.items())


def _env_value(text: str, known: dict[str, str], where: str) -> str:
    if "$(" in text or "`" in text:
        raise UsageError(f"{where}: command substitution is not supported; write the value itself")
    if not text.startswith("'"):
        text = _REF.sub(lambda m: known.get(m.group(1) or m.group(2), ""), text)
    try:
        words = shlex.split(text)
    except ValueError as exc:
        raise UsageError(f"{where}: {exc}; quote the value as sh would") from None
    if text[:1].isspace():  # NAME= followed by a blank: empty, as in sh
        words = [""] + words
    if len(words) > 1 and not words[1].startswith("#"):  # a comment starts a word; 'a#b' is a value
        raise UsageError(f"{where}: the value has unquoted spaces; quote it")
    return words[0] if words else ""


def env_file(arg: str | None) -> Path | None:
    if arg:
        if not Path(arg).is_file():
            raise UsageError(f"--env-file {arg}: no such file; run install/node-check.sh or drop --env-file")
        return Path(arg)
    return Path(ENV_FILE) if Path(ENV_FILE).is_file() else None
