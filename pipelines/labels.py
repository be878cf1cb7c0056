"""Class labels of a prepare run (docs/curation.md#class-labels): a name per item from its folder or a list column, and
the output's vocabulary that turns names into the indices a class-conditional model trains on.

The vocabulary is the output's, kept in ``OUTPUT/labels.json``: a rerun keeps every index it has written and appends
new names (in natural order: "2" before "10"), so shards written by earlier runs never change meaning. It is fixed on
the driver, from every listed item, before any worker starts.
"""

from __future__ import annotations

import json
import posixpath
import re
from typing import Any

from models.config_io import ConfigError
from pipelines import constants as C
from pipelines.config import ReadConfig
from pipelines.sources import split_source


def label_of(item: dict[str, Any], read: ReadConfig) -> str | None:
    """The item's label name: the folder that holds its file (a tar member: its folder inside the tar, else the tar's
    folder), or its ``read.label_column`` value (list files and tar json); None when it has none."""
    if read.label_from == "folder":
        url, member = split_source(str(item[C.SOURCE]))
        folder = posixpath.basename(posixpath.dirname(member)) or posixpath.basename(posixpath.dirname(url))
        return folder or None
    value = json.loads(item[C.META] or "{}").get(read.label_column)
    return None if value is None or str(value).strip() == "" else str(value).strip()


def natural_key(name: str) -> tuple:
    """Sort key: integer names by value ("2" < "10"), then the rest alphabetically."""
    return (0, int(name), "") if re.fullmatch(r"[0-9]+", name) else (1, 0, name)


def check_labels(read: ReadConfig, existing: dict | None, has_samples: bool, output: str) -> None:
    """One output, one labelling: refuse (ConfigError) to add labelled samples to an output whose samples have no
    labels or labels of another source, and unlabelled ones to a labelled output."""
    fix = "rerun with the read.label_from / read.label_column of the existing samples, or write to a new --output"
    if existing is None:
        if read.label_from != "none" and has_samples:
            raise ConfigError(f"{output} holds samples without labels (no {C.LABELS_FILE}), but this run labels them "
                              f"(read.label_from={read.label_from}); {fix}")
        return
    theirs = (existing.get("label_from"), existing.get("label_column") if existing.get("label_from") == "column" else None)
    ours = (read.label_from, read.label_column if read.label_from == "column" else None)
    if theirs != ours:
        raise ConfigError(f"{output} holds samples labelled by {label_source(*theirs)} ({C.LABELS_FILE}), but this run's "
                          f"labels are {label_source(*ours)}; {fix}")


def label_source(label_from: str, column: str | None = None) -> str:
    if label_from == "folder":
        return "folder names"
    return f"the list column {column!r}" if label_from == "column" else "none (read.label_from=none)"


def assign_labels(items: list[dict[str, Any]], read: ReadConfig, existing: dict | None) -> list[str]:
    """Give every item that names a label its index (``label``) and name (``label_name``) in its json metadata; returns
    the vocabulary: ``existing``'s class names, then the new names in natural order. Items without a label keep none
    (the decode stage rejects them: ``Reason.NO_LABEL``)."""
    names = list(existing["class_names"]) if existing else []
    found = [label_of(item, read) for item in items]
    names += sorted({n for n in found if n is not None} - set(names), key=natural_key)
    index = {name: i for i, name in enumerate(names)}
    for item, name in zip(items, found):
        if name is not None:
            meta = json.loads(item[C.META] or "{}")
            meta.update({C.LABEL: index[name], C.LABEL_NAME: name})
            item[C.META] = json.dumps(meta, sort_keys=True, default=str)
    return names


def labels_record(read: ReadConfig, names: list[str]) -> dict[str, Any]:
    """The content of ``labels.json``."""
    return {"label_from": read.label_from, "label_column": read.label_column if read.label_from == "column" else None,
            "class_names": names}
