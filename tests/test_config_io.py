"""Typed configs: strict keys and types, partial sections keep their field defaults, dotted overrides."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from models.config_io import ConfigError, apply_overrides, from_dict, resolve_config, to_dict


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
    cfg = resolve_config(Root, overrides=["stage.resources.num_cpus=2"])
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
    cfg = resolve_config(Root, overrides=["stage.tags=[a, b]", "stage.limit=null", "factors=[3, 4]"])
    assert cfg.stage.tags == ["a", "b"] and cfg.stage.limit is None and cfg.factors == (3.0, 4.0)
    assert from_dict(Root, to_dict(cfg)) == cfg


@dataclass
class Optim:
    lr: float = 1e-4
    eps: float | None = None
    betas: tuple[float, float] = (0.9, 0.999)
    factors: tuple[float, ...] | None = None
    schedule: list[float] = field(default_factory=list)
    steps: int = 10
    name: str = "adamw"
    label: str | int = 0
    custom: dict[str, float] = field(default_factory=dict)


SCIENTIFIC = [("2e-4", 2e-4), ("1E5", 1e5), ("-3e+2", -300.0), (".5e1", 5.0), ("1.0e4", 1e4), ("+1.5E-3", 1.5e-3),
              ("5.", 5.0), ("2.0e-3", 2e-3), ("0.002", 0.002), ("7", 7.0)]


@pytest.mark.parametrize("text, number", SCIENTIFIC)
def test_float_fields_take_scientific_notation_from_set(text, number):
    cfg = resolve_config(Optim, overrides=[f"lr={text}", f"eps={text}", f"betas=[{text}, 0.95]", f"factors=[1, {text}]",
                                         f"schedule=[{text}]", f"custom.gpu={text}"])
    assert cfg.lr == number and isinstance(cfg.lr, float)
    assert cfg.eps == number and isinstance(cfg.eps, float)
    assert cfg.betas == (number, 0.95) and all(isinstance(b, float) for b in cfg.betas)
    assert cfg.factors == (1.0, number) and cfg.schedule == [number] and cfg.custom == {"gpu": number}


def test_float_fields_take_scientific_notation_from_a_yaml_file(tmp_path):
    path = tmp_path / "optim.yaml"
    path.write_text("lr: 2e-3\neps: 1E-8\nbetas: [9e-1, .999e0]\nfactors: [-3e+2, 1e1]\nschedule: [1e-4, 5e-5]\n"
                    "steps: 1e5\nname: 2e-4\nlabel: 1e3\ncustom: {gpu: 5e-1}\n")
    cfg = resolve_config(Optim, file=path)
    assert (cfg.lr, cfg.eps, cfg.betas, cfg.factors, cfg.schedule) == (2e-3, 1e-8, (0.9, 0.999), (-300.0, 10.0),
                                                                       [1e-4, 5e-5])
    assert cfg.custom == {"gpu": 0.5}
    # an int field takes a whole number in scientific notation; str fields keep the text as written
    assert cfg.steps == 100_000 and isinstance(cfg.steps, int)
    assert cfg.name == "2e-4" and cfg.label == "1e3"
    # a file overridden by --set, the way the jobs combine them
    assert resolve_config(Optim, file=path, overrides=["lr=3E-4", "eps=null"]).lr == 3e-4


def test_str_fields_keep_number_like_text_and_none_stays_none():
    cfg = resolve_config(Optim, overrides=["name=2e-4", "label=1e3", "eps=null", "factors=null"])
    assert cfg.name == "2e-4" and cfg.label == "1e3" and cfg.eps is None and cfg.factors is None
    assert resolve_config(Optim, overrides=["label=12"]).label == 12  # a YAML int stays an int in `str | int`


@pytest.mark.parametrize("text", ["fast", "e-4", "2e", "2e-4x", "1_000.0", "inf", "nan", "0x10", "2e-4 5", "--1", "",
                                  "1e999"])
def test_non_numbers_still_fail_for_float_fields(text):
    for key in ("lr", "eps", "betas", "factors"):
        value = f'"{text}"' if key in ("lr", "eps") else f'["{text}", 1.0]'
        with pytest.raises(ConfigError, match=rf"^{key}(\[0\])?: (expected a number|.* out of range)"):
            resolve_config(Optim, overrides=[f"{key}={value}"])
    with pytest.raises(ConfigError, match="expected a number"):
        from_dict(Optim, {"lr": True})


def test_int_fields_take_whole_numbers_only():
    assert resolve_config(Optim, overrides=["steps=1e5"]).steps == 100_000
    assert resolve_config(Optim, overrides=["steps=2.5E3"]).steps == 2500
    assert resolve_config(Optim, overrides=["steps=1.0e+5"]).steps == 100_000  # a YAML 1.1 float, whole
    for text in ("1.5e-3", "2.5", "1e-1"):
        with pytest.raises(ConfigError, match=r"steps: expected an integer, got .* \(not a whole number\)"):
            resolve_config(Optim, overrides=[f"steps={text}"])
    for text in ("many", "true", "1e1000"):
        with pytest.raises(ConfigError, match="^steps: "):
            resolve_config(Optim, overrides=[f"steps={text}"])


def test_serve_sampler_settings_are_checked_when_the_config_is_built():
    """A typo in the serve config's sampler section fails --dry-run / `serve deploy`, not a replica's start."""
    from serve.config import ServeConfig

    models = {"m": {"path": "folder"}}
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) serve config: sampler.stpes"):
        from_dict(ServeConfig, {"models": models, "sampler": {"stpes": 3}})
    with pytest.raises(ConfigError, match="unknown preset 'fast'"):
        from_dict(ServeConfig, {"models": models, "sampler": {"preset": "fast"}})
    assert from_dict(ServeConfig, {"models": models, "sampler": {"preset": "official", "steps": 9}}).sampler["steps"] == 9
    with pytest.raises(ConfigError, match="max_side must be"):  # values too, not only names
        from_dict(ServeConfig, {"models": models, "sampler": {"max_side": 8}})
    with pytest.raises(ConfigError, match="batching.max_batch_size, not sampler.batch_size"):  # one knob for it
        from_dict(ServeConfig, {"models": models, "sampler": {"batch_size": 8}})
    with pytest.raises(ConfigError, match="min_steps ≤ max_steps"):
        from_dict(ServeConfig, {"models": models, "limits": {"min_steps": 5, "max_steps": 4}})
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) .*limits.max_side"):  # the sampler's now
        from_dict(ServeConfig, {"models": models, "limits": {"max_side": 1024}})
