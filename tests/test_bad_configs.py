"""Bad inputs, table-driven: each is refused before any work with exit 2, exactly one output line starting
`error:` that names the key, and no run directory created (docs/reliability.md counts these rows)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from conftest import deep_merge, toy_sections, write_config
from pipeline.cli import app

EMBEDDED_ONE_LAYER = {"kind": "embedded", "embedded": {"num_layers": 1}}

# (id, command, config overrides, key the error line must name)
CASES = [
    ("negative-train-steps", "train", {"train": {"steps": -5}}, "train.steps"),
    ("huge-train-steps", "train", {"train": {"steps": 1e15}}, "train.steps"),
    ("negative-embedded-train-steps", "teacher", {"teacher": {"kind": "embedded", "embedded": {"train_steps": -1}}},
     "teacher.embedded.train_steps"),
    ("unknown-method-option", "train", {"train": {"method_options": {"flowsteer": {"nonsense": 1}}}},
     "train.method_options.flowsteer.nonsense"),
    ("unknown-option-of-optionless-method", "train", {"train": {"method_options": {"perflow": {"lr": 1}}}},
     "train.method_options.perflow.lr"),
    ("options-of-unknown-method", "train", {"train": {"method_options": {"dmd": {}}}}, "train.method_options.dmd"),
    ("unknown-method", "train", {"train": {"methods": ["perflow", "bogus"]}}, "train.methods"),
    ("no-method", "train", {"train": {"methods": []}}, "train.methods"),
    ("huge-samples-per-prompt", "generate", {"generate": {"samples_per_prompt": 1e12}}, "generate.samples_per_prompt"),
    ("zero-samples-per-prompt", "generate", {"generate": {"samples_per_prompt": 0}}, "generate.samples_per_prompt"),
    ("huge-teacher-steps", "generate", {"schedule": {"teacher_steps": 1e12}}, "schedule.teacher_steps"),
    ("zero-teacher-steps", "generate", {"schedule": {"teacher_steps": 0}}, "schedule.teacher_steps"),
    ("zero-windows", "generate", {"schedule": {"windows": 0}}, "schedule.windows"),
    ("windows-not-dividing-steps", "generate", {"schedule": {"windows": 3}}, "schedule.windows"),
    ("zero-shift", "generate", {"schedule": {"shift": 0}}, "schedule.shift"),
    ("device-tpu", "generate", {"device": "tpu"}, "device"),
    ("device-cuda-x", "train", {"device": "cuda:x"}, "device"),
    ("device-tpu-in-sample", "sample", {"device": "tpu"}, "device"),
    ("zero-log-every", "train", {"train": {"log_every": 0}}, "train.log_every"),
    ("zero-checkpoint-every", "train", {"train": {"checkpoint_every": 0}}, "train.checkpoint_every"),
    ("zero-train-batch", "train", {"train": {"batch_size": 0}}, "train.batch_size"),
    ("zero-evaluate-batch", "evaluate", {"evaluate": {"batch_size": 0}}, "evaluate.batch_size"),
    ("oversized-evaluate-seed", "evaluate", {"evaluate": {"seeds": [2 ** 40]}}, "evaluate.seeds"),
    ("negative-evaluate-seed", "evaluate", {"evaluate": {"seeds": [-1]}}, "evaluate.seeds"),
    ("zero-nfe", "evaluate", {"evaluate": {"nfes": [1, 0]}}, "evaluate.nfes"),
    ("no-nfe", "evaluate", {"evaluate": {"nfes": []}}, "evaluate.nfes"),
    ("zero-teacher-nfe", "evaluate", {"evaluate": {"teacher_nfe": 0}}, "evaluate.teacher_nfe"),
    ("one-eval-sample", "evaluate", {"evaluate": {"n_samples": 1}}, "evaluate.n_samples"),
    ("nan-eval-guidance", "evaluate", {"evaluate": {"guidance": float("nan")}}, "evaluate.guidance"),
    ("unknown-features", "evaluate", {"evaluate": {"features": "clip"}}, "evaluate.features"),
    ("guidance-lo-above-hi", "generate", {"generate": {"guidance": [5.0, 3.0]}}, "generate.guidance"),
    ("negative-guidance", "generate", {"generate": {"guidance": [-1.0, 2.0]}}, "generate.guidance"),
    ("inf-guidance", "generate", {"generate": {"guidance": [1.0, float("inf")]}}, "generate.guidance"),
    ("zero-lr", "train", {"train": {"lr": 0}}, "train.lr"),
    ("negative-weight-decay", "train", {"train": {"weight_decay": -0.1}}, "train.weight_decay"),
    ("ema-decay-above-one", "train", {"train": {"ema_decay": 1.5}}, "train.ema_decay"),
    ("online-fraction-above-one", "train", {"train": {"online_fraction": 2}}, "train.online_fraction"),
    ("negative-grad-clip", "train", {"train": {"grad_clip": -1}}, "train.grad_clip"),
    ("zero-workers", "train", {"train": {"workers": 0}}, "train.workers"),
    ("fsdp-on-one-worker", "train", {"train": {"sharding": "fsdp"}}, "train.sharding"),
    ("fsdp-with-lora", "train", {"train": {"sharding": "fsdp", "workers": 2, "student": {"kind": "lora"}}},
     "train.sharding"),
    ("fsdp-with-scflow", "train", {"train": {"sharding": "fsdp", "workers": 2, "methods": ["scflow"]}},
     "train.sharding fsdp: run 'scflow'"),
    ("negative-lora-rank", "train", {"train": {"student": {"kind": "lora", "rank": -1}}}, "train.student.rank"),
    ("renamed-lora-rank", "train", {"train": {"lora_rank": 4}}, "train.lora_rank is now train.student"),
    ("lora-on-bf16-base-without-autocast", "train", {"teacher": {"dtype": "bfloat16"},
                                                     "train": {"student": {"kind": "lora"}}}, "train.mixed_precision"),
    ("negative-train-seed", "train", {"train": {"seed": -1}}, "train.seed"),
    ("zero-generate-batch", "generate", {"generate": {"batch_size": 0}}, "generate.batch_size"),
    ("zero-shard-size", "generate", {"generate": {"shard_size": 0}}, "generate.shard_size"),
    ("negative-generate-seed", "generate", {"generate": {"seed": -1}}, "generate.seed"),
    ("negative-max-retries", "generate", {"generate": {"max_retries": -1}}, "generate.max_retries"),
    ("zero-cpus-per-worker", "generate", {"generate": {"cpus_per_worker": 0}}, "generate.cpus_per_worker"),
    ("negative-gpus-per-worker", "generate", {"generate": {"gpus_per_worker": -1}}, "generate.gpus_per_worker"),
    ("zero-encode-cpus-per-worker", "encode", {"encode": {"cpus_per_worker": 0}}, "encode.cpus_per_worker"),
    ("unknown-encode-store-dtype", "encode", {"encode": {"store_dtype": "float8"}}, "encode.store_dtype"),
    ("zero-embedded-batch", "teacher", {"teacher": {"kind": "embedded", "embedded": {"batch_size": 0}}},
     "teacher.embedded.batch_size"),
    ("zero-embedded-checkpoint-every", "teacher",
     {"teacher": {"kind": "embedded", "embedded": {"checkpoint_every": 0}}}, "teacher.embedded.checkpoint_every"),
    ("prompt-dropout-above-one", "teacher", {"teacher": {"kind": "embedded", "embedded": {"prompt_dropout": 1.5}}},
     "teacher.embedded.prompt_dropout"),
    ("weak-step-after-training", "teacher",
     {"teacher": {"kind": "embedded", "embedded": {"train_steps": 10, "weak_checkpoint_step": 20}}},
     "teacher.embedded.weak_checkpoint_step"),
    ("sample-size-not-multiple-of-patch", "teacher",
     {"teacher": {"kind": "embedded", "embedded": {"sample_size": 30}}}, "teacher.embedded.sample_size"),
    ("negative-teacher-seed", "teacher", {"teacher": {"seed": -1}}, "teacher.seed"),
    ("zero-disc-lr", "train", {"train": {"adversarial": {"disc_lr": 0}}}, "train.adversarial.disc_lr"),
    ("all-zero-window-probs", "train", {"train": {"adversarial": {"window_probs": [0, 0, 0, 0]}}},
     "train.adversarial.window_probs"),
    ("flowsteer-window-probs-not-one-per-window", "train",
     {"train": {"methods": ["flowsteer"], "adversarial": {"window_probs": [0.5, 0.5]}}}, "train.adversarial.window_probs"),
    ("flowsteer-adv-fraction-zero", "train",
     {"train": {"methods": ["flowsteer"], "method_options": {"flowsteer": {"adv_fraction": 0}}}},
     "train.method_options.flowsteer.adv_fraction"),
    ("disc-blocks-deeper-than-teacher", "train", {"teacher": EMBEDDED_ONE_LAYER,
                                                  "train": {"adversarial": {"disc_blocks": 99}}},
     "train.adversarial.disc_blocks"),
    ("sd3-without-path", "teacher", {"teacher": {"kind": "sd3", "factory": None}}, "teacher.path"),
    ("byo-factory-without-colon", "teacher", {"teacher": {"factory": "pipeline.teachers.toy"}}, "teacher.factory"),
    ("misspelt-key", "train", {"train": {"stpes": 10}}, "train.stpes"),
    ("config-executor", "generate", {"executor": "bogus"}, "executor"),
    ("train-store-nowhere", "train", {"train": {"store": "/nonexistent/store"}}, "train.store"),
    # strict types (issue 23): a flag or a string is not a count, a number is not a flag
    ("steps-true", "train", {"train": {"steps": True}}, "train.steps"),
    ("batch-size-string", "train", {"train": {"batch_size": "32"}}, "train.batch_size"),
    ("samples-per-prompt-string", "generate", {"generate": {"samples_per_prompt": "2"}}, "generate.samples_per_prompt"),
    ("flag-given-as-number", "train", {"train": {"tensorboard": 1}}, "train.tensorboard"),
    ("nfe-list-with-a-flag", "evaluate", {"evaluate": {"nfes": [1, True]}}, "evaluate.nfes"),
    # a later stage's setting is refused by an earlier stage's command, before it writes anything
    ("disc-blocks-refused-by-teacher", "teacher", {"teacher": EMBEDDED_ONE_LAYER,
                                                  "train": {"adversarial": {"disc_blocks": 99}}},
     "train.adversarial.disc_blocks"),
    ("adv-fraction-refused-by-generate", "generate",
     {"train": {"methods": ["flowsteer"], "method_options": {"flowsteer": {"adv_fraction": 0}}}},
     "train.method_options.flowsteer.adv_fraction"),
    ("unknown-metric-refused-by-generate", "generate", {"evaluate": {"metrics": ["nosuch"]}}, "evaluate.metrics"),
    # the teacher must exist before a stage builds anything from it
    ("byo-factory-missing", "generate", {"teacher": {"factory": "no_such_module:make"}}, "teacher.factory"),
    ("byo-factory-missing-in-train", "train", {"teacher": {"factory": "no_such_module:make"}}, "teacher.factory"),
    ("embedded-teacher-untrained", "generate",
     {"teacher": {"kind": "embedded", "factory": None}}, "flowsteer teacher"),
]


def _clip_not_clip(tmp: Path) -> dict:
    d = tmp / "not-clip"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (d / "model.safetensors").write_bytes(b"")
    return {"evaluate": {"clip_path": str(d), "features": "pixels"}}


def _sd3_without_weights(tmp: Path) -> dict:
    d = tmp / "sd3"
    (d / "transformer").mkdir(parents=True)
    for c in ("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"):
        (d / c).mkdir()
        (d / c / "config.json").write_text("{}")
        (d / c / "model.safetensors").write_bytes(b"")
    (d / "model_index.json").write_text("{}")
    (d / "transformer" / "config.json").write_text(json.dumps({"num_layers": 2}))
    return {"teacher": {"kind": "sd3", "path": str(d), "factory": None}}


def _missing_prompts(tmp: Path) -> dict:
    return {"generate": {"prompts": str(tmp / "no-such-prompts.txt")}}


def _sd3_dir_missing(tmp: Path) -> dict:
    return {"teacher": {"kind": "sd3", "path": str(tmp / "no-such-sd3"), "factory": None}}


def _prompts(name: str, data: bytes):
    def build(tmp: Path) -> dict:
        (tmp / name).write_bytes(data)
        return {"generate": {"prompts": str(tmp / name)}}
    return build


def _latin1_caption(tmp: Path) -> dict:
    from PIL import Image

    folder = tmp / "images"
    folder.mkdir()
    for i, caption in enumerate([b"a square", b"un caf\xe9"]):
        Image.new("L", (8, 8), 40 * i).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_bytes(caption)
    return {"data": {"images": str(folder)}}


# (id, command, builder of overrides from a scratch dir, key) for inputs that need files on disk
FILE_CASES = [
    ("clip-path-not-a-clip-model", "evaluate", _clip_not_clip, "evaluate.clip_path"),
    ("sd3-dir-without-transformer-weights", "teacher", _sd3_without_weights, "teacher.path"),
    ("prompts-file-missing", "generate", _missing_prompts, "generate.prompts"),
    ("sd3-dir-missing", "generate", _sd3_dir_missing, "teacher.path"),
    ("latin1-prompts-txt", "generate", _prompts("latin1.txt", b"a square\nun caf\xe9\n"), "latin1.txt: line 2"),
    ("latin1-prompts-in-train", "train", _prompts("latin1.txt", b"un caf\xe9\n"), "latin1.txt: line 1"),
    ("jsonl-line-not-an-object", "generate", _prompts("p.jsonl", b'{"prompt": "a"}\n[1, 2, 3]\n'), "p.jsonl: line 2"),
    ("latin1-caption-file", "encode", _latin1_caption, "1.txt: line 1"),
]

# (id, command, config file text, words the error line must hold) for files YAML itself must refuse
RAW_CASES = [
    ("empty-config", "generate", b"", "empty"),
    ("comments-only-config", "train", b"# all defaults?\n", "empty"),
    ("duplicate-section", "train", None, "'train' appears twice"),
    ("duplicate-key", "generate", b"root: runs/a\nroot: runs/b\n", "'root' appears twice"),
    ("config-not-utf8", "generate", b"root: caf\xe9\n", "line 1 is not UTF-8"),
]


def _check_refused(tmp_path: Path, command: str, overrides: dict, key: str, extra_args=()) -> None:
    root = tmp_path / "runs"
    sections = deep_merge(toy_sections(tmp_path), {**overrides, "root": str(root)})
    path = write_config(tmp_path / "bad.yaml", **sections)
    res = CliRunner().invoke(app, [command, "-c", str(path), *extra_args])
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == 2, res.output
    assert len(lines) == 1 and lines[0].startswith("error:"), res.output
    assert key in lines[0], lines[0]
    assert "Traceback" not in res.output
    assert not root.exists()                                   # nothing written, no directory created


@pytest.mark.parametrize("command,overrides,key", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_config_is_one_line_exit_2_and_writes_nothing(tmp_path, command, overrides, key):
    _check_refused(tmp_path, command, overrides, key)


@pytest.mark.parametrize("command,build,key", [c[1:] for c in FILE_CASES], ids=[c[0] for c in FILE_CASES])
def test_bad_input_file_is_one_line_exit_2_and_writes_nothing(tmp_path, command, build, key):
    _check_refused(tmp_path, command, build(tmp_path), key)


@pytest.mark.parametrize("command,text,words", [c[1:] for c in RAW_CASES], ids=[c[0] for c in RAW_CASES])
def test_bad_config_file_is_one_line_exit_2_and_writes_nothing(tmp_path, monkeypatch, command, text, words):
    monkeypatch.chdir(tmp_path)             # an empty config once meant the defaults: runs/demo here
    root = tmp_path / "runs"
    if text is None:                        # the toy config with a second train: section appended
        text = yaml.safe_dump(toy_sections(tmp_path)).encode() + b"train:\n  steps: 2\n"
    path = tmp_path / "bad.yaml"
    path.write_bytes(text)
    res = CliRunner().invoke(app, [command, "-c", str(path)])
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == 2, res.output
    assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], res.output
    assert not root.exists() and {p.name for p in tmp_path.iterdir()} <= {"bad.yaml", "prompts.txt"}


@pytest.mark.parametrize("command,extra", [("evaluate", ()), ("evaluate", ("--share",)), ("train", ()),
                                           ("train", ("--share",)), ("report", ())])
def test_unknown_run_name_is_one_line(tmp_path, command, extra):
    _check_refused(tmp_path, command, {}, "'nosuch'", extra_args=("-m", "nosuch", *extra))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("command", ["generate", "train", "teacher"])
def test_cuda_device_without_cuda_is_refused_before_anything_is_built(tmp_path, command):
    _check_refused(tmp_path, command, {"device": "cuda"}, "device 'cuda'")


def test_status_exits_2_when_a_stage_refuses_the_config(tmp_path):
    sections = deep_merge(toy_sections(tmp_path), {"evaluate": {"metrics": ["nosuch"]}})
    path = write_config(tmp_path / "bad.yaml", **sections)
    res = CliRunner().invoke(app, ["status", "-c", str(path)])
    assert res.exit_code == 2, res.output
    assert [l for l in res.output.splitlines() if l.startswith("error:")] == \
        [l for l in res.output.splitlines() if "evaluate.metrics" in l and l.startswith("error:")]
    assert any(l.startswith("evaluate") and "config error" in l for l in res.output.splitlines())
    assert any(l.startswith("generate") for l in res.output.splitlines())       # the table is still shown
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("command", ["generate", "train", "teacher", "evaluate"])
def test_bogus_executor_is_refused_when_parsing(tmp_path, command):
    _check_refused(tmp_path, command, {}, "--executor", extra_args=("--executor", "bogus"))

