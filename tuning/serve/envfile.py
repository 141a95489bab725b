"""The node env file install/node-check.sh writes, read without running a shell."""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import UsageError

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
    """The value of ``NAME=text`` as sh assigns it: quotes removed ('...' literal; "..." with ``$NAME`` expanded and
    \\ escaping only $ ` " \\), ``$NAME`` and ``${NAME}`` expanded outside single quotes and never split or re-read
    (an assignment is one word), a backslash escaping the next character outside quotes; after the value only a
    comment may follow a blank."""
    out, i, quote = [], 0, None
    while i < len(text):
        c = text[i]
        if quote == "'":
            if c == "'":
                quote = None
            else:
                out.append(c)
            i += 1
            continue
        if c == "`" or text.startswith("$(", i):
            raise UsageError(f"{where}: command substitution is not supported; write the value itself")
        if c == "$" and (m := _REF.match(text, i)):
            out.append(known.get(m.group(1) or m.group(2), ""))
            i = m.end()
            continue
        if quote == '"':
            if c == '"':
                quote = None
            elif c == "\\" and i + 1 < len(text) and text[i + 1] in '$`"\\':
                out.append(text[i + 1])
                i += 1
            else:
                out.append(c)
            i += 1
            continue
        if c in "'\"":
            quote = c
        elif c == "\\":
            if i + 1 < len(text):
                out.append(text[i + 1])
                i += 1
        elif c.isspace():
            rest = text[i:].lstrip()
            if rest and not rest.startswith("#"):
                raise UsageError(f"{where}: the value has unquoted spaces; quote it")
            break
        else:
            out.append(c)
        i += 1
    if quote:
        raise UsageError(f"{where}: No closing quotation; quote the value as sh would")
    return "".join(out)


def env_file(arg: str | None) -> Path | None:
    if arg:
        if not Path(arg).is_file():
            raise UsageError(f"--env-file {arg}: no such file; run install/node-check.sh or drop --env-file")
        return Path(arg)
    return Path(ENV_FILE) if Path(ENV_FILE).is_file() else None
