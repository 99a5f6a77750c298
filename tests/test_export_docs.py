"""What a user copies: the export's model card, and every ```python block of README.md and docs/*.md,
run as written on a tiny SD3 pipeline dir without T5 (tests/tiny_sd3.py) and exports made from it."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import deep_merge, toy_sections, write_config
from schemas.config import load_config

ROOT = Path(__file__).resolve().parent.parent
# The placeholders the docs use, replaced by the tiny dirs here (a snippet with another path fails the test).
TEACHER_PLACEHOLDER = "path/to/stable-diffusion-3-medium-diffusers"
EXPORT_PLACEHOLDER = "runs/my-run/train/flowsteer-s0-<fp>/export"
FLOW_MAP_PLACEHOLDER = "runs/my-run/train/ayf-emd-s0-<fp>/export"

pytestmark = pytest.mark.usefixtures("one_thread")


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def card_parts(card: str) -> tuple[dict, str]:
    _, front, body = card.split("---\n", 2)
    return yaml.safe_load(front), body


@pytest.fixture(scope="module")
def sd3_run(tmp_path_factory):
    """A tiny SD3 dir (no T5), a config whose teacher is that dir, an `ota` and an `ayf-emd` export of it."""
    import tiny_sd3
    from pipeline.export import export_student

    base = tmp_path_factory.mktemp("sd3docs")
    pipe_dir = tiny_sd3.build_tiny_sd3_pipeline(base / "sd3")
    cfg = load_config(write_config(base / "c.yaml", **deep_merge(toy_sections(base), {
        "teacher": {"kind": "sd3", "path": str(pipe_dir), "factory": None}})))
    transformer = tiny_sd3.load_tiny_sd3_pipeline(pipe_dir).transformer
    shape = (4, 8, 8)
    ota = export_student(base / "ota-export", "ota", transformer, cfg, shape)
    torch.manual_seed(0)
    ayf_student = _ayf_student(transformer)
    ayf = export_student(base / "ayf-export", "ayf-emd", ayf_student, cfg, shape)
    return cfg, pipe_dir, ota, ayf, ayf_student


def _ayf_student(transformer):
    """An ayf-emd student whose gap embedding is not zero (as after training), so ignoring it would matter."""
    from pipeline.methods.ayf import FlowMapTransformer

    student = FlowMapTransformer(transformer)
    with torch.no_grad():
        for p in student.gap_embed.parameters():
            p.normal_(0, 0.5)
    return student.eval()


def test_card_has_hub_front_matter_and_its_three_lines_run_in_plain_diffusers(sd3_run):
    cfg, pipe_dir, ota, _, _ = sd3_run
    front, body = card_parts((ota / "README.md").read_text())
    assert front["library_name"] == "diffusers" and front["pipeline_tag"] == "text-to-image"
    assert {"flowsteer", "ota", "sd3", "distillation"} <= set(front["tags"])
    assert "base_model" not in front                                # a local dir is no hub id: not invented
    assert str(pipe_dir) in body and "No scores yet" in body and "lr: 0.0002" in body
    assert "`1, 0.9, 0.75, 0.5, 0`" in body                         # the window edges, after the shift
    (block,) = python_blocks(body)
    assert len(block.strip().splitlines()) == 3
    scope: dict = {}
    exec(compile(block, "model card", "exec"), scope)               # the card's lines, unchanged
    pipe = scope["pipe"]
    assert pipe.scheduler.sigmas.tolist() == pytest.approx([1.0, 0.9, 0.75, 0.5, 0.0])   # the fixed grid
    assert np.isfinite(np.asarray(scope["image"])).all()


def test_card_plain_diffusers_latents_match_flowsteers_own_sampler(sd3_run):
    """The card's pipeline call and flowsteer's load_student sample give the same latents from the same noise."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    from pipeline.student import load_student
    from pipeline.teachers import load_teacher

    cfg, pipe_dir, ota, _, _ = sd3_run
    pipe = StableDiffusion3Pipeline.from_pretrained(str(pipe_dir), text_encoder_3=None, tokenizer_3=None,
                                                    transformer=SD3Transformer2DModel.from_pretrained(ota / "transformer"))
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    plain = pipe("a cat", num_inference_steps=4, sigmas=[1, 0.75, 0.5, 0.25], guidance_scale=1.0,
                 latents=noise.clone(), output_type="latent").images
    teacher = load_teacher(cfg)
    ours = load_student(ota).sample(noise, teacher.encode(["a cat"]), 4)
    assert torch.allclose(plain, ours, atol=1e-4)


def test_ayf_export_refuses_plain_diffusers_and_says_so(sd3_run):
    from diffusers import SD3Transformer2DModel

    from pipeline.methods import get_method
    from pipeline.student import load_student
    from pipeline.teachers import load_teacher

    cfg, _, _, ayf, ayf_student = sd3_run
    assert not (ayf / "transformer").exists() and (ayf / "flow_map").is_dir()
    with pytest.raises(Exception):
        SD3Transformer2DModel.from_pretrained(ayf / "transformer")    # loud, not a silent drop of the gap embedding
    front, body = card_parts((ayf / "README.md").read_text())
    assert "not a drop-in" in body and "load_student" in body and front["library_name"] == "diffusers"
    loaded = load_student(ayf)
    noise, cond = torch.randn(2, 4, 8, 8), load_teacher(cfg).encode(["a cat", "a dog"])
    expected = get_method("ayf-emd").sample(ayf_student, noise, cond, 2, 4, 3.0)
    assert torch.allclose(loaded.sample(noise, cond, 2), expected, atol=1e-5)


def test_card_rewritten_with_scores(sd3_run, tmp_path):
    import shutil

    from pipeline.export import write_card_scores

    cfg, _, ota, _, _ = sd3_run
    copy = shutil.copytree(ota, tmp_path / "export")
    table = "| NFE | FID |\n| ---: | ---: |\n| 4 | 12.5 |"
    before = card_parts((copy / "README.md").read_text())
    card = write_card_scores(copy, cfg, scores_markdown=table)
    front, body = card_parts(card.read_text())
    assert "| 4 | 12.5 |" in body and "No scores yet" not in body
    assert front == before[0] and "## How to load" in body


def test_hub_cache_snapshot_gives_base_model():
    from pipeline.model_card import hub_id

    snap = "/h/hub/models--stabilityai--stable-diffusion-3-medium-diffusers/snapshots/abc"
    assert hub_id(snap) == "stabilityai/stable-diffusion-3-medium-diffusers"
    assert hub_id("/models/sd3") is None


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_docs_python_snippets_run_as_written(sd3_run, tmp_path, monkeypatch):
    cfg, pipe_dir, ota, ayf, _ = sd3_run
    monkeypatch.chdir(tmp_path)
    ran = 0
    for path in doc_files():
        for i, block in enumerate(python_blocks(path.read_text())):
            code = (block.replace(TEACHER_PLACEHOLDER, str(pipe_dir)).replace(EXPORT_PLACEHOLDER, str(ota))
                    .replace(FLOW_MAP_PLACEHOLDER, str(ayf)))
            try:
                exec(compile(code, f"{path.name} block {i + 1}", "exec"), {"__name__": "__snippet__"})
            except Exception as exc:  # name the block that failed
                raise AssertionError(f"{path.relative_to(ROOT)} python block {i + 1} fails: "
                                     f"{type(exc).__name__}: {exc}") from exc
            ran += 1
    assert ran >= 2, "the docs should show the drop-in and load_student snippets"
