"""The method registry: a method declared in one class shows up in config validation, `train --help`, the
report's ladder table and the model card, with no other file edited (as tests/test_metrics.py does for metrics)."""
from __future__ import annotations

import json

import pandas as pd
import pytest
from typer.testing import CliRunner

from pipeline.methods import base, get_method, ladder_methods, method_names
from pipeline.methods.common import OnTrajectoryChordMethod
from schemas.config import ConfigError, load_config


class ToyOptions(base.MethodOptions):
    strength: float = 0.5


class ToyMethod(OnTrajectoryChordMethod):
    name = "toy-chord"
    description = "A toy chord method declared in the registry test: OTA's loss under another name."
    Options = ToyOptions
    ladder_rank = 25            # between ota (20) and flowsteer (30)


@pytest.fixture
def toy_method(monkeypatch):
    monkeypatch.setitem(base.METHODS, ToyMethod.name, None)     # dropped again after the test
    return base.register(ToyMethod)


def test_the_built_in_methods_declare_their_facts():
    assert set(method_names()) >= {"perflow", "ota", "flowsteer", "scflow", "ayf-emd"}
    for name in method_names():
        method = get_method(name)
        assert method.description and method.name == name
        assert set(method.option_defaults()) == set(method.Options.model_fields)
    assert [m.name for m in ladder_methods()] == ["perflow", "ota", "flowsteer", "scflow", "ayf-emd"]
    with pytest.raises(KeyError, match="unknown method 'nope'"):
        get_method("nope")


def test_a_registered_method_is_checked_by_the_config(make_toy_config, toy_method):
    cfg = load_config(make_toy_config(train={"methods": ["ota", "toy-chord"],
                                             "method_options": {"toy-chord": {"strength": 2}}}))
    assert [r.method for r in cfg.train_runs()] == ["ota", "toy-chord"]
    assert toy_method.parse_options(cfg.train.method_options["toy-chord"]) == {"strength": 2.0}
    with pytest.raises(ConfigError, match=r"train.method_options.toy-chord.strenght: unknown option "
                                          r"\(known for toy-chord: strength\)"):
        load_config(make_toy_config(name="typo.yaml", train={"method_options": {"toy-chord": {"strenght": 1}}}))
    with pytest.raises(ConfigError, match=r"train.variants.v.options.strength: .*valid number"):
        load_config(make_toy_config(name="bad.yaml", train={"variants": {"v": {"method": "toy-chord",
                                                                               "options": {"strength": "x"}}}}))


def test_without_registration_the_method_is_unknown(make_toy_config):
    with pytest.raises(ConfigError, match="train.methods: unknown method 'toy-chord'"):
        load_config(make_toy_config(train={"methods": ["toy-chord"]}))


def test_a_registered_method_is_listed_in_train_help(toy_method, monkeypatch):
    from pipeline.cli import app

    res = CliRunner().invoke(app, ["train", "--help"], terminal_width=200)
    assert res.exit_code == 0, res.output
    assert "toy-chord" in res.output and "perflow" in res.output
    monkeypatch.delitem(base.METHODS, ToyMethod.name)
    assert "toy-chord" not in CliRunner().invoke(app, ["train", "--help"], terminal_width=200).output


def test_a_registered_method_takes_its_ladder_place_in_the_report(make_toy_config, toy_method):
    from pipeline.report_tables import RunInfo, ladder_table

    cfg = load_config(make_toy_config(evaluate={"nfes": [1], "seeds": [0]}))
    runs = [RunInfo(n, n) for n in ("flowsteer", "toy-chord", "perflow", "ota")]
    rows = pd.DataFrame([{"checkpoint": r.name, "fingerprint": "f", "run": r.name, "train_seed": 0,
                          "schedule": "fixed", "nfe": 1, "metric": "fid", "value": float(i), "n": 8, "seed": 0,
                          "guidance": 1.0, "features": "pixels", "reference": "", "sampling_seconds": 0.0,
                          "scoring_seconds": 0.0, "unit": r.name, "prompt_set": "train prompts", "prompt_hash": "h",
                          "step": 4} for i, r in enumerate(runs)])
    table = ladder_table(cfg, rows, runs, "fid")
    order = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ")][1:]
    assert [o.split(",")[0] for o in order] == ["perflow", "ota", "toy-chord", "flowsteer"]


def test_a_registered_method_gets_a_model_card(make_toy_config, toy_method, tmp_path):
    from pipeline.export import CARD, META, export_student
    from pipeline.teachers.toy import make_toy_transformer

    cfg = load_config(make_toy_config(train={"methods": ["toy-chord"]}))
    run = cfg.train_runs()[0]
    out = export_student(tmp_path / "export", run, make_toy_transformer(seed=1), cfg, sample_shape=(1, 8, 8))
    card = (out / CARD).read_text()
    assert ToyMethod.description in card and "(method toy-chord)" not in card
    assert "- toy-chord" in card                      # the front matter's tags
    assert json.loads((out / META).read_text())["method"] == "toy-chord"
