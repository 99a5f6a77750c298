"""Shared test setup: Ray env, tiny configs (toy byo teacher; embedded teacher trained a few steps)."""
from __future__ import annotations

import copy
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

# Ray in tests: local cluster only, no auth prompt. Set before anything imports ray.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

TOY_PROMPTS = ["a red square", "a blue circle", "a green triangle"]


def deep_merge(base: dict, extra: dict) -> dict:
    """`base` with `extra` laid over it, section by section (nested dicts merge, other values replace)."""
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def write_config(path, **sections) -> Path:
    """Write a YAML run config made of the given top-level keys/sections; returns its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(sections, sort_keys=False))
    return path


def toy_sections(tmp_path) -> dict:
    """Tiny settings on the toy byo teacher (1x8x8, random init): plumbing tests in seconds."""
    tmp_path = Path(tmp_path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(TOY_PROMPTS) + "\n")
    return {
        "root": str(tmp_path / "runs"),
        "device": "cpu",
        "teacher": {"kind": "byo", "factory": "pipeline.teachers.toy:make_toy_teacher", "kwargs": {}},
        "schedule": {"shift": 3.0, "teacher_steps": 8, "windows": 4},
        "generate": {"prompts": str(prompts), "samples_per_prompt": 2, "shard_size": 4, "batch_size": 4},
        # the toy teacher has no real images: PeRFlow reflows on its samples (docs/precision.md)
        "train": {"steps": 4, "batch_size": 4, "checkpoint_every": 2, "log_every": 1,
                  "method_options": {"perflow": {"x0": "teacher_samples"}}},
        "evaluate": {"n_samples": 8, "nfes": [1, 2, 4], "teacher_nfe": 8, "batch_size": 8},
    }


def generated_toy(tmp_path_factory, name: str, overrides: dict, file: str = "gen.yaml"):
    """A module's toy run (`toy_sections` with `overrides` laid over them) and its trajectory store, generated
    once: (base dir, sections, config)."""
    from pipeline.cli import run_stage
    from schemas.config import load_config

    base = tmp_path_factory.mktemp(name)
    sections = deep_merge(toy_sections(base), overrides)
    cfg = load_config(write_config(base / file, **sections))
    run_stage("generate", cfg, "local")
    return base, sections, cfg


def trainer_for(cfg, method: str, **train):
    """A Trainer of `method` on the run's trajectory store, on the CPU, with `train` settings over the config's."""
    from pipeline.teachers import load_teacher
    from pipeline.trainer import Trainer
    from stages.train import open_store

    if train:
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update=train)})
    return Trainer(cfg, method, load_teacher(cfg), open_store(cfg), "cpu")


def fake_export(cfg, name: str, seed: int) -> None:
    """An exported student per training seed of run `name` that is a toy transformer (weights seed 0 = the
    toy teacher's own weights), with its record: what evaluate needs, without training."""
    from pipeline.export import export_dir, export_student
    from pipeline.runner import write_record
    from pipeline.teachers.toy import make_toy_transformer

    for run in cfg.train_runs([name]):
        export_student(export_dir(cfg, run), run, make_toy_transformer(seed=seed), cfg, sample_shape=(1, 8, 8))
        write_record(cfg.train_dir(run), "export", "done")


def run_evaluate(cfg, methods):
    """The evaluate stage's jobs run locally, then its `after`: (job statuses, scores.parquet as a frame)."""
    import pandas as pd

    from pipeline.runner import run_job
    from stages import evaluate

    statuses = [run_job(job, "local", progress=False) for job in evaluate.jobs(cfg, methods=methods)]
    evaluate.after(cfg, methods=methods)
    return statuses, pd.read_parquet(cfg.stage_dir("evaluate") / "scores.parquet")


@pytest.fixture
def toy_config(tmp_path) -> Path:
    """Path of a YAML config for the toy byo teacher with tiny settings (root under tmp_path)."""
    return write_config(tmp_path / "toy.yaml", **toy_sections(tmp_path))


@pytest.fixture
def make_toy_config(tmp_path):
    """Factory: make_toy_config(name="x.yaml", **overrides) -> path; overrides deep-merge over the toy config."""
    def make(name: str = "toy.yaml", **overrides) -> Path:
        return write_config(tmp_path / name, **deep_merge(toy_sections(tmp_path), overrides))
    return make


# The embedded teacher at its real shape (1x32x32 digits, MiniLM prompts) but trained only a few steps,
# with one transformer layer and one classifier epoch: tests that need its files run in seconds.
EMBEDDED_TINY = {"num_layers": 1, "train_steps": 12, "batch_size": 16, "weak_checkpoint_step": 4,
                 "classifier_epochs": 1, "checkpoint_every": 5}


def embedded_sections(root) -> dict:
    return {
        "root": str(root),
        "device": "cpu",
        "teacher": {"kind": "embedded", "embedded": dict(EMBEDDED_TINY)},
        "schedule": {"shift": 3.0, "teacher_steps": 8, "windows": 4},
        "generate": {"samples_per_prompt": 1, "shard_size": 5, "batch_size": 10},
        # one transformer layer: the discriminator uses it (every stage's checks run at load, for every command)
        "train": {"steps": 4, "batch_size": 4, "checkpoint_every": 2, "log_every": 1,
                  "adversarial": {"disc_blocks": 1}},
        "evaluate": {"n_samples": 20, "nfes": [1, 2, 4], "teacher_nfe": 8, "batch_size": 20},
    }


@pytest.fixture(scope="session")
def embedded_tiny(tmp_path_factory):
    """(config path, RunConfig) of an embedded run whose teacher stage has already run (tiny, few steps)."""
    from pipeline.cli import run_stage
    from schemas.config import load_config

    base = tmp_path_factory.mktemp("embedded")
    path = write_config(base / "embedded.yaml", **embedded_sections(base / "runs"))
    cfg = load_config(path)
    run_stage("teacher", cfg, "local")
    return path, cfg


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny models (opt in with pytestmark usefixtures("one_thread")):
    on a shared 2-core machine, spinning OpenMP threads make tiny steps 10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _metric_registry():
    """Each test sees the built-in metrics only: a metric a test (or a docs snippet it runs) registers is
    dropped afterwards, so evaluate runs elsewhere keep their metric set."""
    from pipeline.metrics import METRICS, registered

    before = dict(registered())
    yield
    METRICS.clear()
    METRICS.update(before)


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 4 MiB tmpfs (root only): a real full disk."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)])


def kill_training_after(monkeypatch, step: int):
    """Make `Trainer.train_step` raise "simulated kill" once the trainer has finished `step` steps (a kill -9
    between steps, checkpoints as they were); returns a function that puts the real step back."""
    from pipeline.trainer import Trainer

    original = Trainer.train_step

    def killed(self):
        if self.step == step:
            raise RuntimeError("simulated kill")
        return original(self)

    monkeypatch.setattr(Trainer, "train_step", killed)
    return lambda: monkeypatch.setattr(Trainer, "train_step", original)

