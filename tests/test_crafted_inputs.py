"""Crafted metadata and configs: bounded error values, one-line errors, bounded YAML, escaped CSV cells,
meta-device shapes, and the stage-2 resume check (the command-line cases are rows of tests/test_bad_inputs.py)."""

from __future__ import annotations

import csv
import io
import tracemalloc
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from skullrec.cli import app
from skullrec.config import LIMITS, ImplantNetConfig, ModelConfig, Stage2Config, load_config, load_stage2_config, load_yaml_text
from skullrec.errors import ConfigError, InputError, one_line, short_repr
from skullrec.evaluation.evaluate import escape_csv_cell, rows_to_csv, unescape_csv_cell


def _shared_bomb(levels: int) -> list:
    """Nine references to the previous level, ``levels`` deep: 9^(levels+1) integers in a few hundred objects."""
    value: list = [1] * 9
    for _ in range(levels):
        value = [value] * 9
    return value


# ------------------------------------------------------------------------------------------ error values


def test_short_repr_is_bounded_and_never_builds_the_full_repr() -> None:
    bomb = _shared_bomb(9)  # its full repr would be ~10 GB
    tracemalloc.start()
    try:
        text = short_repr(bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(text) <= 80 and text.startswith("[[[") and text.endswith("...")
    assert peak < 1 << 20, peak  # bytes: reprlib stopped at its limits
    assert short_repr("x" * 10_000).startswith("'xxx") and len(short_repr("x" * 10_000)) <= 80
    assert short_repr(10**5000) == "<int>"  # over Python's 4300-digit str limit: the type instead of a ValueError
    assert short_repr([1, 2, 3]) == "[1, 2, 3]" and short_repr("abc") == "'abc'"  # small values unchanged


def test_one_line_escapes_control_characters_and_keeps_printable_text() -> None:
    assert one_line("a.nii\nerror: forged") == "a.nii\\nerror: forged"
    assert one_line("x\r\t\x1b[31my") == "x\\r\\t\\x1b[31my"
    assert one_line("Schädel 頭蓋 ok") == "Schädel 頭蓋 ok"


def test_a_newline_in_a_file_name_gives_one_error_line(tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["train", "--config", str(tmp_path / "a\nerror: b.yaml"), "--device", "cpu"])
    assert res.exit_code == 2
    assert res.stderr == f"error: {tmp_path}/a\\nerror: b.yaml: no such config file\n"


# ------------------------------------------------------------------------------------------------ YAML


def test_an_alias_bomb_is_refused_with_bounded_memory() -> None:
    value = "&a0 [1, 1, 1, 1, 1, 1, 1, 1, 1]"
    for i in range(1, 10):
        value = f"&a{i} [{value}, {', '.join([f'*a{i - 1}'] * 8)}]"
    tracemalloc.start()
    try:
        with pytest.raises(ConfigError, match="more than 100000 values once its aliases are expanded"):
            load_yaml_text(f"model: {{channels: [{value}]}}")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, peak


@pytest.mark.parametrize("text, message", [
    ("a: &x [*x]", "refers to the value that contains it"),
    ("a: " + "[" * 100_000 + "]" * 100_000, "nested more than 64 levels deep"),
    ("a: " + "[" * 70 + "]" * 70, "nested more than 64 levels deep"),
    ("a: 1" + "0" * 5000, "unreadable value"),
])
def test_recursive_deep_or_unconvertible_yaml_is_a_config_error(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_yaml_text(text)


def test_ordinary_yaml_with_aliases_still_loads() -> None:
    assert load_yaml_text("a: &x [1, 2]\nb: *x\n") == {"a": [1, 2], "b": [1, 2]}
    assert load_yaml_text("") is None


def test_a_config_file_over_1_mib_is_refused_before_it_is_read(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * (1 << 20) + "\n")
    with pytest.raises(ConfigError, match=r"big\.yaml: 1048579 bytes; a config file is at most 1048576"):
        load_config(big)


# ---------------------------------------------------------------------------------------------- bounds


@pytest.mark.parametrize("override, message", [
    ("model.size=1024", "model.size: must be in 2..512, got 1024"),
    ("model.channels=[20,40,80,160,4097]", "model.channels: every entry must be <= 4096"),
    ("model.latent_size=4097", "model.latent_size: must be in 1..4096, got 4097"),
    ("model.strides=[2,2,2,2,2,2,2,2,2,2]", "model.strides: at most 9 entries, got 10"),
    ("train.num_threads=1025", "train.num_threads: must be <= 1024, got 1025"),
    ("train.batch_size=4097", "train.batch_size: must be <= 4096"),
    ("train.epochs=1000001", "train.epochs: must be <= 1000000"),
    ("train.checkpoint_epochs=[1,2000000]", "train.checkpoint_epochs: must be <= 1000000"),
    ("fam.samples=2000", "fam.samples: must be <= 1024"),
    ("seed=9223372036854775808", "seed: must be in 0..9223372036854775807"),
])
def test_stage1_bounds(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(".", r"\.")):
        load_config(None, [override])


def test_the_largest_values_within_bounds_are_accepted() -> None:
    cfg = load_config(None, ["model.size=512", "model.latent_size=4096", "train.num_threads=1024", "train.batch_size=4096"])
    assert (cfg.model.size, cfg.model.latent_size, cfg.train.num_threads) == (512, 4096, 1024)
    s2 = load_stage2_config(None, ["net.grid=512", "net.box_mm=1000", "net.strides=[1,2,1]"])
    assert (s2.net.grid, s2.net.box_mm, s2.net.strides) == (512, 1000.0, [1, 2, 1])


@pytest.mark.parametrize("override, message", [
    ("net.grid=1024", r"net\.grid: must be in 1\.\.512, got 1024"),
    ("net.box_mm=1000.5", r"net\.box_mm: must be in \(0, 1000\] mm, got 1000\.5"),
    ("net.box_mm=0", r"net\.box_mm: must be in \(0, 1000\] mm"),
    ("net.strides=[2,0,2]", r"net\.strides: every entry must be 1 or 2, got \[2, 0, 2\]"),
    ("net.channels=[16,32,64,5000]", r"net\.channels: every entry must be <= 4096"),
    ("net.num_res_units=17", r"net\.num_res_units: must be in 0\.\.16, got 17"),
])
def test_stage2_bounds(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_stage2_config(None, [override])


def test_a_huge_typed_value_gives_a_short_error() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, ["model.channels=[" + ",".join(["[1,2,3]"] * 20_000) + "]"])
    msg = str(info.value)
    assert msg.startswith("model.channels[0]: expected an integer, got [1, 2, 3]") and len(msg) < 120


# ------------------------------------------------------------------------------------ meta-device shapes


@pytest.mark.parametrize("model", [
    ModelConfig(size=32, channels=[2, 4, 4, 4, 2], norm="batch", loss="sigmoid_dice"),
    ModelConfig(size=16, channels=[3, 5], strides=[2, 1], latent_size=5),
])
def test_meta_shapes_are_the_built_models(model: ModelConfig) -> None:
    from skullrec.nets.autoencoder import build_model, state_shapes

    assert state_shapes(model) == {k: tuple(v.shape) for k, v in build_model(model, seed=0).state_dict().items()}


def test_meta_shapes_of_the_implant_net_and_the_parameter_bound() -> None:
    from skullrec.nets.autoencoder import build_model
    from skullrec.nets.implant_net import build_implant_net, state_shapes

    net = ImplantNetConfig(grid=8, channels=[2, 3, 4], strides=[2, 1], num_res_units=1)
    assert state_shapes(net) == {k: tuple(v.shape) for k, v in build_implant_net(net, seed=0).state_dict().items()}
    big = ModelConfig(size=512, channels=[8, 8, 8, 8, 4096], latent_size=4096)  # every value within LIMITS
    with pytest.raises(ConfigError, match=r"model: the architecture has 137,\d{3},\d{3},\d{3} parameters .* at most 268,435,456"):
        build_model(big)
    assert LIMITS["parameters"] == 1 << 28


# ---------------------------------------------------------------------------------------- stage-2 resume


def _implant_state(cfg: Stage2Config, with_config: bool) -> dict:
    from skullrec.nets.implant_net import build_implant_net

    state = {"model": build_implant_net(cfg.net, seed=0).state_dict(), "epoch": 1}
    return {**state, "config": cfg.to_dict()} if with_config else state


def test_stage2_resume_with_an_edited_config_names_the_key(tmp_path: Path) -> None:
    from skullrec.training.stage2 import _check_resume

    cfg = Stage2Config(net=ImplantNetConfig(grid=8, channels=[2, 2, 2], strides=[2, 2], num_res_units=0))
    edited = Stage2Config(net=ImplantNetConfig(grid=8, channels=[2, 4, 2], strides=[2, 2], num_res_units=0))
    _check_resume(tmp_path, cfg, _implant_state(cfg, True))  # unchanged: no error
    with pytest.raises(InputError, match=r"config\.yaml: the run's saved state \(state\.pt\) was trained with another config: "
                                         r"net\.channels \(\[2, 2, 2\] -> \[2, 4, 2\]\)"):
        _check_resume(tmp_path, edited, _implant_state(cfg, True))
    with pytest.raises(InputError, match=r"state\.pt: the saved weights do not fit the network of .*config\.yaml \(tensor '.*' is "):
        _check_resume(tmp_path, edited, _implant_state(cfg, False))  # a state.pt from before the config was saved


# ------------------------------------------------------------------------------------------------- CSV


def test_csv_cells_that_would_start_a_formula_are_escaped_and_numbers_stay_numbers() -> None:
    rows = [{"case": "=1+2", "dsc": -0.25, "n": -3}, {"case": "@SUM(A1)", "dsc": 0.5, "n": 2},
            {"case": "+x", "dsc": float("nan"), "n": 0}, {"case": "-cmd", "dsc": 1.0, "n": 1},
            {"case": "\tx", "dsc": 1.0, "n": 1}, {"case": "\rx", "dsc": 1.0, "n": 1},
            {"case": "'=quoted", "dsc": 1.0, "n": 1}, {"case": "003", "dsc": 1.0, "n": 1}, {"case": "-2.5", "dsc": 1.0, "n": 1},
            {"case": "x\r=cmd", "dsc": 1.0, "n": 1}]  # a CR inside: quoted, so no new row starts at "=cmd"
    text = rows_to_csv(rows, columns=())
    back = list(csv.DictReader(io.StringIO(text, newline="")))
    assert [r["case"] for r in back] == ["'=1+2", "'@SUM(A1)", "'+x", "'-cmd", "'\tx", "'\rx", "''=quoted", "003", "-2.5", "x\r=cmd"]
    assert text.count("\n") == len(rows) + 1 and '"x\r=cmd"' in text
    assert (back[0]["dsc"], back[0]["n"], back[2]["dsc"]) == ("-0.25", "-3", "nan")  # numbers as written, unquoted
    assert [unescape_csv_cell(r["case"]) for r in back] == [r["case"] for r in rows]


def test_escape_csv_cell_round_trip_and_header() -> None:
    assert escape_csv_cell("=HYPERLINK(\"x\")") == "'=HYPERLINK(\"x\")"
    assert escape_csv_cell("case_001") == "case_001" and unescape_csv_cell("'plain") == "'plain"
    header = rows_to_csv([{"=evil": 1}], columns=()).splitlines()[0]
    assert header == "'=evil"


def test_the_viewer_reads_escaped_case_ids_back(tmp_path: Path) -> None:
    from skullrec.viewer.helpers import load_results

    df = load_results(io.StringIO(rows_to_csv([{"case": "=1+2", "dsc": -0.5}, {"case": "007", "dsc": 0.5}], columns=())))
    assert list(df["case"]) == ["=1+2", "007"] and list(df["dsc"]) == [-0.5, 0.5]
