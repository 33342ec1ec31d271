"""Typed config loading: shipped configs, overrides, and errors that name the offending key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from skullrec.config import Config, dump_config, load_config
from skullrec.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    "name,method", [("baseline", "baseline"), ("fam", "fam"), ("sam", "sam"), ("asam", "asam"), ("lookbehind", "lookbehind")]
)
def test_shipped_paper_configs_follow_the_protocol(name: str, method: str) -> None:
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert cfg.train.method == method
    assert (cfg.train.epochs, cfg.train.lr, cfg.train.batch_size) == (200, 1e-4, 4)
    assert cfg.train.checkpoint_epochs == [100, 200]
    assert cfg.data.root == "data/synthetic"
    assert (cfg.model.size, cfg.model.channels, cfg.model.latent_size) == (64, [20, 40, 80, 160, 8], 8)
    assert cfg.fam.lam == (0.002 if method == "fam" else 0.0)
    assert cfg.sam.adaptive == (method == "asam")


def test_smoke_config_is_small() -> None:
    cfg = load_config(CONFIGS / "smoke.yaml")
    assert cfg.train.epochs <= 3
    assert cfg.data.max_train_cases is not None and cfg.data.max_train_cases <= 8


def test_overrides_are_parsed_as_yaml_and_typed(tmp_path: Path) -> None:
    cfg = load_config(CONFIGS / "fam.yaml", ["fam.lam=0.02", "train.checkpoint_epochs=[3, 6]", "data.max_train_cases=5", "train.amp=bf16"])
    assert cfg.fam.lam == 0.02 and isinstance(cfg.fam.lam, float)
    assert cfg.train.checkpoint_epochs == [3, 6]
    assert cfg.data.max_train_cases == 5
    assert cfg.train.amp == "bf16"
    # An integer where a float is expected is accepted and converted.
    assert load_config(CONFIGS / "fam.yaml", ["fam.lam=1"]).fam.lam == 1.0


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config(CONFIGS / "sam.yaml", ["seed=7", "sam.rho=0.1"])
    again = load_config(_write(tmp_path, dump_config(cfg)))
    assert again == cfg
    assert load_config(None) == Config()


@pytest.mark.parametrize(
    "text,message",
    [
        ("train: {epochz: 3}\n", r"train\.epochz: unknown key"),
        ("bogus: 1\n", r"bogus: unknown key"),
        ("train: {epochs: three}\n", r"train\.epochs: expected an integer, got 'three'"),
        ("train: {epochs: 2.5}\n", r"train\.epochs: expected an integer"),
        ("train: {deterministic: 1}\n", r"train\.deterministic: expected true or false"),
        ("train: {method: adamw}\n", r"train\.method: must be one of baseline, fam, sam, asam, lookbehind, got 'adamw'"),
        ("train: {checkpoint_epochs: 100}\n", r"train\.checkpoint_epochs: expected a list"),
        ("train: {checkpoint_epochs: [100, x]}\n", r"train\.checkpoint_epochs\[1\]: expected an integer"),
        ("train: {method: fam}\nfam: {lam: -1}\n", r"fam\.lam: must be >= 0, got -1\.0"),
        ("train: {method: fam}\nfam: {lam: 0}\n", r"fam\.lam: method 'fam' needs lam > 0"),
        ("train: {method: sam}\nfam: {lam: 0.1}\n", r"fam\.lam: only method 'fam' uses lam"),
        ("fam: {lam: -0.5}\n", r"fam\.lam: must be >= 0"),
        ("fam: {lam: abc}\n", r"fam\.lam: expected a number, got 'abc'"),
        ("sam: {rho: 0}\n", r"sam\.rho: must be > 0"),
        ("lookbehind: {k: 0}\n", r"lookbehind\.k: must be >= 1"),
        ("lookbehind: {alpha: 1.5}\n", r"lookbehind\.alpha: must be in \(0, 1\] or 'adaptive'"),
        ("lookbehind: {alpha: fast}\n", r"lookbehind\.alpha: expected a number, got 'fast', or must be one of adaptive"),
        ("train: {method: sam}\nsam: {adaptive: true}\n", r"sam\.adaptive: adaptive SAM is method 'asam'"),
        ("train: {lr: 0}\n", r"train\.lr: must be > 0"),
        ("model: {size: 50}\n", r"model\.size: must be divisible"),
        ("data: []\n", r"data: expected a mapping"),
        ("data: {max_eval_cases: 0}\n", r"data\.max_eval_cases: must be >= 1"),
        ("- a\n- b\n", r"expected a mapping at the top level"),
        ("train: {epochs: [\n", r"invalid YAML"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(path)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(str(path))


def test_bad_override_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"fam\.lam: must be >= 0"):
        load_config(CONFIGS / "fam.yaml", ["fam.lam=-0.1"])
    with pytest.raises(ConfigError, match=r"train\.nope: unknown key"):
        load_config(CONFIGS / "baseline.yaml", ["train.nope=1"])
    with pytest.raises(ConfigError, match=r"--set fam\.lam: expected key=value"):
        load_config(CONFIGS / "baseline.yaml", ["fam.lam"])
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(CONFIGS / "does_not_exist.yaml")


def test_dump_is_plain_yaml() -> None:
    values = yaml.safe_load(dump_config(load_config(CONFIGS / "asam.yaml")))
    assert values["train"]["method"] == "asam" and values["sam"]["rho"] == 0.5
