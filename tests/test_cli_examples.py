"""Every ``--set KEY=VALUE`` example we show users names a real config key with a valid value.

Two sources: the ``--help`` of every job (``jobs/*.py`` with a ``main``), and the commands in README.md and docs/*.md.
Each example goes through the job's own code path: its ``main`` parses the command with its parser and resolves the
config with ``jobs.cli.resolve_config`` (defaults ← named flags ← ``--set``, the same ``base`` the job uses); the test
stops the job right there, before any work (no Ray, no files), i.e. where ``--dry-run`` would start validating inputs.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
import shlex
import types
import typing
from pathlib import Path

import pytest

from jobs import cli
from models.config_io import ConfigError

ROOT = Path(__file__).resolve().parents[1]
JOBS = sorted(p.stem for p in (ROOT / "jobs").glob("*.py") if re.search(r"^def main\(", p.read_text(), re.MULTILINE))
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# Synopses name the flag, not a field: `--set key=value`, `[--set KEY=VALUE]`, `--set dotted.key=value`.
PLACEHOLDER = re.compile(r"(dotted\.)?key=value", re.IGNORECASE)
# A value left for the reader (`--set steps=…`): the key must still exist.
ELLIPSIS_VALUES = {"…", "...", "N", "<value>"}
JOB_IN_COMMAND = re.compile(r"python -m jobs\.(\w+)")
# Named flags without which a job's config is incomplete (its __post_init__ says so): given with every example.
REQUIRED_FLAGS = {"serve": ["--model", "MODEL_FOLDER"], "train_vae": ["--data", "DIR", "--output", "DIR"]}


# ------------------------------------------------------------------------------------------------------------ running


class _Resolved(Exception):  # not a ValueError: jobs.generate turns those into ConfigError
    def __init__(self, config):
        super().__init__("config resolved")
        self.config = config


def resolve_like_the_job(job: str, overrides: list[str], monkeypatch) -> typing.Any:
    """Run ``jobs.JOB.main([REQUIRED_FLAGS…, "--set", KV, …])`` up to the config it resolves, and return it."""
    module = importlib.import_module(f"jobs.{job}")
    if not hasattr(module, "resolve_config"):
        pytest.fail(f"jobs.{job} has no config: it takes no --set ({overrides})")

    def stop_after_resolving(cls, args, flags=None, base=None):
        raise _Resolved(cli.resolve_config(cls, args, flags, base=base))

    with monkeypatch.context() as patch:
        patch.setattr(module, "resolve_config", stop_after_resolving)
        patch.setenv("WANDB_MODE", os.environ.get("WANDB_MODE", "offline"))  # jobs.demo setdefaults it
        try:
            module.main([*REQUIRED_FLAGS.get(job, []), *(arg for item in overrides for arg in ("--set", item))])
        except _Resolved as done:
            return done.config
        except ConfigError as exc:
            pytest.fail(f"jobs.{job} rejects {overrides}: config error: {exc}")
        except SystemExit as exc:
            pytest.fail(f"jobs.{job}'s parser rejects {overrides} (exit {exc.code})")
    pytest.fail(f"jobs.{job}.main returned before resolving its config")


def check_key(cls: type, dotted: str) -> None:
    """``dotted`` is a field of the dataclass tree ``cls`` (anything below a mapping field is a key of that mapping)."""
    tp: typing.Any = cls
    for depth, part in enumerate(dotted.split(".")):
        if typing.get_origin(tp) in (typing.Union, types.UnionType):  # `Section | None`
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        if typing.get_origin(tp) is dict or tp is dict:
            return
        assert dataclasses.is_dataclass(tp), f"{'.'.join(dotted.split('.')[:depth])} is not a section of {cls.__name__}"
        names = {f.name for f in dataclasses.fields(tp) if f.init}
        assert part in names, f"{dotted}: no field {part!r} in {tp.__name__} (known: {', '.join(sorted(names))})"
        tp = typing.get_type_hints(tp)[part]


def validate(job: str, items: list[str], monkeypatch) -> None:
    """Resolve the command's ``--set`` items the way the job does; placeholder values only need a real key."""
    concrete = [item for item in items if item.split("=", 1)[1] not in ELLIPSIS_VALUES]
    config = resolve_like_the_job(job, concrete, monkeypatch)
    for item in items:
        if item not in concrete:
            check_key(type(config), item.split("=", 1)[0])


# --------------------------------------------------------------------------------------------------------- extracting


def set_items(tokens: list[str]) -> list[str]:
    """The ``KEY=VALUE`` of every ``--set KEY=VALUE`` / ``--set=KEY=VALUE`` in a token list, placeholders left out."""
    found = []
    for i, token in enumerate(tokens):
        if token == "--set" and i + 1 < len(tokens):
            item = tokens[i + 1]
        elif token.startswith("--set="):
            item = token[len("--set="):]
        else:
            continue
        item = item.strip("`'\"").rstrip(".,;:)")
        if "=" in item and not PLACEHOLDER.fullmatch(item):
            found.append(item)
    return found


def split_words(text: str) -> list[str]:
    try:
        return shlex.split(text, comments=True)
    except ValueError:
        return text.split()


def help_examples(text: str) -> list[str]:
    """``--set KEY=VALUE`` examples in a help text (argparse may wrap between ``--set`` and its value)."""
    return set_items([token.strip("`") for token in text.split()])


def doc_commands(path: Path, root: Path = ROOT) -> list[tuple[str, str, list[str]]]:
    """(where, job, --set items) of every command in a markdown file that passes ``--set``.

    Commands are ``python -m jobs.X …`` in fenced blocks (backslash continuations joined) and in inline code spans. An
    inline span with ``--set`` but no command belongs to the job of its paragraph's first ``python -m jobs.X``, else to
    the first ``jobs.X`` of the document's title; with neither the example is ambiguous and the test fails.
    """
    text = path.read_text()
    name = path.relative_to(root).as_posix()
    title = next((line for line in text.splitlines() if line.startswith("# ")), "")
    title_job = re.search(r"jobs\.(\w+)", title)
    commands = []

    def add(where: str, span: str, default_job: str | None) -> None:
        starts = list(JOB_IN_COMMAND.finditer(span))
        if not starts:
            items = set_items(split_words(span))
            if items:
                assert default_job, f"{where}: `{span}` passes --set but names no job (python -m jobs.X)"
                commands.append((where, default_job, items))
            return
        for k, match in enumerate(starts):
            end = starts[k + 1].start() if k + 1 < len(starts) else len(span)
            items = set_items(split_words(span[match.end():end]))
            if items:
                commands.append((where, match.group(1), items))

    def line_of(offset: int) -> int:
        return text.count("\n", 0, offset) + 1

    prose = text
    for block in re.finditer(r"^```[^\n]*\n(.*?)^```", text, re.MULTILINE | re.DOTALL):
        body, first = block.group(1), line_of(block.start(1))
        command, start = "", first
        for offset, line in enumerate(body.split("\n")):
            if not command:
                start = first + offset
            if line.endswith("\\"):
                command += line[:-1] + " "
                continue
            add(f"{name}:{start}", command + line, None)
            command = ""
        prose = prose[:block.start()] + re.sub(r"[^\n]", " ", block.group(0)) + prose[block.end():]
    for paragraph in re.finditer(r"(?:[^\n]+\n?)+", prose):
        para_job = JOB_IN_COMMAND.search(paragraph.group(0))
        default = para_job.group(1) if para_job else title_job.group(1) if title_job else None
        for span in re.finditer(r"`([^`]+)`", paragraph.group(0)):
            add(f"{name}:{line_of(paragraph.start() + span.start())}", span.group(1).replace("\n", " "), default)
    return commands


DOC_COMMANDS = [command for path in DOCS for command in doc_commands(path)]


# -------------------------------------------------------------------------------------------------------------- tests


def run_help(job: str, monkeypatch, capsys) -> tuple[int, str, type | None]:
    """``python -m jobs.JOB --help`` in this process: (exit code, text, the config class the job gave make_parser)."""
    module = importlib.import_module(f"jobs.{job}")
    seen: dict[str, type | None] = {}

    def recording_make_parser(prog, description, config_cls=None, *args, **kwargs):
        seen["config_cls"] = config_cls
        return cli.make_parser(prog, description, config_cls, *args, **kwargs)

    monkeypatch.setenv("COLUMNS", "120")
    if hasattr(module, "make_parser"):
        monkeypatch.setattr(module, "make_parser", recording_make_parser)
    try:
        code = module.main(["--help"])
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return int(code or 0), captured.out + captured.err, seen.get("config_cls")


def test_every_job_is_found():
    assert {"prepare", "train", "export", "generate", "serve", "convert", "train_vae", "demo", "bench"} <= set(JOBS)


@pytest.mark.parametrize("job", JOBS)
def test_help_examples_are_valid_settings(job, monkeypatch, capsys):
    code, text, config_cls = run_help(job, monkeypatch, capsys)
    assert code == 0, text
    examples = help_examples(text)
    if config_cls is None:
        assert not examples, f"jobs.{job} has no config but its help shows --set {examples}"
        return
    assert examples, f"jobs.{job} --help shows no --set example:\n{text}"
    fallback = cli.default_set_example(config_cls)  # what make_parser shows for a job that passes no set_example
    for item in [*examples, *([fallback] if fallback else [])]:
        config = resolve_like_the_job(job, [item], monkeypatch)
        assert isinstance(config, config_cls)
        key, _ = item.split("=", 1)
        check_key(config_cls, key)


def test_docs_have_set_examples_for_the_main_jobs():
    assert {"prepare", "train", "demo"} <= {job for _, job, _ in DOC_COMMANDS}


@pytest.mark.parametrize("where, job, items", DOC_COMMANDS, ids=[f"{w}:jobs.{j}" for w, j, _ in DOC_COMMANDS])
def test_doc_examples_are_valid_settings(where, job, items, monkeypatch):
    validate(job, items, monkeypatch)


def test_the_checks_reject_wrong_examples(monkeypatch):
    """The old generic help example: wrong section (``train.lr``), and a value type check with teeth."""
    with pytest.raises(pytest.fail.Exception, match=r"unknown config key\(s\) train\.lr"):
        resolve_like_the_job("train", ["train.lr=2e-4"], monkeypatch)
    with pytest.raises(pytest.fail.Exception, match="optim.lr: expected a number, got 'fast'"):
        resolve_like_the_job("train", ["optim.lr=fast"], monkeypatch)
    assert resolve_like_the_job("train", ["optim.lr=2e-4"], monkeypatch).optim.lr == 2e-4
    with pytest.raises(AssertionError, match="no field 'imagez'"):
        check_key(type(resolve_like_the_job("demo", [], monkeypatch)), "counts.imagez")
    with pytest.raises(pytest.fail.Exception, match="takes no --set"):
        resolve_like_the_job("export", ["ema=true"], monkeypatch)


def test_extraction_of_doc_commands(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("# Using `jobs.train`\n\n```bash\nray job submit -- python -m jobs.prepare --input a \\\n"
                   "    --set encode.vae=V   # comment --set not.this=1\npython -m jobs.train [--set key=value …]\n```\n\n"
                   "Run `python -m jobs.demo` with `--set steps=…`.\n\nOr `--set optim.lr=2e-4\n--set ema.enabled=false`.\n")
    found = [(w.split(":")[1], j, i) for w, j, i in doc_commands(doc, tmp_path)]
    assert found == [("4", "prepare", ["encode.vae=V"]), ("9", "demo", ["steps=…"]),
                     ("11", "train", ["optim.lr=2e-4", "ema.enabled=false"])]
