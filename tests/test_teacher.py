"""Teachers: the embedded stage end to end (tiny), resumable teacher training, the SD3 local-dir loader."""
from __future__ import annotations

import pytest
import torch

from pipeline.cli import run_stage
from pipeline.digits import DIGIT_PROMPTS, HELD_OUT, load_digits, prompt_for
from pipeline.errors import UserError
from pipeline.metrics.classifier import load_classifier
from pipeline.runner import read_record
from pipeline.teachers import load_teacher
from pipeline.teachers.embedded import encode_prompts, load_embedded_teacher, train_embedded_teacher
from schemas.config import EmbeddedTeacher


def test_digits_are_fixed_padded_and_balanced():
    x, y = load_digits()
    assert x.shape == (5000, 1, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.min() == -1 and x.max() == 1
    assert (x[:, :, :2] == -1).all() and (x[:, :, :, -2:] == -1).all()        # 2 px background border
    x2, y2 = load_digits()
    assert torch.equal(x, x2) and torch.equal(y, y2)
    held_out = torch.bincount(y[-HELD_OUT:], minlength=10)
    assert held_out.min() > 60                                             # every digit in the held-out split
    assert prompt_for(7) == "a handwritten digit seven" and len(DIGIT_PROMPTS) == 10


def test_minilm_prompt_encoding():
    enc = encode_prompts(["a handwritten digit seven", "a handwritten digit one", ""], max_tokens=8)
    states, pooled = enc["encoder_hidden_states"], enc["pooled_projections"]
    assert states.shape == (3, 8, 384) and pooled.shape == (3, 384)
    # [CLS] a hand ##written digit seven [SEP] = 7 tokens: the 8th is padding and must be zero.
    assert states[0, :7].abs().sum(-1).min() > 0 and states[0, 7].abs().sum() == 0
    assert states[2, 2:].abs().sum() == 0                                  # "" is [CLS][SEP] only
    torch.testing.assert_close(pooled[0], states[0, :7].mean(0))
    assert not torch.allclose(pooled[0], pooled[1])                        # the digit word matters
    again = encode_prompts([""], max_tokens=8)                             # cached: same tensors
    torch.testing.assert_close(again["pooled_projections"][0], pooled[2])


def test_embedded_stage_end_to_end(embedded_tiny):
    path, cfg = embedded_tiny
    out = cfg.stage_dir("teacher")
    recs = {k: read_record(out, k) for k in ("classifier", "teacher")}
    assert all(r["status"] == "done" for r in recs.values())
    assert recs["teacher"]["steps"] == cfg.teacher.embedded.train_steps
    assert recs["classifier"]["held_out_accuracy"] > 0.8                   # one epoch already learns digits
    for name in ("transformer", "weak_transformer", "checkpoint.pt", "classifier.pt", "classifier.json"):
        assert (out / name).exists(), name

    teacher = load_teacher(cfg)
    assert teacher.sample_shape == (1, 32, 32) and teacher.weak_transformer is not None
    cond = teacher.encode([prompt_for(3), ""])
    x = torch.randn(2, 1, 32, 32)
    v = teacher.velocity(x, torch.tensor([0.9, 0.2]), cond)
    assert v.shape == x.shape and torch.isfinite(v).all()
    assert not torch.allclose(v, teacher.weak_velocity(x, torch.tensor([0.9, 0.2]), cond))
    img = teacher.decode(torch.tensor([-3.0, -1.0, 0.0, 1.0, 3.0]).view(1, 1, 1, 5))
    assert img.flatten().tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]

    clf = load_classifier(out)
    real, labels = load_digits()
    held01 = (real[-200:] + 1) / 2
    assert clf.features(held01).shape == (200, 128)
    assert clf.logits(held01).shape == (200, 10)
    assert (clf.predict(held01) == labels[-200:]).float().mean() > 0.8

    # A rerun skips both units: their records are untouched.
    run_stage("teacher", cfg, "local")
    assert {k: read_record(out, k)["time"] for k in recs} == {k: r["time"] for k, r in recs.items()}


def test_missing_teacher_and_classifier_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="run `flowsteer teacher` first"):
        load_embedded_teacher(tmp_path, EmbeddedTeacher(), "cpu")
    with pytest.raises(UserError, match="run `flowsteer teacher` first"):
        load_classifier(tmp_path)


def test_teacher_training_resumes_exactly(tmp_path):
    """A run cut off after step 7 resumes from its step-5 checkpoint and ends where an unbroken run ends."""
    ecfg = EmbeddedTeacher(num_layers=1, train_steps=9, batch_size=8, checkpoint_every=5, weak_checkpoint_step=3)
    quiet = lambda msg: None                                   # noqa: E731
    train_embedded_teacher(tmp_path / "straight", ecfg, log=quiet)
    assert train_embedded_teacher(tmp_path / "broken", ecfg, stop_at=7, log=quiet) == {"stopped_at": 7}
    assert not (tmp_path / "broken" / "transformer").exists()
    assert torch.load(tmp_path / "broken" / "checkpoint.pt", weights_only=True)["step"] == 5
    messages = []
    train_embedded_teacher(tmp_path / "broken", ecfg, log=messages.append)
    assert messages[0].startswith("teacher: resuming from step 5")
    from diffusers import SD3Transformer2DModel

    for name in ("transformer", "weak_transformer"):
        a = SD3Transformer2DModel.from_pretrained(str(tmp_path / "straight" / name)).state_dict()
        b = SD3Transformer2DModel.from_pretrained(str(tmp_path / "broken" / name)).state_dict()
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


# ---------------------------------------------------------------- SD3 from a local diffusers dir
@pytest.fixture(scope="module")
def tiny_sd3_dir(tmp_path_factory):
    from tiny_sd3 import build_tiny_sd3_pipeline

    return build_tiny_sd3_pipeline(tmp_path_factory.mktemp("sd3") / "pipe")


def test_sd3_teacher_matches_the_diffusers_pipeline(tiny_sd3_dir):
    """Our encode + Euler/CFG on `velocity` + decode reproduces StableDiffusion3Pipeline's own images."""
    from pipeline.sampling import sample
    from pipeline.schedule import default_sigmas
    from pipeline.teachers.sd3 import load_sd3_teacher
    from tiny_sd3 import load_tiny_sd3_pipeline

    teacher = load_sd3_teacher(tiny_sd3_dir, "cpu")
    assert teacher.sample_shape == (4, 8, 8)
    prompts = ["a red cube", "a photo of a cat"]
    cond = teacher.encode(prompts)
    assert cond["pooled_projections"].shape == (2, 32) and cond["encoder_hidden_states"].shape[-1] == 32

    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    steps, w = 4, 3.0
    x = sample(teacher.velocity, noise, default_sigmas(steps, 3.0), cond, teacher.encode(["", ""]), w)
    ours = teacher.decode(x)
    assert ours.shape == (2, 3, 16, 16) and 0 <= ours.min() and ours.max() <= 1

    pipe = load_tiny_sd3_pipeline(tiny_sd3_dir)
    ref = pipe(prompt=prompts, negative_prompt=["", ""], num_inference_steps=steps, guidance_scale=w,
               latents=noise.clone(), height=16, width=16, output_type="pt").images
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_sd3_dir_problems_are_one_line_user_errors(tiny_sd3_dir, tmp_path):
    import shutil

    from pipeline.teachers.sd3 import load_sd3_teacher

    with pytest.raises(UserError, match="does not exist"):
        load_sd3_teacher(tmp_path / "missing", "cpu")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_sd3_dir, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(UserError, match="lacks component folder.*vae"):
        load_sd3_teacher(broken, "cpu")
    shutil.copytree(tiny_sd3_dir / "vae", broken / "vae")
    for f in (broken / "transformer").glob("*.safetensors"):
        f.write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="cannot be loaded as an SD3 pipeline") as info:
        load_sd3_teacher(broken, "cpu")
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="unknown teacher.kwargs"):
        load_sd3_teacher(tiny_sd3_dir, "cpu", guidance=3)


def test_sd3_check_unit_records_the_sample_shape(tiny_sd3_dir, make_toy_config):
    from schemas.config import load_config

    cfg = load_config(make_toy_config("sd3.yaml", teacher={"kind": "sd3", "path": str(tiny_sd3_dir),
                                                           "factory": None}))
    run_stage("teacher", cfg, "local")
    rec = read_record(cfg.stage_dir("teacher"), "check")
    assert rec["status"] == "done" and rec["sample_shape"] == [4, 8, 8] and rec["kind"] == "sd3"


def test_sd3_without_t5_stores_only_the_clip_block_of_its_text_conditions(tiny_sd3_dir, make_toy_config):
    """Without T5, SD3's text condition is zero past CLIP's tokens (the layout says so from the config files);
    the store chunks its rows there, so the shard files hold the CLIP block alone, and both readers (zarr, the
    loader's file reader) give back the whole condition the teacher encoded."""
    import numpy as np

    from pipeline.row_arrays import round_trip
    from pipeline.store import TrajectoryStore, generated_store_path
    from pipeline.teachers import describe_teacher
    from schemas.config import load_config

    cfg = load_config(make_toy_config("sd3.yaml", teacher={"kind": "sd3", "path": str(tiny_sd3_dir), "factory": None},
                                      generate={"samples_per_prompt": 1, "shard_size": 4, "batch_size": 4}))
    layout = describe_teacher(cfg)
    tokens, _ = layout.cond_shapes["encoder_hidden_states"]
    extent_tokens, extent_width = layout.cond_extents["encoder_hidden_states"]
    assert extent_tokens < tokens
    run_stage("generate", cfg, "local")
    store = TrajectoryStore.open(generated_store_path(cfg))
    arr = store.group["prompt_embeds"]
    on_disk = sum(f.stat().st_size for f in (store.path / "prompt_embeds" / "c").rglob("*") if f.is_file())
    assert on_disk < arr.nbytes / 4                                  # the zero T5 tokens are not written
    rows = np.array([2, 0, 2, 1])
    from pipeline.shard_reader import ShardRows

    assert ShardRows.of(arr).per_row > 1                             # a row of several chunks, read from the files
    direct = store.rows("prompt_embeds", rows, stored=True)          # the loader's reader (shard files)
    via_zarr = np.asarray(arr[:])[rows]
    assert np.array_equal(direct.numpy(), via_zarr)
    enc = load_teacher(cfg).encode(list(store.prompts.take(store.prompt_index[rows])))["encoder_hidden_states"]
    assert not enc[:, extent_tokens:].any() and not enc[:, :, extent_width:].any() and enc.any()
    assert torch.equal(direct.float(), round_trip(enc, store.store_dtype))


def extent_layout(extent=(2, 8), **_):
    """A byo `teacher.describe` whose text condition is [4, 8] with the given non-zero extent."""
    from pipeline.teachers.base import TeacherLayout

    return TeacherLayout.of((1, 8, 8), {"encoder_hidden_states": (4, 8)}, None, {"encoder_hidden_states": extent})


@pytest.mark.parametrize("extent", [(0, 8), (2, 9), (2,), (-1, 3)])
def test_a_describe_with_a_condition_extent_outside_its_shape_is_one_user_error(make_toy_config, extent):
    from pipeline.teachers import describe_teacher
    from schemas.config import load_config

    cfg = load_config(make_toy_config("ext.yaml", teacher={"describe": "test_teacher:extent_layout",
                                                           "kwargs": {"extent": list(extent)}}))
    with pytest.raises(UserError, match=r"teacher.describe 'test_teacher:extent_layout': "
                                        r"cond_extents\['encoder_hidden_states'\] .* is not a block of its "
                                        r"condition's shape \[4, 8\]"):
        describe_teacher(cfg)
    good = load_config(make_toy_config("ok.yaml", teacher={"describe": "test_teacher:extent_layout"}))
    assert describe_teacher(good).cond_extents == {"encoder_hidden_states": (2, 8)}
