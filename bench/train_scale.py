"""Training at SD3-Medium shapes: prefetch off vs on, OTA vs PeRFlow, generation vs plain diffusers, GPU MFU.

    python bench/train_scale.py [--steps 8] [--rounds 2] [--batch 4] [--threads 2]
    python bench/train_scale.py --device cuda [--batch 8] [--variants eager,compiled,compiled+fused]
                                      # SD3-Medium-size student: step, memory, MFU per variant, side by side

CPU part: a byo teacher with SD3-Medium *shapes* and tiny compute (16x64x64 latents, patch 2 -> 1024 image
tokens, 333 x 4096 text conditions + 2048 pooled, one block of width 16) at teacher.dtype bfloat16, a float16
trajectory store and a float16 real-image latent store (random latents: timings only), bf16 autocast. Prints
  * step time and data-wait share (the time a step waits for its batch / step time) with train.prefetch 0
    and 1 and with one loader worker process (train.loader_workers 1), for perflow (x0 from the latent store) and ota (cache + train.online_fraction 0.25 online);
    target with prefetch on: data-wait share <= 2%;
  * the OTA / PeRFlow step ratio (prefetch on); target <= 1.2x;
  * flowsteer's generation (GenerateWorker on a tiny random SD3 pipeline dir) against what a user would write
    without flowsteer: StableDiffusion3Pipeline with callback_on_step_end recording the window-edge latents,
    output_type "latent", the same prompts, batch, steps and CFG forwards; samples/s of each.
Variants run in blocks (prefetch threads drained between blocks, the first step of a block not timed),
interleaved over --rounds so machine load hits all alike. Numbers: docs/precision.md.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipeline.teachers.base import TransformerTeacher  # noqa: E402
from schemas.config import RunConfig  # noqa: E402

LATENT = (16, 64, 64)            # SD3 latents of a 512 px image
TOKENS, TEXT_DIM, POOLED_DIM = 333, 4096, 2048     # 77 CLIP + 256 T5 tokens; T5-XXL width; CLIP-L + CLIP-G pooled


CLIP_TOKENS, CLIP_DIM = 77, 2048                   # SD3 without T5: only this block of a text condition is not zero


def _text(prompts: list[str], no_t5: bool = False) -> dict[str, torch.Tensor]:
    """Deterministic stand-in text encoder at SD3's condition shapes ("" -> zeros, as CFG's null); `no_t5`: zeros
    past CLIP's 77 tokens x 2048 features, as SD3's encode_prompt pads without T5."""
    ctx, pooled = [], []
    for p in prompts:
        g = torch.Generator().manual_seed(zlib.crc32(p.encode()))
        ctx.append(torch.randn(TOKENS, TEXT_DIM, generator=g) if p else torch.zeros(TOKENS, TEXT_DIM))
        if no_t5:
            ctx[-1][CLIP_TOKENS:] = 0
            ctx[-1][:, CLIP_DIM:] = 0
        pooled.append(torch.randn(POOLED_DIM, generator=g) if p else torch.zeros(POOLED_DIM))
    return {"encoder_hidden_states": torch.stack(ctx), "pooled_projections": torch.stack(pooled)}


def describe_scale_teacher(no_t5: bool = False, **_):
    """byo describe: the scale teacher's layout without building it (and, `no_t5`, its conditions' extent)."""
    from pipeline.teachers.base import TeacherLayout

    return TeacherLayout.of(LATENT, {"encoder_hidden_states": (TOKENS, TEXT_DIM), "pooled_projections": (POOLED_DIM,)},
                            LATENT, {"encoder_hidden_states": (CLIP_TOKENS, CLIP_DIM)} if no_t5 else None)


def make_scale_teacher(device="cpu", width: int = 16, layers: int = 1, seed: int = 0, no_t5: bool = False):
    """byo factory: an SD3Transformer2DModel with SD3-Medium's input/condition shapes and tiny compute."""
    from diffusers import SD3Transformer2DModel

    def net(s):
        torch.manual_seed(s)
        return SD3Transformer2DModel(sample_size=LATENT[1], patch_size=2, in_channels=LATENT[0], out_channels=LATENT[0],
                                     num_layers=layers, attention_head_dim=width // 2, num_attention_heads=2,
                                     joint_attention_dim=TEXT_DIM, caption_projection_dim=width,
                                     pooled_projection_dim=POOLED_DIM, pos_embed_max_size=LATENT[1] // 2).to(device)

    return TransformerTeacher(net(seed), lambda prompts: _text(prompts, no_t5),
                              lambda x: (x[:, :3].clamp(-1, 1) + 1) / 2, LATENT, weak_transformer=net(seed + 1))


def scale_config(root: Path, prompts: int, per_prompt: int, no_t5: bool = False) -> RunConfig:
    prompt_file = root / "prompts.txt"
    root.mkdir(parents=True, exist_ok=True)
    prompt_file.write_text("".join(f"scale prompt {i}\n" for i in range(prompts)))
    teacher = {"kind": "byo", "factory": "bench.train_scale:make_scale_teacher", "dtype": "bfloat16"}
    if no_t5:
        teacher.update(describe="bench.train_scale:describe_scale_teacher", kwargs={"no_t5": True})
    return RunConfig.model_validate({
        "root": str(root / "runs"), "device": "cpu",
        "teacher": teacher,
        "schedule": {"shift": 3.0, "teacher_steps": 8, "windows": 4},
        "generate": {"prompts": str(prompt_file), "samples_per_prompt": per_prompt, "shard_size": 16,
                     "batch_size": 8, "store_dtype": "float16"},
        "data": {"images": str(root / "images")},
        "train": {"steps": 100_000, "batch_size": 4, "mixed_precision": "bf16", "online_fraction": 0.25}})


def write_latent_store(cfg: RunConfig, rows: int) -> None:
    """A finished float16 latent store at the run's latent_store_dir: random latents, real-shaped conditions."""
    from pipeline.latents import LatentStore, latent_store_dir
    from pipeline.runner import write_record
    from pipeline.rowstore import shard_key

    out = latent_store_dir(cfg)
    if (out / "latents.zarr").is_dir():
        return
    shapes = {"encoder_hidden_states": (TOKENS, TEXT_DIM), "pooled_projections": (POOLED_DIM,)}
    store = LatentStore.create(out / "latents.zarr", {"format": 1, "bench": True}, rows, LATENT, shapes, 16, "float16")
    g = torch.Generator().manual_seed(0)
    for j in range(store.num_shards):
        lo, hi = store.shard_range(j)
        cond = _text([f"caption {i}" for i in range(lo, hi)])
        digest = store.write_shard(j, torch.randn(hi - lo, *LATENT, generator=g), cond,
                                   _text([""]) if j == 0 else None)
        write_record(out, shard_key(j), "done", checksum=digest)


def timed_block(trainer, steps: int) -> tuple[list[float], list[float], float]:
    """(step seconds, seconds waiting for the batch, store/latent read seconds) of `steps` steps after one
    untimed step."""
    trainer.train_step()                                   # refills the loader's pipeline
    times, waits = [], []
    r0 = trainer.solves.teacher_seconds
    for _ in range(steps):
        t0, w0 = time.perf_counter(), trainer.loader.wait_seconds
        trainer.train_step()
        times.append(time.perf_counter() - t0)
        waits.append(trainer.loader.wait_seconds - w0)
    trainer.loader.discard()                               # nothing drawn in the background of the next block
    return times, waits, trainer.solves.teacher_seconds - r0


def bench_training(args) -> None:
    from pipeline.cli import run_stage
    from pipeline.teachers import load_teacher
    from pipeline.trainer import Trainer
    from stages.train import open_store

    root = Path(tempfile.gettempdir()) / "flowsteer-bench-train-scale"      # stable: reruns reuse the stores
    cfg = scale_config(root, prompts=24, per_prompt=2)
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"batch_size": args.batch})})
    run_stage("generate", cfg, "local")
    write_latent_store(cfg, rows=48)
    store = open_store(cfg)
    teacher = load_teacher(cfg)
    trainers = {}
    variants = {0: {"prefetch": 0}, 1: {"prefetch": 1}, "1 worker": {"prefetch": 1, "loader_workers": 1}}
    for method in ("perflow", "ota"):
        for depth, over in variants.items():
            c = cfg.model_copy(update={"train": cfg.train.model_copy(update=over)})
            trainers[method, depth] = Trainer(c, method, teacher, store, "cpu")
    cached = trainers["ota", 0].rows._cond_cache is not None
    print(f"store: {store.num_samples} trajectories, {store.store_dtype}, 24 prompts' conditions "
          f"{'held in memory' if cached else 'read from the store every batch'}; latent store float16, 48 rows; "
          f"batch {args.batch}, teacher bf16, bf16 autocast, {torch.get_num_threads()} threads")
    results = {key: ([], [], [0.0]) for key in trainers}
    for _ in range(args.rounds):
        for key, trainer in trainers.items():
            times, waits, reads = timed_block(trainer, args.steps)
            results[key][0].extend(times)
            results[key][1].extend(waits)
            results[key][2][0] += reads
    for trainer in trainers.values():
        trainer.close()
    med = {}
    for (method, depth), (times, waits, (teach,)) in results.items():
        med[method, depth] = statistics.median(times)
        name = f"prefetch {depth}" if isinstance(depth, int) else depth
        print(f"{method:8s} {name}: step {med[method, depth]:.3f} s (median of {len(times)}), "
              f"data wait {100 * sum(waits) / sum(times):.1f}% of the step (teacher solves for the batch "
              f"{100 * teach / sum(times):.1f}%)")
    print(f"OTA (cache + 25% online) / PeRFlow step, prefetch on: {med['ota', 1] / med['perflow', 1]:.2f}x "
          f"(target <= 1.2x); prefetch on / off: perflow {med['perflow', 1] / med['perflow', 0]:.2f}x, "
          f"ota {med['ota', 1] / med['ota', 0]:.2f}x")


# ---------------------------------------------------------------- generation vs plain diffusers
def bench_generation(args) -> None:
    from pipeline.cli import run_stage
    from pipeline.store import store_meta
    from stages.generate import GenerateWorker, jobs
    from tiny_sd3 import build_tiny_sd3_pipeline, load_tiny_sd3_pipeline

    root = Path(tempfile.mkdtemp(prefix="flowsteer-bench-gen-"))
    pipe_dir = build_tiny_sd3_pipeline(root / "pipe")
    n_prompts, batch, steps, windows, w = 32, 16, 32, 4, 4.0
    (root / "prompts.txt").write_text("".join(f"a photo of thing {i}\n" for i in range(n_prompts)))
    cfg = RunConfig.model_validate({
        "root": str(root / "runs"), "teacher": {"kind": "sd3", "path": str(pipe_dir)},
        "schedule": {"shift": 3.0, "teacher_steps": steps, "windows": windows},
        "generate": {"prompts": str(root / "prompts.txt"), "samples_per_prompt": 1, "shard_size": batch,
                     "batch_size": batch, "guidance": [w, w], "store_dtype": "float16",
                     "cpus_per_worker": torch.get_num_threads()}})
    run_stage("generate", cfg, "local")                    # creates the store (and fills it once: warm-up)
    (job,) = jobs(cfg)
    worker = GenerateWorker(cfg, store_meta(cfg))          # what each generate unit runs, teacher loaded once
    pipe = load_tiny_sd3_pipeline(pipe_dir)                # from_pretrained, T5 left out as flowsteer does
    pipe.set_progress_bar_config(disable=True)
    prompts = [f"a photo of thing {i}" for i in range(n_prompts)]
    edges = set(range(0, steps + 1, steps // windows))
    fs, df = [], []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        for unit in job.units:
            worker.run(unit)                                # ODE + recording + the shard's write
        fs.append(n_prompts / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        for i in range(0, n_prompts, batch):
            recorded = []

            def record(p, step, t, kw):
                if step + 1 in edges:                       # latents after step i = the state at grid point i + 1
                    recorded.append(kw["latents"].float().cpu().numpy())
                return kw

            pipe(prompts[i:i + batch], num_inference_steps=steps, guidance_scale=w, output_type="latent",
                 callback_on_step_end=record, callback_on_step_end_tensor_inputs=["latents"],
                 generator=torch.Generator().manual_seed(i))
        df.append(n_prompts / (time.perf_counter() - t0))
    f, d = statistics.median(fs), statistics.median(df)
    print(f"generation, tiny random SD3 pipeline ({batch}/batch, {steps} steps, CFG, {windows} window edges "
          f"recorded, {n_prompts} samples): flowsteer {f:.1f} samples/s (into a float16 store), plain "
          f"StableDiffusion3Pipeline + callback_on_step_end {d:.1f} samples/s -> {f / d:.2f}x")


# ---------------------------------------------------------------- GPU: SD3-Medium-size student
VARIANTS = {   # --variants: how the student steps (pipeline/fast_step.py, what train.compile etc. switch on)
    "eager": dict(compile=False, fused=False, checkpointing=False),
    "compiled": dict(compile=True, fused=False, checkpointing=False),
    "compiled+fused": dict(compile=True, fused=True, checkpointing=False),
    "compiled+fused+ckpt": dict(compile=True, fused=True, checkpointing=True),
}


def bench_cuda(args) -> None:
    for name in args.variants.split(","):
        bench_cuda_variant(args, name, **VARIANTS[name])
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def bench_cuda_variant(args, name: str, compile: bool, fused: bool, checkpointing: bool) -> None:
    """SD3-Medium-size random-init transformer (24 blocks, 1536 wide): float32 masters, bf16 autocast, AdamW;
    optionally its blocks compiled, fused AdamW, gradient checkpointing (TF32 on CUDA in every variant)."""
    from diffusers import SD3Transformer2DModel
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.fast_step import adamw, compile_blocks, enable_gradient_checkpointing, use_tf32

    dev = torch.device(args.device)
    use_tf32(dev)
    net = SD3Transformer2DModel(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=args.layers,
                                attention_head_dim=64, num_attention_heads=24, joint_attention_dim=TEXT_DIM,
                                caption_projection_dim=1536, pooled_projection_dim=POOLED_DIM,
                                pos_embed_max_size=192).to(dev).train()
    opt = adamw(net.parameters(), 1e-5, 0.0, dev, fused=fused)
    b = args.batch
    x = torch.randn(b, *LATENT, device=dev)
    cond = {"encoder_hidden_states": torch.randn(b, TOKENS, TEXT_DIM, device=dev),
            "pooled_projections": torch.randn(b, POOLED_DIM, device=dev)}
    t = torch.rand(b, device=dev) * 1000

    def step():
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            v = net(hidden_states=x, timestep=t, return_dict=False, **cond)[0]
            loss = torch.nn.functional.mse_loss(v.float(), x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    with FlopCounterMode(display=False) as counter:       # the student's forward + backward FLOPs (eager)
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            net(hidden_states=x, timestep=t, return_dict=False, **cond)[0].float().mean().backward()
    opt.zero_grad(set_to_none=True)
    flops = counter.get_total_flops()
    if checkpointing:
        enable_gradient_checkpointing(net)
    if compile:
        compile_blocks(net)
    t_warm = time.perf_counter()
    for _ in range(3):                                     # compiles here
        step()
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    dt = (time.perf_counter() - t0) / args.steps
    params = sum(p.numel() for p in net.parameters()) / 1e9
    achieved = flops / dt
    line = (f"[{name}] SD3-Medium-size student ({args.layers} blocks, 1536 wide, {params:.2f} B params), batch {b}, "
            f"16x64x64 latents + {TOKENS} text tokens, bf16 autocast, fp32 AdamW{' (fused)' if fused else ''}: step "
            f"{dt:.3f} s, {achieved / 1e12:.1f} TFLOP/s (fwd+bwd {flops / 1e12:.2f} TFLOP; warm-up incl. compile "
            f"{t0 - t_warm:.0f} s)")
    if dev.type == "cuda":
        peak = args.peak_tflops * 1e12
        line += (f", peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB, MFU {100 * achieved / peak:.1f}% "
                 f"of {args.peak_tflops:.0f} TFLOP/s ({torch.cuda.get_device_name()})")
    print(line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per block")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--layers", type=int, default=24, help="--device cuda: transformer blocks (SD3-Medium: 24)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100 SXM: 989)")
    ap.add_argument("--variants", default="eager", help=f"--device cuda, comma-separated: {', '.join(VARIANTS)}")
    ap.add_argument("--only", choices=["train", "generate", "student"], help="run one part")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.device != "cpu" or args.only == "student":
        args.batch = args.batch or 8
        bench_cuda(args)
        return
    args.batch = args.batch or 4
    if args.only in (None, "train"):
        bench_training(args)
    if args.only in (None, "generate"):
        bench_generation(args)


if __name__ == "__main__":
    main()
