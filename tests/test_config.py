"""Config: every user mistake is one line on stderr with exit code 2; defaults and fingerprints behave."""
from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from conftest import write_config
from pipeline.cli import EXAMPLE, app
from schemas.config import ConfigError, RunConfig, load_config


def run_cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_one_line_error(result, *needles):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("sections, needles", [
    ({"train": {"step": 10}}, ["unknown key", "train.step"]),                       # typo of train.steps
    ({"teacher": {"kind": "embedded", "embeded": {}}}, ["unknown key", "teacher.embeded"]),
    ({"train": {"steps": "many"}}, ["train.steps", "integer"]),                     # wrong type
    ({"executor": "slurm"}, ["executor"]),                                          # not one of the choices
    ({"schedule": {"teacher_steps": 10, "windows": 4}}, ["multiple of", "windows"]),
    ({"teacher": {"kind": "sd3"}}, ["teacher.path is required"]),
    ({"teacher": {"kind": "byo", "factory": "no_colon"}}, ["module:function"]),
])
def test_bad_config_is_one_line_exit_2(tmp_path, sections, needles):
    path = write_config(tmp_path / "bad.yaml", root=str(tmp_path / "runs"), **sections)
    assert_one_line_error(run_cli("teacher", "--config", path), str(path), *needles)
    assert not (tmp_path / "runs").exists()          # nothing ran


def test_missing_config_file(tmp_path):
    assert_one_line_error(run_cli("status", "--config", tmp_path / "nope.yaml"), "not found", "nope.yaml")


def test_bad_yaml_reports_the_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("root: runs\ntrain:\n  steps: [1, 2\n  lr: 0.1\n")
    assert_one_line_error(run_cli("status", "--config", path), "not valid YAML", "line")


def test_top_level_must_be_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    assert_one_line_error(run_cli("status", "-c", path), "mapping")


# keys whose default follows the teacher (or its depth / the schedule): the example writes them commented out
FOLLOWING = (("generate", "store_dtype"), ("encode", "store_dtype"), ("evaluate", "features"), ("train", "adversarial", "disc_blocks"),
             ("train", "adversarial", "window_probs"))


def test_example_yaml_spells_out_every_default():
    raw = yaml.safe_load(EXAMPLE.read_text())
    want = RunConfig().model_dump(mode="json")
    for *parents, leaf in FOLLOWING:
        node = want
        for key in parents:
            node = node[key]
        node.pop(leaf)                                     # commented out: absent from the parsed example
        assert f"# {leaf}: null" in EXAMPLE.read_text()
    assert raw == want                                     # every other key present, every value the default
    assert load_config(EXAMPLE) == RunConfig()


def test_commented_keys_follow_the_teacher(tmp_path):
    """A config from `init` switched to another teacher gets that teacher's defaults, not the embedded ones."""
    text = EXAMPLE.read_text().replace("  kind: embedded ", "  kind: exact    ", 1)
    (tmp_path / "c.yaml").write_text(text)
    cfg = load_config(tmp_path / "c.yaml")
    assert cfg.teacher.kind == "exact" and cfg.evaluate.features == "pixels"
    cfg = RunConfig.model_validate({"teacher": {"kind": "sd3", "path": "/x"}})
    assert cfg.generate.store_dtype == cfg.encode.store_dtype == "float16" and cfg.evaluate.features == "pixels"
    assert RunConfig().generate.store_dtype == "float32" and RunConfig().evaluate.features == "classifier"


def test_overrides_are_checked_like_the_file(tmp_path):
    path = write_config(tmp_path / "c.yaml", root=str(tmp_path))
    assert load_config(path, {"train.lr": 0.5}).train.lr == 0.5
    with pytest.raises(ConfigError, match="train.lr"):
        load_config(path, {"train.lr": "fast"})


def test_init_writes_a_loadable_config(tmp_path):
    target = tmp_path / "flowsteer.yaml"
    result = run_cli("init", target)
    assert result.exit_code == 0, result.output
    assert load_config(target) == RunConfig()
    assert_one_line_error(run_cli("init", target), "exists")           # no silent overwrite
    assert run_cli("init", target, "--force").exit_code == 0


def test_stage_dirs_follow_the_sections_that_decide_them(tmp_path):
    base = load_config(write_config(tmp_path / "a.yaml", root=str(tmp_path)))
    perflow = lambda cfg: cfg.train_dir(cfg.train_run("perflow"))
    new_lr = base.model_copy(update={"train": base.train.model_copy(update={"lr": 1e-5})})
    for stage in ("teacher", "generate", "evaluate"):
        assert new_lr.stage_dir(stage) == base.stage_dir(stage)      # a train.lr change keeps cached work
    assert perflow(new_lr) != perflow(base)
    # How work is spread (workers, methods list) does not change what a method's run produces.
    more_workers = base.model_copy(update={"train": base.train.model_copy(update={"workers": 4})})
    assert perflow(more_workers) == perflow(base)
    # nor does sharding it (a checkpoint's format is the same under ddp and fsdp: docs/students.md)
    sharded = base.model_copy(update={"train": base.train.model_copy(update={"workers": 4, "sharding": "fsdp"})})
    assert perflow(sharded) == perflow(base)

    teacher = base.teacher.model_copy(update={"seed": 1})
    new_teacher = base.model_copy(update={"teacher": teacher})
    for stage in ("teacher", "generate", "evaluate"):
        assert new_teacher.stage_dir(stage) != base.stage_dir(stage)
    assert perflow(new_teacher) != perflow(base)
    assert perflow(base).name.startswith("perflow-s0-")


def test_train_runs_are_names_times_seeds_and_dirs_differ_only_where_the_run_does(tmp_path):
    cfg = load_config(write_config(tmp_path / "a.yaml", root=str(tmp_path)), {
        "train.methods": ["perflow", "perflow-default", "flowsteer"], "train.seeds": [0, 1],
        "train.variants": {"perflow-default": {"method": "perflow", "options": {"grid": "diffusers"}}},
        "train.method_options": {"flowsteer": {"adv_fraction": 0.25}}})
    runs = cfg.train_runs()
    assert [(r.name, r.method, r.seed) for r in runs] == [
        ("perflow", "perflow", 0), ("perflow", "perflow", 1), ("perflow-default", "perflow", 0),
        ("perflow-default", "perflow", 1), ("flowsteer", "flowsteer", 0), ("flowsteer", "flowsteer", 1)]
    assert runs[2].options == {"grid": "diffusers"} and runs[0].options == {} and runs[4].options == {"adv_fraction": 0.25}
    assert [r.label for r in runs[:2]] == ["perflow/s0", "perflow/s1"]
    assert [r.name for r in cfg.train_runs(["flowsteer"])] == ["flowsteer", "flowsteer"]
    dirs = [cfg.train_dir(r) for r in runs]
    assert len(set(dirs)) == len(dirs) and dirs[1].name.startswith("perflow-s1-")
    # the fingerprint covers method, options and seed -- not the name, nor which other runs or seeds exist
    fp = lambda c, r: c.fingerprint("train", r)
    assert fp(cfg, runs[0]) != fp(cfg, runs[1]) and fp(cfg, runs[0]) != fp(cfg, runs[2])
    one_seed = cfg.model_copy(update={"train": cfg.train.model_copy(update={"seeds": [1], "methods": ["flowsteer"]})})
    assert one_seed.train_dir(one_seed.train_runs()[0]) == dirs[5]
    assert one_seed.train_runs()[0].label == "flowsteer"


def test_a_gan_setting_retrains_only_the_runs_with_a_discriminator(tmp_path):
    methods = {"train.methods": ["perflow", "ota", "ayf-emd", "flowsteer", "scflow"]}
    cfg = load_config(write_config(tmp_path / "a.yaml", root=str(tmp_path)), methods)
    gan = load_config(write_config(tmp_path / "b.yaml", root=str(tmp_path)), {**methods, "train.adversarial.disc_lr": 5e-3})
    same = {r.name: cfg.train_dir(r) == gan.train_dir(r) for r in cfg.train_runs()}
    assert same == {"perflow": True, "ota": True, "ayf-emd": True, "flowsteer": False, "scflow": False}
    lr = load_config(write_config(tmp_path / "c.yaml", root=str(tmp_path)), {**methods, "train.lr": 1e-3})
    assert all(cfg.train_dir(r) != lr.train_dir(r) for r in cfg.train_runs())


@pytest.mark.parametrize("key, value, match", [
    ("train.seeds", [], "seeds"), ("train.seeds", [1, 1], "seeds"), ("train.methods", ["a/b"], "a/b"),
    ("train.variants", {"x": {"options": {}}}, "method"), ("train.seed", 3, "seed")])
def test_bad_train_runs_are_one_line_errors(tmp_path, key, value, match):
    with pytest.raises(ConfigError, match=match):
        load_config(write_config(tmp_path / "a.yaml", root=str(tmp_path)), {key: value})
