"""One command-line grammar for every experiment, generated from its config dataclass.

Each config field becomes ``--field-name`` (underscores as dashes) with its type, its default shown in
``--help``, and what :func:`opt` attached to it (help text, choices, hidden old spellings). Every
experiment command also gets the run options ``--out``, ``--resume``, ``--overwrite``, ``--config FILE``
(a run's own ``config.json`` relaunches it) and ``--print-config``.

Options the user did not type stay unset (``argparse.SUPPRESS``), so a resumed run can tell a changed
option from a default: :func:`resolve_config` layers defaults < ``--config`` file < typed options, or,
on ``--resume``, the checkpoint's config < typed options, refusing typed changes to fields the
experiment does not list as resumable.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "UsageError",
    "add_config_options",
    "check_choice",
    "check_nonneg_float",
    "check_positive_float",
    "check_positive_int",
    "config_dict",
    "opt",
    "resolve_config",
]

#: Keys of a run's ``config.json`` that are records, not options (ignored by ``--config``).
RECORD_KEYS = ("experiment", "world_size", "params", "n_train", "steps_per_epoch")


class UsageError(ValueError):
    """A user mistake found before anything is written: the command prints ``error: ...`` and exits 2."""


def opt(
    default: Any,
    help: str = "",
    *,
    choices: Sequence[Any] | None = None,
    aliases: Sequence[str] = (),
    metavar: str | None = None,
) -> Any:
    """A config field with its command-line help (``aliases``: old spellings, accepted but not shown)."""
    meta = {"help": help, "choices": choices, "aliases": tuple(aliases), "metavar": metavar}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# ---------------------------------------------------------------------------------------------- checks


def _bad(name: str, value: Any, expected: str) -> UsageError:
    return UsageError(f"{name.replace('_', '-')} must be {expected}, got {value!r}")


def check_positive_int(cfg: Any, *names: str, allow_none: bool = False) -> None:
    for name in names:
        v = getattr(cfg, name)
        if v is None and allow_none:
            continue
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise _bad(name, v, "a positive integer")


def check_nonneg_int(cfg: Any, *names: str, allow_none: bool = False) -> None:
    for name in names:
        v = getattr(cfg, name)
        if v is None and allow_none:
            continue
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise _bad(name, v, "a non-negative integer")


def check_positive_float(cfg: Any, *names: str, allow_none: bool = False) -> None:
    for name in names:
        v = getattr(cfg, name)
        if v is None and allow_none:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise _bad(name, v, "a positive finite number")


def check_nonneg_float(cfg: Any, *names: str) -> None:
    for name in names:
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise _bad(name, v, "a finite number >= 0")


def check_choice(cfg: Any, name: str, choices: Iterable[Any]) -> None:
    choices = tuple(choices)
    if getattr(cfg, name) not in choices:
        raise UsageError(
            f"{name.replace('_', '-')}={getattr(cfg, name)!r} is unknown; expected one of {choices}"
        )


# ---------------------------------------------------------------------------------------------- parser


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(annotation: Any, default: Any) -> tuple[type, bool]:
    """``(type, optional)`` of a field from its (string) annotation."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    optional = "None" in text
    for name, typ in (("bool", bool), ("int", int), ("float", float), ("str", str)):
        if text.replace(" | None", "").replace("None | ", "").strip() == name:
            return typ, optional
    return (type(default) if default is not None else str), optional


def _converter(typ: type, optional: bool, name: str) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        if optional and text.lower() in ("none", ""):
            return None
        try:
            return typ(text)
        except ValueError:
            what = {int: "an integer", float: "a number"}.get(typ, typ.__name__)
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None

    convert.__name__ = typ.__name__  # argparse names the type in its messages
    return convert


def _show(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def add_config_options(parser: argparse.ArgumentParser, cls: type, *, hidden: Iterable[str] = ()) -> None:
    """One ``--option`` per field of the dataclass ``cls`` (``hidden``: fields not offered)."""
    hidden = set(hidden)
    for f in dataclasses.fields(cls):
        if f.name in hidden:
            continue
        meta = f.metadata
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        typ, optional = _base_type(f.type, default)
        helptext = (meta.get("help") or "").replace("%", "%%")
        helptext = f"{helptext} (default: {_show(default)})" if helptext else f"default: {_show(default)}"
        flags = [_flag(f.name)]
        aliases = [a for a in meta.get("aliases", ()) if a]
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS}
        if typ is bool:
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, help=helptext, **kw)
            for a in (a for a in aliases if a != "--no-" + flags[0][2:]):  # an old "--no-x" switches it off
                action = "store_false" if a.startswith("--no-") else "store_true"
                parser.add_argument(a, action=action, help=argparse.SUPPRESS, **kw)
            continue
        kw["type"] = _converter(typ, optional, f.name)
        if meta.get("choices"):
            kw["choices"] = list(meta["choices"])
            kw["metavar"] = meta.get("metavar") or "{" + ",".join(map(str, meta["choices"])) + "}"
        else:
            kw["metavar"] = meta.get("metavar") or f.name.upper()
        parser.add_argument(*flags, help=helptext, **kw)
        for a in aliases:
            parser.add_argument(a, help=argparse.SUPPRESS, **kw)


def add_run_options(parser: argparse.ArgumentParser, default_out: str) -> None:
    """``--out``, ``--resume``, ``--overwrite``, ``--config``, ``--print-config``."""
    g = parser.add_argument_group("run folder")
    g.add_argument("--out", default=None, metavar="DIR", help=f"run folder (default: {default_out})")
    g.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="DIR",
        help="continue the run in --out from its checkpoint (--resume DIR: the run in DIR); only the "
        "options listed under 'resumable' may change",
    )
    g.add_argument(
        "--overwrite", action="store_true", help="replace the run already in --out (its files are deleted)"
    )
    g.add_argument(
        "--config", metavar="FILE", default=None, help="take options from a JSON file (a run's config.json)"
    )
    g.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    g.add_argument(
        "--tensorboard",
        action="store_true",
        help="also write TensorBoard scalars (loss, metrics, NFE) into DIR/tensorboard (needs tensorboard)",
    )


def typed_options(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The config fields the user typed on the command line."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}


def read_config_file(path: str | Path, cls: type, experiment: str) -> dict[str, Any]:
    """Fields of ``cls`` from a JSON file; unknown keys and another experiment's file are errors."""
    path = Path(path)
    try:
        saved = json.loads(path.read_text())
    except OSError as exc:
        raise UsageError(f"--config {str(path)!r}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise UsageError(f"--config {str(path)!r} is not valid JSON: {exc}") from None
    if not isinstance(saved, dict):
        raise UsageError(f"--config {str(path)!r} must hold a JSON object")
    if saved.get("experiment", experiment) != experiment:
        raise UsageError(f"--config {str(path)!r} is a {saved['experiment']!r} config, not {experiment!r}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(saved) - known - set(RECORD_KEYS))
    if unknown:
        raise UsageError(
            f"--config {str(path)!r} has unknown fields {unknown}; expected fields of {cls.__name__}"
        )
    return {k: v for k, v in saved.items() if k in known}


def config_dict(cfg: Any) -> dict[str, Any]:
    """``dataclasses.asdict`` as plain JSON values (what a checkpoint and ``config.json`` hold)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def resolve_config(
    cls: type,
    typed: dict[str, Any],
    *,
    file_values: dict[str, Any] | None = None,
    saved: dict[str, Any] | None = None,
    resumable: Callable[[dict[str, Any]], Iterable[str]] | Iterable[str] = (),
) -> Any:
    """Build the config: defaults < file < typed, or (``saved``: a resumed run's config) saved < typed.

    On resume, a typed option that differs from the saved value and is not resumable is a
    :class:`UsageError` naming the option and the fields that may change.
    """
    if saved is None:
        values = {**(file_values or {}), **typed}
    else:
        allowed = set(resumable(saved) if callable(resumable) else resumable)
        known = {f.name for f in dataclasses.fields(cls)}
        for name, value in typed.items():
            if name not in allowed and name in saved and json.loads(json.dumps(value)) != saved[name]:
                may = ", ".join(_flag(f) for f in sorted(allowed)) or "none"
                raise UsageError(
                    f"{_flag(name)} {_show(value)} differs from the resumed run's {name}={saved[name]!r}; "
                    f"a resumed run keeps its config (options that may change on resume: {may}). "
                    "Start a new run with another --out, or --overwrite this one"
                )
        values = {**{k: v for k, v in saved.items() if k in known}, **typed}
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:  # the dataclass validates itself
        raise UsageError(str(exc)) from None
