"""``tune-moe``: argument parsing and dispatch only.

``tune-moe --gpu H200 --dtype fp8 [...]`` runs the main job; the other commands are
``tune-moe <command> --help``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

from .errors import UsageError, missing_dependency

# command -> (module with add_arguments(parser) and run(args) -> int, one-line help)
COMMANDS = {
    "verify": ("tuning.verify", "load tuned files through vLLM's loader and re-time them against vLLM's default"),
    "report": ("tuning.report", "tables and plots of tuned vs default from the provenance sidecars"),
    "bake": ("tuning.bake", "install a device's tuned configs into a folder or image layer"),
    "check-deepgemm": ("tuning.deepgemm.check", "verify DeepGEMM on this GPU: environment, correctness, speed"),
    "compare-backends": ("tuning.bakeoff.compare", "time each FP8 MoE backend vLLM can run, per layout and batch size"),
    "validate-serve": ("tuning.serve.validate", "serve with the tuned configs, prove vLLM loaded them, benchmark"),
    "preflight": ("tuning.serve.preflight", "check a vllm serve command before it starts: backend per MoE layer kind, "
                  "tuned files, batch sizes, drift"),
}


def tune_parser() -> argparse.ArgumentParser:
    from . import tune

    epilog = "other commands:\n" + "\n".join(f"  tune-moe {c:<17} {h}" for c, (_, h) in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="tune-moe",
        description="Tune vLLM's fused-MoE Triton kernel for every Step-3.5-Flash shape vLLM will run "
                    "on this GPU, dtype and layout, and write the JSON files vLLM loads.",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    tune.add_arguments(parser)
    return parser


# The options that name a file, a folder or an address: given empty (``--out "$UNSET"``), each is refused, not read
# as "not given", which would write into or read from the default place.
PATH_OPTIONS = {"out", "model", "configs", "vllm_src", "from_vllm_log", "against", "keep_confirmed", "readme",
                "target", "deep_gemm_path", "json_out", "jit_cache_dir", "vllm_ops", "write_advice", "from_json",
                "env_file", "log", "config_dir", "json", "ray_address", "files"}


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors exit 2 with one line, and an option of ``PATH_OPTIONS`` given empty is one."""

    def error(self, message: str) -> None:  # noqa: D401
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)

    def parse_args(self, args=None, namespace=None):
        parsed = super().parse_args(args, namespace)
        for action in self._actions:
            value = getattr(parsed, action.dest, None)
            if action.dest in PATH_OPTIONS and action.option_strings and \
                    (value == "" or isinstance(value, list) and "" in value):
                flag = action.option_strings[0]
                self.error(f"{flag} is empty (an unset variable?); give it a value, or drop {flag} for its default")
        return parsed


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--interpret" in argv:
        os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported: it reads this once
    try:
        if argv and argv[0] in COMMANDS:
            module_name, help_text = COMMANDS[argv[0]]
            module = importlib.import_module(module_name)
            parser = _Parser(prog=f"tune-moe {argv[0]}", description=help_text)
            module.add_arguments(parser)
            args = parser.parse_args(argv[1:])
            return module.run(args)
        from . import tune

        parser = tune_parser()
        parser.__class__ = _Parser
        args = parser.parse_args(argv)
        return tune.run(args)
    except UsageError as exc:
        sys.stderr.write(f"tune-moe: error: {exc}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("tune-moe: interrupted; finished jobs are saved, re-run the same command to resume\n")
        return 130
    except BrokenPipeError:  # whoever read the output went away (`| head`): nothing is left to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush does not fail again
        return 141
    except Exception as exc:  # a bug, not bad input: one line, and the traceback only when asked for
        if missing := missing_dependency(exc):
            sys.stderr.write(f"tune-moe: error: {missing}\n")
            return missing.exit_code
        if isinstance(exc, OSError) and exc.filename and exc.strerror:  # the filesystem said no: full, read-only
            sys.stderr.write(f"tune-moe: error: {exc.filename}: {exc.strerror}; free or fix that place (space, "
                             "permissions, a read-only or special filesystem), or pass another path, and re-run\n")
            return 1
        if os.environ.get("TUNE_MOE_TRACEBACK") == "1":
            raise
        where = exc.__traceback__
        while where is not None and where.tb_next is not None:
            where = where.tb_next
        at = f" at {Path(where.tb_frame.f_code.co_filename).name}:{where.tb_lineno}" if where else ""
        sys.stderr.write(f"tune-moe: internal error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                         f"{at}; re-run with TUNE_MOE_TRACEBACK=1 and report it\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
