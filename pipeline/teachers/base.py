"""The teacher interface: a velocity field v(x, sigma, cond) plus prompt encoding.

Any object with these members can be a teacher (bring your own: `teacher.kind: byo`). Conditions are
dicts of batch-first tensors; the SD3 family uses the diffusers argument names below.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Teacher(Protocol):
    sample_shape: tuple[int, ...]      # one sample's (C, H, W) in the space the ODE runs in (latents)
    device: torch.device

    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Prompt conditions, batch-first; the empty prompt "" is the unconditional (CFG) condition."""

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """v = eps - x0 at x_sigma = (1 - sigma) x0 + sigma eps; sigma has shape [B], in [0, 1]."""

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Samples to images in [0, 1], shape [B, C, H, W] (VAE decode for latent teachers)."""

    # Optional: `encode_images(images [B, C, H, W] in [-1, 1]) -> latents [B, *sample_shape]` (real-image
    # latents for `flowsteer encode`; SD3: the VAE with its shift and scaling factor).


@dataclass(frozen=True)
class TeacherLayout:
    """What planning and store creation need to know about a teacher, read without building its networks:
    one sample's shape, each condition's per-row shape (batch dim left out) and the pixel shape its
    `encode_images` takes (None when it has none). `cond_extents`: for a condition whose rows are zero past a
    leading block (SD3 without T5: 77 CLIP tokens x 2048 features of 333 x 4096), that block; the stores then
    neither write nor read the zeros (pipeline/row_arrays.py `row_chunk`)."""
    sample_shape: tuple[int, ...]
    cond_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    image_shape: tuple[int, ...] | None = None
    cond_extents: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @classmethod
    def of(cls, sample_shape, cond_shapes, image_shape=None, cond_extents=None) -> "TeacherLayout":
        return cls(tuple(int(s) for s in sample_shape), {k: tuple(int(s) for s in v) for k, v in cond_shapes.items()},
                   tuple(int(s) for s in image_shape) if image_shape is not None else None,
                   {k: tuple(int(s) for s in v) for k, v in (cond_extents or {}).items()})


def sd3_velocity(transformer: torch.nn.Module, x: torch.Tensor, sigma: torch.Tensor, cond: dict) -> torch.Tensor:
    """Call an SD3Transformer2DModel in flowsteer's convention (timestep = 1000 sigma).

    The timestep stays float32 whatever the model's dtype, as diffusers' SD3 pipeline passes it (the sinusoidal
    projection is computed in float32 and cast inside the model; a bf16 timestep would round 937.5 to 936)."""
    t = (sigma * 1000).float().expand(x.shape[0])
    return transformer(hidden_states=x, timestep=t, encoder_hidden_states=cond["encoder_hidden_states"],
                       pooled_projections=cond["pooled_projections"], return_dict=False)[0]


class TransformerTeacher:
    """A teacher made of an SD3-family transformer, a prompt encoder and a decoder."""

    def __init__(self, transformer, encode, decode, sample_shape, weak_transformer=None, encode_images=None):
        self._encode_images = encode_images
        self.transformer = transformer.eval().requires_grad_(False)
        self.weak_transformer = weak_transformer.eval().requires_grad_(False) if weak_transformer else None
        self._encode, self._decode = encode, decode
        self.sample_shape = tuple(sample_shape)
        self.device = next(transformer.parameters()).device
        self.dtype = next(transformer.parameters()).dtype
        self._cache: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()

    CACHE_PROMPTS = 1024    # bounded: a worker encoding 10^5 SD3 captions must not keep them all (2.7 MB each)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        missing = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        enc = self._encode(missing) if missing else {}
        fresh = {p: {k: v[i:i + 1].to(self.device, self.dtype) for k, v in enc.items()} for i, p in enumerate(missing)}
        rows = [fresh[p] if p in fresh else self._cache[p] for p in prompts]
        for p in dict.fromkeys(prompts):
            self._cache[p] = fresh[p] if p in fresh else self._cache[p]
            self._cache.move_to_end(p)
        while len(self._cache) > self.CACHE_PROMPTS:
            self._cache.popitem(last=False)
        return {k: torch.cat([r[k] for r in rows]) for k in rows[0]}

    def velocity(self, x, sigma, cond):
        return sd3_velocity(self.transformer, x, sigma, cond)

    def weak_velocity(self, x, sigma, cond):
        """An earlier, weaker checkpoint (autoguidance for Align Your Flow); None if the teacher has none."""
        return sd3_velocity(self.weak_transformer, x, sigma, cond)

    def decode(self, x):
        return self._decode(x)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, C, H, W] in [-1, 1] -> latents [B, *sample_shape] (float32)."""
        if self._encode_images is None:
            raise NotImplementedError("this teacher has no image encoder (encode_images)")
        return self._encode_images(images.to(self.device)).float()


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _cast(value, dtype: torch.dtype):
    """Floating tensors (also inside a condition dict) to `dtype`; anything else unchanged."""
    if isinstance(value, dict):
        return {k: _cast(v, dtype) for k, v in value.items()}
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(dtype)
    return value


class TeacherAtPrecision:
    """Any teacher run at one precision (`teacher.dtype`, docs/precision.md): the one place a teacher is cast.

    Every nn.Module the teacher holds (its transformer, weak transformer, a byo model) is cast to `dtype`; every
    call casts its tensor inputs to `dtype`, runs outside any autocast region (so a student's mixed precision
    never changes the teacher's targets) and returns float32. ODE states, conditions in stores and batches,
    and everything a method computes stay float32; no stage or method casts for the teacher. Other attributes
    (sample_shape, device, transformer, pipeline, ...) are the wrapped teacher's."""

    def __init__(self, teacher, dtype: torch.dtype):
        self.inner, self.dtype = teacher, dtype
        modules = [teacher] if isinstance(teacher, torch.nn.Module) else []
        modules += [m for m in vars(teacher).values() if isinstance(m, torch.nn.Module)]
        for module in modules:            # .float()/.bfloat16()/.half(): diffusers' .to(dtype) warns on every model
            {torch.float32: module.float, torch.bfloat16: module.bfloat16, torch.float16: module.half}[dtype]()

    def __getattr__(self, name):
        if name == "inner":               # not set yet (copy/pickle): no recursion
            raise AttributeError(name)
        value = getattr(self.inner, name)
        if name in ("encode_images",):    # optional calls (another teacher's extras): float32 out too
            return lambda *args: _cast(value(*args), torch.float32)
        return value

    def _model_call(self, fn, x, sigma, cond) -> torch.Tensor:
        """x and cond in the teacher dtype, sigma float32 (the timestep embedding casts it inside)."""
        with torch.autocast(x.device.type, enabled=False):
            v = fn(x.to(self.dtype), sigma.float(), _cast(cond, self.dtype))
        return v.float()

    def velocity(self, x, sigma, cond):
        return self._model_call(self.inner.velocity, x, sigma, cond)

    def weak_velocity(self, x, sigma, cond):
        return self._model_call(self.inner.weak_velocity, x, sigma, cond)

    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        return _cast(self.inner.encode(prompts), torch.float32)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return _cast(self.inner.decode(x), torch.float32)
