"""The CLI convention shared by every job (architecture.md): a few named flags, ``--config FILE.yaml``,
``--set dotted.key=value`` (repeatable), ``--dry-run``; unknown keys and wrong types fail before any work starts."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import typing
from typing import Any, TypeVar

from models.config_io import ConfigError, apply_overrides, from_dict, load_yaml, merge, to_dict

T = TypeVar("T")


def config_field_help(cls: type, prefix: str = "") -> list[str]:
    """One line per leaf field of a dataclass tree: ``dotted.key (type) = default``."""
    lines = []
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        tp = hints[field.name]
        key = f"{prefix}{field.name}"
        if dataclasses.is_dataclass(tp):
            lines.extend(config_field_help(tp, key + "."))
            continue
        if field.default is not dataclasses.MISSING:
            default = field.default
        elif field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = field.default_factory()  # type: ignore[misc]
        else:
            default = "required"
        type_name = getattr(tp, "__name__", str(tp).replace("typing.", ""))
        lines.append(f"  {key} ({type_name}) = {default!r}")
    return lines


def make_parser(prog: str, description: str, config_cls: type | None = None) -> argparse.ArgumentParser:
    epilog = None
    if config_cls is not None:
        epilog = "config fields (set with --set key=value or in --config FILE):\n" + "\n".join(
            config_field_help(config_cls)
        )
    parser = argparse.ArgumentParser(
        prog=prog, description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    if config_cls is not None:
        parser.add_argument("--config", metavar="FILE", help="YAML config file (local path or URL)")
        parser.add_argument(
            "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
            help="override one config field, e.g. --set train.lr=2e-4 (repeatable)",
        )
        parser.add_argument("--dry-run", action="store_true", help="build and validate everything, run nothing")
    parser.add_argument("--log-level", default=os.environ.get("LOG_LEVEL", "INFO"), help="logging level")
    return parser


def resolve_config(cls: type[T], args: argparse.Namespace, flags: dict[str, Any] | None = None,
                   base: T | None = None) -> T:
    """defaults (or ``base``) ← ``--config`` file ← named flags (dotted keys, None = not given) ← ``--set``."""
    data = to_dict(base) if base is not None else {}
    if getattr(args, "config", None):
        data = merge(data, load_yaml(args.config))
    for key, value in (flags or {}).items():
        if value is not None:
            apply_overrides_value(data, key, value)
    apply_overrides(data, getattr(args, "overrides", None))
    return from_dict(cls, data)


def apply_overrides_value(data: dict[str, Any], dotted: str, value: Any) -> None:
    node = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, str(level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def run_main(main: typing.Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Run a job's ``main`` and turn config errors into a one-line message and exit code 2 (no traceback)."""
    try:
        code = main(argv)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code or 0)
