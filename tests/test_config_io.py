"""Typed configs: strict keys and types, partial sections keep their field defaults, dotted overrides."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from models.config_io import ConfigError, apply_overrides, build_config, from_dict, to_dict


@dataclass
class Resources:
    num_cpus: float = 1.0
    batch_size: int = 32


@dataclass
class Stage:
    name: str = "stage"
    resources: Resources = field(default_factory=lambda: Resources(num_cpus=0.5, batch_size=8))
    tags: list[str] = field(default_factory=list)
    limit: int | None = None


@dataclass
class Root:
    stage: Stage = field(default_factory=Stage)
    factors: tuple[float, float] = (1.0, 2.0)


def test_partial_section_keeps_the_fields_own_defaults():
    cfg = from_dict(Root, {"stage": {"resources": {"batch_size": 4}}})
    assert cfg.stage.resources == Resources(num_cpus=0.5, batch_size=4)
    cfg = build_config(Root, overrides=["stage.resources.num_cpus=2"])
    assert cfg.stage.resources == Resources(num_cpus=2.0, batch_size=8)


def test_unknown_keys_and_wrong_types_fail_with_the_dotted_name():
    with pytest.raises(ConfigError, match=r"stage\.resources\.gpus"):
        from_dict(Root, {"stage": {"resources": {"gpus": 1}}})
    with pytest.raises(ConfigError, match=r"stage\.resources\.batch_size: expected an integer"):
        from_dict(Root, {"stage": {"resources": {"batch_size": "many"}}})
    with pytest.raises(ConfigError, match="expected 2 items"):
        from_dict(Root, {"factors": [1.0]})
    with pytest.raises(ConfigError, match="not of the form"):
        apply_overrides({}, ["novalue"])


def test_overrides_parse_yaml_values_and_round_trip():
    cfg = build_config(Root, overrides=["stage.tags=[a, b]", "stage.limit=null", "factors=[3, 4]"])
    assert cfg.stage.tags == ["a", "b"] and cfg.stage.limit is None and cfg.factors == (3.0, 4.0)
    assert from_dict(Root, to_dict(cfg)) == cfg
