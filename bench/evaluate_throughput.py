"""Evaluate-stage throughput: samples/s and scored images/s per metric, through the evaluate worker itself.

Builds a random-init StableDiffusion3Pipeline dir and random-init metric models in their released layouts
(tests/tiny_metrics.py), exports the teacher's transformer as a student, then times one EvalWorker (the
process that `flowsteer evaluate` runs: teacher, metric models and student loaded once) on one student unit
and one teacher unit, and each metric's `score` alone on the same images. Prints images/s and the projected
minutes for 10k student samples with every metric (the GPU goal: under 30 minutes on one H100).

    python bench/evaluate_throughput.py                       # CPU: tiny SD3 (16x16 images), tiny metrics
    python bench/evaluate_throughput.py --device cuda --shape sd3 --samples 256 --batch 64
        # SD3-Medium-shaped transformer (24 blocks, 1536 wide, 128x128x16 latents -> 1024 px through a
        # 4-level VAE), metric models at their real sizes (CLIP-H for PickScore, ViT-H-14 for HPSv2, BLIP ViT-L
        # + BERT-base for ImageReward, CLIP-L for CLIP score), teacher and metrics in bf16
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


def sd3_pipeline(directory: Path, shape: str) -> Path:
    """tests/tiny_sd3.py's pipeline, or (shape sd3) its tiny text encoders with SD3-Medium's transformer and VAE."""
    import tiny_sd3

    if shape == "tiny":
        return tiny_sd3.build_tiny_sd3_pipeline(directory)
    from diffusers import AutoencoderKL, SD3Transformer2DModel, StableDiffusion3Pipeline

    parts = tiny_sd3.tiny_sd3_components(seed=0)
    parts["transformer"] = SD3Transformer2DModel(
        sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
        num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
        pooled_projection_dim=2 * tiny_sd3.CLIP_PROJECTION, pos_embed_max_size=192)
    parts["vae"] = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                                 up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                                 layers_per_block=2, latent_channels=16, sample_size=1024, scaling_factor=1.5305,
                                 shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
    StableDiffusion3Pipeline(**parts).save_pretrained(directory)
    return directory


def metric_models(base: Path, shape: str) -> dict:
    """evaluate.* keys for the preference metrics (and CLIP score) at tiny or real sizes, random init."""
    import tiny_metrics

    if shape == "tiny":
        return {**tiny_metrics.metric_sections(base), "clip_path": str(tiny_metrics.build_pickscore_dir(base / "clip"))}
    import open_clip
    from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessorPil, CLIPModel

    keys = tiny_metrics.metric_sections(base)            # tokenizer/processor files; the models are replaced
    keys["clip_path"] = str(tiny_metrics.build_pickscore_dir(base / "clip"))
    tok = AutoTokenizer.from_pretrained(keys["pickscore_path"])
    ids = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.eos_token_id)
    # (vision width, layers, heads, patch), (text width, layers, heads), projection: CLIP-H/14 and CLIP-L/14
    for key, (w, layers, heads, patch), (tw, tl, th), proj in (
            ("pickscore_path", (1280, 32, 16, 14), (1024, 24, 16), 1024),
            ("clip_path", (1024, 24, 16, 14), (768, 12, 12), 768)):
        cfg = CLIPConfig(text_config=dict(**ids, hidden_size=tw, intermediate_size=4 * tw,
                                          num_hidden_layers=tl, num_attention_heads=th, max_position_embeddings=77),
                         vision_config=dict(hidden_size=w, intermediate_size=4 * w, num_hidden_layers=layers,
                                            num_attention_heads=heads, image_size=224, patch_size=patch),
                         projection_dim=proj)
        CLIPModel(cfg).save_pretrained(keys[key])
        CLIPImageProcessorPil(size={"shortest_edge": 224},
                              crop_size={"height": 224, "width": 224}).save_pretrained(keys[key])
    torch.save({"state_dict": open_clip.create_model("ViT-H-14", pretrained=None).state_dict()}, keys["hpsv2_path"])
    keys["hpsv2_model"] = "ViT-H-14"
    from pipeline.metrics.imagereward import ImageRewardModel
    from tiny_metrics import to_reference_key

    ir = Path(keys["imagereward_path"])
    med = json.loads((ir / "med_config.json").read_text())
    med.update(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
               max_position_embeddings=512)
    (ir / "med_config.json").write_text(json.dumps(med))
    model = ImageRewardModel(med, vit_width=1024, vit_depth=24, patch=16, image_size=224)
    torch.save({to_reference_key(k): v for k, v in model.state_dict().items()}, ir / "ImageReward.pt")
    return keys


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shape", choices=["tiny", "sd3"], default="tiny")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--nfe", type=int, default=4)
    ap.add_argument("--teacher-nfe", type=int, default=28)
    args = ap.parse_args()
    gpu = args.device.startswith("cuda")

    from pipeline.runner import Unit, write_record
    from pipeline.export import export_student
    from schemas.config import RunConfig
    from stages.evaluate import EvalWorker

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        t0 = time.time()
        pipe = sd3_pipeline(base / "sd3", args.shape)
        keys = metric_models(base / "metrics", args.shape)
        prompts = base / "prompts.txt"
        prompts.write_text("\n".join(f"a photo of object {i}" for i in range(50)) + "\n")
        cfg = RunConfig.model_validate({
            "root": str(base / "runs"), "device": args.device,
            "teacher": {"kind": "sd3", "path": str(pipe), "dtype": "bfloat16" if gpu else "float32"},
            "generate": {"prompts": str(prompts)}, "train": {"methods": ["ota"]},
            "evaluate": {"n_samples": args.samples, "nfes": [args.nfe], "teacher_nfe": args.teacher_nfe,
                         "batch_size": args.batch, "metric_dtype": "bfloat16" if gpu else "float32", **keys}})
        print(f"built pipeline + metric models in {time.time() - t0:.1f}s ({args.shape}, {args.device})")
        from diffusers import SD3Transformer2DModel

        run = cfg.train_runs(["ota"])[0]
        export_student(cfg.train_dir(run) / "export", run, SD3Transformer2DModel.from_pretrained(str(pipe / "transformer")),
                       cfg, None)
        write_record(cfg.train_dir(run), "export", "done")
        t0 = time.time()
        worker = EvalWorker(cfg.model_dump(mode="json"))
        print(f"worker start (teacher + {len(worker.metrics)} metric models loaded once): {time.time() - t0:.1f}s")
        from pipeline.metrics.base import Samples
        from stages.evaluate import student_checkpoints

        c = student_checkpoints(cfg, ["ota"])[0]
        common = {"schedule": "fixed", "seed": 0, "prompt_set": "bench", "prompt_hash": "-"}
        teacher_p = {"kind": "teacher", "checkpoint": "teacher", "run": "teacher", "train_seed": None,
                     "fingerprint": "-", "nfe": args.teacher_nfe, **common}
        student_p = {"kind": "student", **c, "nfe": args.nfe, **common}
        worker._student(student_p)                                  # load outside the clock
        n = args.samples
        print(f"{'unit':28s} {'samples/s':>10s} {'scores/s (all metrics)':>24s}")
        for name, p in (("teacher", teacher_p), (f"student {args.nfe} NFE", student_p)):
            rec = worker.run(Unit(f"bench-{p['kind']}", p))
            print(f"{name:28s} {n / rec['sampling_seconds']:10.2f} {n / max(rec['scoring_seconds'], 1e-9):24.2f}")
        x, images, idx, seeds = worker.generate(student_p)
        samples = Samples("student", 0, x, images, [worker.prompts[int(i)] for i in idx], seeds, "bench-alone")
        total = rec["sampling_seconds"]
        print(f"{'metric':28s} {'images/s':>10s}")
        for metric in worker.metrics:
            if gpu:
                torch.cuda.synchronize()
            t = time.time()
            metric.score(samples)
            if gpu:
                torch.cuda.synchronize()
            dt = time.time() - t
            total += dt
            print(f"{metric.name:28s} {n / dt:10.2f}")
        print(f"10k student samples with every metric: {10000 * total / n / 60:.1f} min projected "
              f"({n} samples measured, batch {args.batch}, {args.device})")


if __name__ == "__main__":
    main()
