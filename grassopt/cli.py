"""The ``grassopt`` command line: one subcommand per job, each implemented in its own module.

Subcommands are imported only when used, so ``grassopt --help`` stays fast and a missing
optional dependency only affects the subcommand that needs it.
"""

from __future__ import annotations

import importlib
import sys

#: subcommand -> ("module:function", one-line help). The function takes argv (a list of str).
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("grassopt.train.cli:main", "train a LLaMA-style model on real text with any preset"),
    "bench": ("grassopt.bench.cli:main", "run several presets side by side and write a report"),
    "memory": ("grassopt.train.memory_cli:main", "memory needed by a model config for a preset (weights, grads, states)"),
    "analyze": ("grassopt.analysis.cli:main", "record gradient-subspace diagnostics over a training run"),
    "ackley": ("grassopt.analysis.ackley:main", "the 2-D Ackley demo: tracking vs SVD subspaces"),
    "finetune": ("grassopt.finetune.cli:main", "fine-tune a pretrained encoder on a labelled text task"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: grassopt <command> [options]   (grassopt <command> --help for its options)", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from . import __version__
        print(f"grassopt {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"grassopt: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    target, _ = COMMANDS[name]
    mod_name, func_name = target.split(":")
    try:
        mod = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if e.name and (e.name == mod_name or mod_name.startswith(e.name + ".")):
            print(f"grassopt {name}: this command is not available in this version", file=sys.stderr)
            return 2
        raise
    result = getattr(mod, func_name)(rest)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
