"""Bad inputs, table-driven: each is refused before any work with exit 2, exactly one output line starting
`error:` that names the key, and no run directory created (docs/reliability.md counts these rows)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
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


# (id, command, builder of overrides from a scratch dir, key) for inputs that need files on disk
FILE_CASES = [
    ("clip-path-not-a-clip-model", "evaluate", _clip_not_clip, "evaluate.clip_path"),
    ("sd3-dir-without-transformer-weights", "teacher", _sd3_without_weights, "teacher.path"),
    ("prompts-file-missing", "generate", _missing_prompts, "generate.prompts"),
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


@pytest.mark.parametrize("command", ["generate", "train", "teacher", "evaluate"])
def test_bogus_executor_is_refused_when_parsing(tmp_path, command):
    _check_refused(tmp_path, command, {}, "--executor", extra_args=("--executor", "bogus"))

