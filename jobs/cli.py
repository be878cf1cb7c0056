"""The CLI convention shared by every job (docs/architecture.md#the-cli-convention): a few named flags,
``--config FILE.yaml``, ``--set dotted.key=value`` (repeatable), ``--dry-run``; unknown keys and wrong types fail before
any work starts."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import typing
from typing import Any, TypeVar

from models import config_io
from models.config_io import ConfigError, parse_override

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


def default_set_example(cls: type, prefix: str = "") -> str | None:
    """A valid ``dotted.key=value`` for ``cls``: its first leaf field with a plain scalar default, set to that default."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        tp = hints[field.name]
        key = f"{prefix}{field.name}"
        if dataclasses.is_dataclass(tp):
            found = default_set_example(tp, key + ".")
            if found:
                return found
            continue
        default = field.default
        if isinstance(default, bool):
            return f"{key}={str(default).lower()}"
        if isinstance(default, (int, float)):
            return f"{key}={default!r}"
        # a non-empty one-word string that YAML reads back as itself (not 'yes', '1', 'null')
        if (isinstance(default, str) and default.isprintable() and default and " " not in default
                and parse_override(f"{key}={default}")[1] == default):
            return f"{key}={default}"
    return None


def make_parser(prog: str, description: str, config_cls: type | None = None,
                set_example: str | None = None) -> argparse.ArgumentParser:
    """The job's parser: ``--config``, ``--set``, ``--dry-run`` (with ``config_cls``) and ``--log-level``.

    ``set_example`` is the ``dotted.key=value`` the ``--set`` help shows; it must be a real field of ``config_cls`` with
    a valid value (tests/test_cli_examples.py checks every job's). Without it the help shows a field set to its default.
    """
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
        example = set_example or default_set_example(config_cls)
        parser.add_argument(
            "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
            help="override one config field (dotted key, YAML value; numbers may use scientific notation such as "
                 "2e-4)" + (f", e.g. --set {example}" if example else "") + " (repeatable)",
        )
        parser.add_argument("--dry-run", action="store_true", help="build and validate everything, run nothing")
    parser.add_argument("--log-level", default=os.environ.get("LOG_LEVEL", "INFO"), help="logging level")
    return parser


def resolve_config(cls: type[T], args: argparse.Namespace, flags: dict[str, Any] | None = None,
                   base: T | None = None) -> T:
    """The job's config from its parsed arguments (``--config``, ``--set``) and named ``flags``: see
    ``models.config_io.resolve_config`` for the order."""
    return config_io.resolve_config(cls, base, getattr(args, "config", None), flags, getattr(args, "overrides", None))


# Their DEBUG records print signed request headers (the access key id) and raw bodies: --log-level DEBUG is for
# our own code, these stay at WARNING whatever the level.
QUIET_LOGGERS = ("botocore", "aiobotocore", "s3fs", "urllib3", "boto3")


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, str(level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def run_main(main: typing.Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Run a job's ``main`` and turn config errors into a one-line message and exit code 2 (no traceback)."""
    try:
        code = main(argv)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code or 0)
