"""The one exception user-facing commands raise for bad input, and the missing dependency that is one."""

import sys


class UsageError(Exception):
    """Bad input or an unusable node. The message is one line: the problem, then the fix.

    The CLI prints it as ``tune-moe: error: <message>`` and exits with status 2,
    before anything is written.
    """

    exit_code = 2


# the modules tune-moe imports from its dependencies, each with its requirement in pyproject.toml (a test checks)
DEPENDENCIES = {"torch": "torch>=2.4", "triton": "triton>=3.1", "ray": "ray>=2.40", "tqdm": "tqdm>=4.60",
                "matplotlib": "matplotlib>=3.7", "pynvml": "nvidia-ml-py>=12.535"}


def missing_dependency(exc: BaseException) -> UsageError | None:
    """A dependency this Python cannot import, as bad input: tune-moe run from a Python it was not installed into."""
    module = (getattr(exc, "name", None) or "").partition(".")[0] if isinstance(exc, ImportError) else ""
    if module not in DEPENDENCIES:
        return None
    return UsageError(f"this Python cannot import {module} ({exc}), which tune-moe needs; install it: "
                      f"{sys.executable} -m pip install '{DEPENDENCIES[module]}' (pip install -e . in tune-moe's "
                      "checkout installs all it needs)")
