"""`flowsteer plan`: memory per GPU and generate's cost, from the teacher's configs alone (no weights loaded).

The teacher's networks are built on the meta device (exact parameter counts, no storage). Per GPU, in bytes:

    teacher      its transformer at teacher.dtype
    encoders     what loads beside it: text encoders, VAE, a weak (autoguidance) model, at teacher.dtype
    masters      the student's float32 weights: all P parameters (full), the adapters A (lora)
    grads        float32, as the masters
    optimizer    AdamW's two float32 moments: 8 bytes a trained parameter
    ema          the float32 EMA of what trains (4 bytes a trained parameter); SCFlow adds its target (4 more)
    disc         the discriminator's heads (weights, grads, AdamW); its frozen backbone is the teacher's own
                 blocks (pipeline/methods/discriminator.py), so it adds no weights
    activations  what autograd saves for backward, counted exactly: one forward of the transformer on the
                 meta device with a saved-tensor hook (unique tensors, weights left out) at one row, in the
                 compute dtype (bf16/fp16 under mixed precision); the s x s attention probabilities are left
                 out (SDPA's fused kernels keep none); times rows per GPU and the method's `graph_calls`,
                 times BACKWARD_WORKSPACE for the gradients backward holds beside them

DDP keeps all of it on every GPU; FSDP (fully_shard per block: a projection, train does not shard yet) divides masters, grads, optimizer and EMA by
the GPU count and adds the two largest blocks gathered at the compute dtype; LoRA keeps one base copy (the
teacher's) and trains A = sum over targeted Linear layers of r (in + out).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import UserError

GIB = 1024 ** 3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Peak activation memory / saved-tensor bytes: measured by bench/memory_plan.py (CPU, 12 x 768 SD3-shaped
# student, batch 2 and 8): the peak RSS grows 0.28-0.30 GB a row where the saved tensors are 0.195 GB a row.
BACKWARD_WORKSPACE = 1.5

# Public transformer configs (the models' transformer/config.json) for planning without any files.
SHAPES = {
    "sd3-medium": ("SD3Transformer2DModel", dict(
        sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
        num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
        pos_embed_max_size=192), 333, "sd3"),
    "sd3.5-large": ("SD3Transformer2DModel", dict(
        sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=38, attention_head_dim=64,
        num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432, pooled_projection_dim=2048,
        pos_embed_max_size=192, qk_norm="rms_norm"), 333, "sd3"),
    "flux-dev": ("FluxTransformer2DModel", dict(
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56)), 512, "flux"),
}
# text encoders + VAE of those pipelines, built on meta from their public configs (CLIP-L/G, T5-XXL, the VAE)
ENCODERS = {"sd3": ("clip-l", "clip-g", "t5-xxl", "vae16"), "flux": ("clip-l", "t5-xxl", "vae16")}


@dataclass
class Teacher:
    """What the plan needs of the teacher: its transformer on meta, token counts, encoder parameters."""
    transformer: torch.nn.Module
    image_tokens: int
    text_tokens: int
    encoder_params: int = 0
    name: str = ""

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.transformer.parameters())

    def blocks(self) -> list[torch.nn.Module]:
        t = self.transformer
        return [*getattr(t, "transformer_blocks", []), *getattr(t, "single_transformer_blocks", [])]

    @property
    def width(self) -> int:
        c = self.transformer.config
        return c.num_attention_heads * c.attention_head_dim


@dataclass
class Line:
    mode: str
    parts: dict[str, int] = field(default_factory=dict)
    trained: int = 0

    @property
    def total(self) -> int:
        return sum(self.parts.values())


def on_meta(build):
    """Run `build()` with every new tensor on the meta device: shapes and counts, no storage."""
    with torch.device("meta"):
        return build()


def _encoder(name: str) -> torch.nn.Module:
    import transformers
    from diffusers import AutoencoderKL

    if name == "vae16":
        return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                             down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                             layers_per_block=2, use_quant_conv=False, use_post_quant_conv=False)
    if name == "t5-xxl":
        return transformers.T5EncoderModel(transformers.T5Config(d_model=4096, d_ff=10240, d_kv=64, num_heads=64,
                                                                 num_layers=24, feed_forward_proj="gated-gelu"))
    hidden, layers, heads = {"clip-l": (768, 12, 12), "clip-g": (1280, 32, 20)}[name]
    return transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=4 * hidden,
        projection_dim=hidden, max_position_embeddings=77))


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def shape_teacher(name: str, resolution: int | None = None) -> Teacher:
    """A named public shape (SHAPES) at `resolution` pixels (default the model's 1024)."""
    import diffusers

    if name not in SHAPES:
        raise UserError(f"--shape '{name}' is not one of {', '.join(SHAPES)}")
    cls, kwargs, text_tokens, family = SHAPES[name]
    net = on_meta(lambda: getattr(diffusers, cls)(**kwargs))
    latent = (resolution or 1024) // 8
    image_tokens = (latent // 2) ** 2                      # patch 2 (SD3) or 2x2 packing (Flux)
    enc = sum(on_meta(lambda n=n: count(_encoder(n))) for n in ENCODERS[family])
    return Teacher(net, image_tokens, text_tokens, enc, name)


def config_teacher(cfg) -> Teacher:
    """The configured teacher from its configs: sd3 dir (config.json files), embedded, exact, or byo (its
    factory called with device='meta' under the meta device)."""
    from pipeline.teachers import describe_teacher

    kind = cfg.teacher.kind
    if kind == "byo":                     # its factory on meta: shapes from it unless teacher.describe says them
        from pipeline.teachers import _import

        factory = _import(cfg.teacher.factory, "teacher.factory")
        built = on_meta(lambda: factory(device="meta", **cfg.teacher.kwargs))
        net = built.transformer
        enc = sum(count(m) for m in vars(built).values() if isinstance(m, torch.nn.Module) and m is not net)
        sample_shape, text = tuple(built.sample_shape), _text_tokens(built)
        if cfg.teacher.describe:
            layout = describe_teacher(cfg)
            sample_shape = layout.sample_shape
            text = int(layout.cond_shapes.get("encoder_hidden_states", (0,))[0])
    else:
        layout = describe_teacher(cfg)
        sample_shape = layout.sample_shape
        text = int(layout.cond_shapes.get("encoder_hidden_states", (0,))[0])
    h, w = sample_shape[-2:]
    if kind == "sd3":
        import diffusers

        p = Path(cfg.teacher.path)
        tc = json.loads((p / "transformer" / "config.json").read_text())
        cls = getattr(diffusers, tc.get("_class_name", "SD3Transformer2DModel"))
        net = on_meta(lambda: cls.from_config({k: v for k, v in tc.items() if not k.startswith("_")}))
        enc = _dir_encoder_params(p)
    elif kind == "embedded":
        from pipeline.teachers.embedded import make_transformer

        net = on_meta(lambda: make_transformer(cfg.teacher.embedded))
        enc = count(net)                  # its weak checkpoint (autoguidance), loaded beside it
    elif kind == "exact":                 # an analytic teacher: the transformer is the students' init
        from pipeline.teachers.exact import make_init_transformer

        net, enc = on_meta(lambda: make_init_transformer(cfg.teacher.exact)), 0
    patch = int(getattr(net.config, "patch_size", 1) or 1)
    return Teacher(net, (h // patch) * (w // patch), text, enc, kind)


def _text_tokens(teacher) -> int:
    """Context tokens of a meta-built byo teacher's prompt encoding (0 when its encoder cannot run there)."""
    try:
        with torch.no_grad():
            return int(teacher.encode([""])["encoder_hidden_states"].shape[1])
    except Exception:  # noqa: BLE001  (a real encoder on meta: no values to run on)
        return 0


def _dir_encoder_params(p: Path) -> int:
    """Text encoders and VAE of a diffusers pipeline dir, built on meta from their config.json."""
    import diffusers
    import transformers

    total = 0
    for sub in sorted(p.iterdir()):
        conf = sub / "config.json"
        if sub.name == "transformer" or not conf.is_file():
            continue
        data = json.loads(conf.read_text())
        if "architectures" in data:
            config = transformers.AutoConfig.from_pretrained(str(sub))
            cls = getattr(transformers, data["architectures"][0])
            total += on_meta(lambda: count(cls(config)))
        elif data.get("_class_name") and hasattr(diffusers, data["_class_name"]):
            cls = getattr(diffusers, data["_class_name"])
            total += on_meta(lambda: count(cls.from_config({k: v for k, v in data.items() if not k.startswith("_")})))
    return total


def _meta_inputs(teacher: Teacher, dtype: torch.dtype) -> dict[str, Any]:
    """One row of the transformer's inputs at the planned token counts, on meta."""
    c = teacher.transformer.config
    kw = {"dtype": dtype, "device": "meta"}
    text = max(1, teacher.text_tokens)
    args = {"encoder_hidden_states": torch.zeros(1, text, c.joint_attention_dim, **kw),
            "pooled_projections": torch.zeros(1, c.pooled_projection_dim, **kw),
            "timestep": torch.ones(1, device="meta"), "return_dict": False}
    if type(teacher.transformer).__name__.startswith("Flux"):
        n = teacher.image_tokens
        args.update(hidden_states=torch.zeros(1, n, c.in_channels, **kw), img_ids=torch.zeros(n, 3, device="meta"),
                    txt_ids=torch.zeros(text, 3, device="meta"))
        if c.guidance_embeds:
            args["guidance"] = torch.ones(1, device="meta")
    else:
        side = int(math.isqrt(teacher.image_tokens)) * c.patch_size
        args["hidden_states"] = torch.zeros(1, c.in_channels, side, side, **kw)
    return args


def activation_bytes(teacher: Teacher, dtype_bytes: int) -> int:
    """Bytes autograd saves in one forward of one row (see the module docstring), counted on meta."""
    dtype = torch.float32 if dtype_bytes == 4 else torch.bfloat16
    net = teacher.transformer.float() if dtype_bytes == 4 else teacher.transformer.bfloat16()
    net.requires_grad_(True)              # a full student: every weight trains (a teacher's come frozen)
    params = {id(p) for p in net.parameters()}
    tokens = teacher.image_tokens + max(1, teacher.text_tokens)
    saved: dict[int, torch.Tensor] = {}

    def pack(t):
        base = t._base if t._base is not None else t
        square = t.dim() >= 2 and t.shape[-1] == t.shape[-2] and t.shape[-1] in (tokens, teacher.image_tokens)
        if id(base) not in params and not square:
            saved.setdefault(id(base), base)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net(**_meta_inputs(teacher, dtype))
    return sum(t.numel() * t.element_size() for t in saved.values())


def lora_params(net: torch.nn.Module, rank: int, targets: list[str]) -> int:
    """Exactly what peft adds: r (in + out) per Linear whose name is a target or ends with '.' + target."""
    total = 0
    for name, m in net.named_modules():
        if isinstance(m, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            total += rank * (m.in_features + m.out_features)
    return total


def disc_head_params(teacher: Teacher, blocks: int | None) -> int:
    from pipeline.methods.discriminator import TokenHead, default_disc_blocks

    blocks = default_disc_blocks(len(teacher.transformer.transformer_blocks)) if blocks is None else blocks
    return blocks * on_meta(lambda: count(TokenHead(teacher.width, teacher.width)))


def plan(cfg, teacher: Teacher, method: str = "flowsteer", gpus: int = 1, batch_size: int | None = None) -> list[Line]:
    """Per GPU bytes for full/DDP, full/FSDP over `gpus` and LoRA, at `batch_size` rows in total (default
    train.batch_size), for one method's run."""
    tc = cfg.train
    tdt = DTYPE_BYTES[cfg.teacher.dtype]
    mp = tc.mixed_precision != "no"
    P = teacher.params
    A = lora_params(teacher.transformer, tc.student.rank, list(tc.student.target_modules))
    from pipeline.methods import get_method

    m = get_method(method)
    adversarial = m.uses_adversarial
    heads = disc_head_params(teacher, tc.adversarial.disc_blocks) if adversarial else 0
    rows = max(1, math.ceil((batch_size or tc.batch_size) / gpus))
    blocks = teacher.blocks()
    per_row = activation_bytes(teacher, {"no": 4}.get(tc.mixed_precision, 2))
    act = int(m.graph_calls * BACKWARD_WORKSPACE * per_row * rows)
    biggest = sorted((count(b) for b in blocks), reverse=True)[:2]
    common = {"teacher": P * tdt, "encoders": teacher.encoder_params * tdt, "disc": heads * 16, "activations": act}
    # SCFlow's target EMA of what trains; on a CPU device the EMA's copy of the initial weights (trainer.EMA
    # .origin, kept on the CPU) shares the same memory
    target = (4 if method == "scflow" else 0) + (4 if cfg.device == "cpu" else 0)
    full = {"masters": 4 * P, "grads": 4 * P, "optimizer": 8 * P, "ema": (4 + target) * P}
    lines = [Line("full/ddp", {**common, **full}, P),
             Line(f"full/fsdp x{gpus}", {**common, **{k: math.ceil(v / gpus) for k, v in full.items()},
                                          "gathered": sum(biggest) * (2 if mp else 4) if gpus > 1 else 0}, P),
             Line("lora", {**common, "masters": 4 * A, "grads": 4 * A, "optimizer": 8 * A, "ema": (4 + target) * A}, A)]
    return lines


def generate_cost(cfg, teacher_rows_per_s: float | None = None) -> dict[str, Any]:
    """What `flowsteer generate` writes and costs: the store's states (window edges, and every teacher step with
    generate.record_every_step) and per-row conditions (their non-zero extent's chunks), uncompressed; teacher
    forward rows (CFG: 2 per step)."""
    from pipeline.datasets import generate_prompts
    from pipeline.teachers import describe_teacher

    layout = describe_teacher(cfg)
    prompts = generate_prompts(cfg)
    n_prompts = len(prompts) if hasattr(prompts, "__len__") else int(prompts)
    samples = n_prompts * cfg.generate.samples_per_prompt
    sch = cfg.schedule
    sbytes = DTYPE_BYTES[cfg.generate.store_dtype]
    per_row = math.prod(layout.sample_shape) * sbytes
    state_bytes = samples * per_row * (sch.windows + 1 + (sch.teacher_steps + 1 if cfg.generate.record_every_step else 0))
    cond_bytes = (samples + 1) * sbytes * sum(_written(s, layout.cond_extents.get(k))    # per row + null
                                              for k, s in layout.cond_shapes.items())
    forwards = samples * sch.teacher_steps * 2
    out = {"prompts": n_prompts, "samples": samples, "store_bytes": state_bytes + cond_bytes,
           "teacher_forward_rows": forwards}
    if teacher_rows_per_s:
        out["gpu_hours"] = forwards / teacher_rows_per_s / 3600
    return out


def _written(row_shape, extent) -> int:
    """Elements of a condition row the store writes: the chunks covering its non-zero extent (row_arrays.row_chunk)."""
    from pipeline.row_arrays import row_chunk

    chunk = row_chunk(row_shape, extent)
    return math.prod(-(-min(int(e), n) // c) * c for n, e, c in zip(row_shape, extent, chunk)) if extent else \
        math.prod(row_shape)


def check_fits(cfg, methods: list[str]) -> None:
    """`train` refuses, in one line and before loading anything, a run whose plan exceeds the per-GPU budget:
    train.gpu_memory_gb, else on CUDA the device's own memory; no budget, no check."""
    budget = cfg.train.gpu_memory_gb
    if budget is None and cfg.device.startswith("cuda") and torch.cuda.is_available():
        index = int(cfg.device.split(":")[1]) if ":" in cfg.device else 0
        budget = torch.cuda.get_device_properties(index).total_memory / 1e9
    if budget is None:
        return
    teacher = config_teacher(cfg)
    mode = "lora" if cfg.train.student.kind == "lora" else "full/ddp"
    for method in methods:
        line = next(ln for ln in plan(cfg, teacher, method, cfg.train.workers) if ln.mode.startswith(mode))
        if line.total > budget * 1e9:
            raise UserError(f"train: {method} needs ~{line.total / 1e9:.1f} GB per GPU ({mode}, batch "
                            f"{cfg.train.batch_size} over {cfg.train.workers}) but the budget is {budget:.3g} GB; "
                            f"see `flowsteer plan` (LoRA, FSDP, a smaller train.batch_size)")


def render(lines: list[Line], budget_gb: float | None, title: str) -> str:
    keys = ["teacher", "encoders", "masters", "grads", "optimizer", "ema", "disc", "gathered", "activations"]
    head = f"{'mode':<14}" + "".join(f"{k:>12}" for k in keys) + f"{'total GB':>10}{'trained':>15}"
    rows = [title, head]
    for ln in lines:
        cells = "".join(f"{ln.parts.get(k, 0) / 1e9:>12.2f}" for k in keys)
        fits = "" if budget_gb is None else ("  fits" if ln.total <= budget_gb * 1e9 else "  DOES NOT FIT")
        rows.append(f"{ln.mode:<14}{cells}{ln.total / 1e9:>10.2f}{ln.trained:>15,}{fits}")
    return "\n".join(rows)


def plan_cli(cfg, gpus: int, gpu_memory: float | None, shape: str | None, resolution: int | None,
             throughput: float | None, methods: list[str] | None, batch_size: int | None = None) -> str:
    teacher = shape_teacher(shape, resolution) if shape else config_teacher(cfg)
    budget = gpu_memory if gpu_memory is not None else cfg.train.gpu_memory_gb
    out = [f"teacher {shape or cfg.teacher.kind}: {teacher.params:,} transformer parameters, "
           f"{teacher.encoder_params:,} in text encoders + VAE; {teacher.image_tokens} image + "
           f"{teacher.text_tokens} text tokens; teacher.dtype {cfg.teacher.dtype}, mixed_precision "
           f"{cfg.train.mixed_precision}, LoRA rank {cfg.train.student.rank}"]
    for method in methods or cfg.train.methods:
        method = cfg.train.variants[method].method if method in cfg.train.variants else method
        lines = plan(cfg, teacher, method, gpus, batch_size)
        out.append(render(lines, budget, f"\n{method}: GB per GPU at batch {batch_size or cfg.train.batch_size} "
                          f"over {gpus} GPU(s)"
                          + (f", budget {budget:g} GB" if budget else "")))
    if not shape:
        cost = generate_cost(cfg, throughput)
        hours = f", {cost['gpu_hours']:.2f} GPU-hours at {throughput:g} rows/s" if "gpu_hours" in cost else ""
        out.append(f"\ngenerate: {cost['samples']:,} samples of {cost['prompts']:,} prompts -> store "
                   f"{cost['store_bytes'] / 1e9:.3f} GB; {cost['teacher_forward_rows']:,} teacher forward rows"
                   f"{hours}")
    return "\n".join(out)

