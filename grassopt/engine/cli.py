"""The command lines of the training applications, built from their config classes.

Every flag of ``grassopt train`` / ``finetune`` / ``bench`` is a field of the run's config dataclass
(:func:`grassopt.engine.config.setting`): :func:`add_config_arguments` adds one flag per field (its
name, help, choices, default and parsing read from the field), :func:`config_from_args` reads the
parsed flags back into the config, and :func:`run_command` is the one error handler every command
uses (a user error is one line on stderr and exit code 2, no traceback).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import sys
from collections.abc import Callable, Iterable
from typing import Any

from ..targets import parse_rank, parse_rank_or_fraction
from .checkpoint import CheckpointError
from .config import flag

__all__ = ["key_value", "rank_spec", "rank_or_fraction", "float_pair", "os_error", "add_config_arguments",
           "config_from_args", "config_flags", "run_command", "USER_ERRORS"]

#: Where :func:`add_config_arguments` notes (in the parsed namespace) which config fields it added flags for.
_FIELDS = "_config_fields"


def os_error(e: OSError) -> str:
    """One line for an ``OSError`` a run met while writing or reading (a full disk, a file-size limit, a
    folder removed under it): what happened and the file."""
    what = e.strerror or str(e) or type(e).__name__
    where = f" ({e.filename})" if e.filename else ""
    return (f"{what}{where}; the last checkpoint on disk (if any) is intact: fix that, then run again (--resume "
            "continues from it)")


# ---------------------------------------------------------------------------------------- flag values
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


def _usage_error(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """``parse`` with its ``ValueError`` turned into argparse's one-line usage error (its own message)."""
    @functools.wraps(parse)
    def wrapped(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return wrapped


#: ``--rank``: an integer, or a fraction of each matrix's short side such as ``d/4`` (:func:`grassopt.targets.parse_rank`).
rank_spec = _usage_error(parse_rank)
#: ``--sketch-rank``: a fraction in (0, 1) or an integer (:func:`grassopt.targets.parse_rank_or_fraction`).
rank_or_fraction = _usage_error(parse_rank_or_fraction)


def float_pair(values: list[str]) -> tuple[float, float]:
    """``--betas 0.9,0.95`` or ``--betas 0.9 0.95``: two numbers."""
    parts = [p for v in values for p in v.replace(",", " ").split()]
    try:
        pair = tuple(float(p) for p in parts)
    except ValueError:
        pair = ()
    if len(pair) != 2:
        raise ValueError(f"expected two numbers (e.g. 0.9,0.95), got {' '.join(values)!r}")
    return pair  # type: ignore[return-value]


class _Convert(argparse.Action):
    """Stores ``convert(values)`` (a ``ValueError`` is a usage error naming the flag)."""

    def __init__(self, *args: Any, convert: Callable[[Any], Any], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.convert = convert

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        try:
            setattr(namespace, self.dest, self.convert(values))
        except ValueError as e:
            parser.error(f"argument {option_string}: {e}")


# ---------------------------------------------------------------------------------------- flags from fields
_SCALARS: dict[str, Callable[[str], Any]] = {"int": int, "float": float, "str": str}


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default  # type: ignore[misc]


def _argument(f: dataclasses.Field) -> tuple[list[str], dict[str, Any]]:
    """The flags and ``add_argument`` keywords of the config field ``f`` (see :func:`add_config_arguments`)."""
    meta, default = f.metadata, _default(f)
    if not meta.get("help"):
        raise TypeError(f"config field {f.name!r} has no help: declare it with grassopt.engine.config.setting")
    kind = str(f.type).replace(" | None", "").strip()
    kw: dict[str, Any] = {"dest": f.name, "help": meta["help"]}
    name = meta.get("flag")
    choices = meta.get("choices")
    if callable(choices):
        choices = choices()
    if choices is not None:
        kw["choices"] = list(choices)
    if meta.get("metavar"):
        kw["metavar"] = meta["metavar"]
    if kind == "bool":  # a switch: --name sets True; a default of True is switched off by --no-name
        kw["action"] = "store_false" if default else "store_true"
        kw["default"] = argparse.SUPPRESS if default else False  # (unset: the field's default)
        name = name or (f"--no-{f.name.replace('_', '-')}" if default else None)
    elif kind.startswith("dict"):  # --opt KEY=VALUE, repeatable
        kw.update(action="append", type=key_value, default=[])
    elif kind.startswith("tuple"):  # --betas 0.9,0.95 | --betas 0.9 0.95
        kw.update(action=_Convert, convert=float_pair, nargs="+", default=default)
    elif kind.startswith("list"):
        kw.update(nargs="+", default=default)
    else:
        parse = meta.get("parse")
        if parse is None and kind not in _SCALARS:
            raise TypeError(f"config field {f.name!r} of type {f.type} needs parse= in its setting()")
        kw.update(type=_usage_error(parse) if parse is not None else _SCALARS[kind], default=default)
    return [name or flag(f.name), *meta.get("aliases", ())], kw


def config_flags(cls: type, groups: Iterable[str]) -> list[tuple[str, list[str]]]:
    """``(field, flags)`` of each field of ``cls`` in the help sections ``groups`` (field order)."""
    groups = set(groups)
    return [(f.name, _argument(f)[0]) for f in dataclasses.fields(cls) if f.metadata.get("group", "run") in groups]


def add_config_arguments(ap: argparse.ArgumentParser, cls: type, groups: dict[str, str],
                         skip: Iterable[str] = ()) -> dict[str, argparse._ArgumentGroup]:
    """One flag per field of the config class ``cls`` (but those in ``skip``) whose help section is a key of
    ``groups`` (section -> its title, in the order the sections are shown). A field's flag is ``--<name>``
    (``--no-<name>`` for a bool defaulting to True), or its ``flag``; its help, choices and default are the
    field's; its type follows the field's (``int``, ``float``, ``str``, a ``list`` of several values, a ``dict``
    of repeated ``KEY=VALUE``, a ``tuple`` pair), or its ``parse``. Returns the argument groups by section."""
    made = {key: ap.add_argument_group(title) for key, title in groups.items()}
    skip, added = set(skip), []
    for f in dataclasses.fields(cls):
        group = f.metadata.get("group", "run")
        if f.name in skip or group not in made:
            continue
        names, kw = _argument(f)
        made[group].add_argument(*names, **kw)
        added.append(f.name)
    previous = ap.get_default(_FIELDS) or ()
    ap.set_defaults(**{_FIELDS: (*previous, *added)})
    return made


def config_from_args(cls: type, args: argparse.Namespace, **overrides: Any) -> Any:
    """The config ``cls`` of the parsed flags of :func:`add_config_arguments` (a field without a flag, or a
    switch left unset, keeps its default; a list is copied, ``--opt`` pairs become a dict), with ``overrides``."""
    types = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for name in getattr(args, _FIELDS, ()):
        if not hasattr(args, name):
            continue
        v = getattr(args, name)
        if types[name].startswith("dict"):
            v = dict(v)
        elif isinstance(v, list):
            v = list(v)
        values[name] = v
    return cls(**{**values, **overrides})


# ---------------------------------------------------------------------------------------- errors
def _user_errors() -> tuple[type[BaseException], ...]:
    from ..references import MissingPackageError
    return (CheckpointError, ValueError, FloatingPointError, FileNotFoundError, NotADirectoryError,
            MissingPackageError, ImportError, argparse.ArgumentTypeError)


#: What a command reports as one line (exit code 2) instead of a traceback: a refused setting, a checkpoint
#: that does not fit, a non-finite loss, a missing file or package. Any other ``OSError`` (a full disk, ...)
#: is one line too, naming the file (:func:`os_error`).
USER_ERRORS = _user_errors()


def run_command(prog: str, body: Callable[[], int | None]) -> int:
    """``body()``'s exit code, or 2 with one line ``<prog>: error: ...`` on stderr for a user error (see
    :data:`USER_ERRORS`); the one handler of ``grassopt train``, ``finetune`` and ``bench``."""
    try:
        return int(body() or 0)
    except USER_ERRORS as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
    except OSError as e:  # a full disk or a folder gone while writing metrics: one line naming the file
        print(f"{prog}: error: {os_error(e)}", file=sys.stderr)
    return 2
