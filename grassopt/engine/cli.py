"""Argument types shared by the command lines of the training applications."""

from __future__ import annotations

import argparse
import ast

from ..targets import resolve_rank

__all__ = ["key_value", "rank_spec", "add_output_arguments", "output_settings", "os_error"]


def os_error(e: OSError) -> str:
    """One line for an ``OSError`` a run met while writing or reading (a full disk, a file-size limit, a
    folder removed under it): what happened and the file."""
    what = e.strerror or str(e) or type(e).__name__
    where = f" ({e.filename})" if e.filename else ""
    return (f"{what}{where}; the last checkpoint on disk (if any) is intact: fix that, then run again (--resume "
            "continues from it)")


def key_value(text: str) -> tuple[str, object]:
    """``--opt KEY=VALUE``: the key (``-`` read as ``_``) and the value as a Python literal (``inf`` and
    ``nan`` as floats), else the string."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    key, value = text.split("=", 1)
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        parsed = value
        if value.strip().lower() in ("inf", "+inf", "-inf", "nan", "infinity", "-infinity"):
            parsed = float(value)  # what the user wrote, a float (refused by the option's own check)
    return key.strip().replace("-", "_"), parsed


def rank_spec(text: str) -> int | str:
    """``--rank``: an integer, or a fraction of each matrix's short side such as ``d/4``."""
    value: int | str = int(text) if text.strip().lstrip("-").isdigit() else text
    try:
        resolve_rank(value, (1 << 62, 1 << 62))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def add_output_arguments(ap: argparse.ArgumentParser, default_out: str, plot_file: str) -> argparse._ArgumentGroup:
    """The "checkpoints and output" options of a training command (``--out``, ``--resume``,
    ``--overwrite``, ``--checkpoint-every``, ``--stop-after``, ``--no-plot``); returns the group."""
    g = ap.add_argument_group("checkpoints and output")
    g.add_argument("--out", default=default_out, help="output folder")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    g.add_argument("--overwrite", action="store_true",
                   help="start afresh even though --out holds another run's checkpoint (the old run is moved to "
                        "--out/previous-<time>/ when the new one starts); without it, such a folder is refused")
    g.add_argument("--checkpoint-every", type=int, default=0, help="also checkpoint every N steps (0: only at the end)")
    g.add_argument("--stop-after", type=int, default=None, help="stop (with a checkpoint) after N steps of this invocation")
    g.add_argument("--no-plot", action="store_true", help=f"do not write {plot_file}")
    return g


def output_settings(args: argparse.Namespace) -> dict[str, object]:
    """The config fields of :func:`add_output_arguments`'s options."""
    return {"out": args.out, "resume": args.resume, "overwrite": args.overwrite, "checkpoint_every": args.checkpoint_every,
            "stop_after": args.stop_after, "plot": not args.no_plot}
