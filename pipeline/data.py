"""Training data for every method: cached teacher segments, online teacher rollouts, real data.

Everything here is the *batch stream*: drawn with this source's own generator (the trainer gives it one
that only batch drawing uses, so batches can be prepared ahead on a thread; pipeline/prefetch.py).

Guidance (CFG distillation, docs/methods.md): the student is guidance-free and sees only the prompt; the
teacher's scale w rides along with each row so a method can re-solve the teacher on that row. Cached rows
carry the w their trajectory was generated with (the store's `guidance`); online and real rows draw
w ~ U[generate.guidance] from the method generator, the same law generate used.

Every random choice comes from the method generator (seeded from (seed, rank), saved in checkpoints), and
the real-data cursor is an explicit position (epoch, offset), so a resumed run draws the same batches.
Real data is sharded across ranks: every rank walks the same per-epoch permutation (seeded from
`shared_seed`, equal on all ranks) and takes its own slice of each global batch, so within an epoch no two
ranks draw the same image.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from pipeline.errors import UserError
from pipeline.sampling import euler, guided
from pipeline.schedule import fixed_sigmas


def has_real_data(cfg) -> bool:
    """Whether the run has real images (RunConfig.has_real_images): read from its latent store (`flowsteer
    encode`: `data.images`, or the embedded teacher's training MNIST digits), or drawn exactly (exact teacher)."""
    return cfg.has_real_images


class DataSource:
    """Batches for a method, drawn with `generator` on the CPU and moved to `device`."""

    def __init__(self, cfg, teacher, store, device, generator: torch.Generator, rank: int = 0, world: int = 1,
                 shared_seed: int | None = None):
        self.cfg, self.teacher, self.store = cfg, teacher, store
        self.rank, self.world = rank, world
        # Seeds the real-data permutation and must be the same on every rank; alone, a rank may use its own seed.
        if shared_seed is None and world > 1:
            raise ValueError("DataSource with world > 1 needs a shared_seed equal on every rank")
        self.shared_seed = generator.initial_seed() if shared_seed is None else int(shared_seed)
        self.device = torch.device(device)
        self.generator = generator
        M, K = cfg.schedule.teacher_steps, cfg.schedule.windows
        self.per_window = M // K
        # The teacher's fixed M-step grid; window edges are every (M/K)-th point of it, so teacher
        # sub-steps, training windows and student steps share exactly the same sigmas.
        self.grid = fixed_sigmas(M, cfg.schedule.shift)
        self.edges = self.grid[::self.per_window].clone()      # the K + 1 window edges
        self.num_windows = K
        self.guidance_range = tuple(cfg.generate.guidance)
        self.wait_seconds = 0.0          # reading cached / real data (the data-wait of the loop)
        self.teacher_seconds = 0.0       # teacher solves done for data (online rollouts, window targets)
        self._real_pos = [0, 0]          # (epoch, offset) of the global cursor into the real-data permutation
        self._null = None
        self._latents = None             # the real-image LatentStore, opened on first use
        if store is not None:
            self._store_guidance = torch.as_tensor(np.asarray(store.guidance[:]), dtype=torch.float32)
            self._store_prompt = torch.as_tensor(np.asarray(store.prompt_index[:]), dtype=torch.long)
            self.num_prompts = store.num_prompts
            # Prompt conditions are read on every batch: keep them in memory when they are small (the
            # embedded digits: 10 prompts), else read the rows each batch needs from the store.
            small = store.cond_nbytes() <= 64 << 20
            self._cond_cache = store.cond(np.arange(self.num_prompts)) if small else None
        else:
            self.num_prompts = 0

    # ------------------------------------------------------------ small draws
    def _randint(self, high: int, n: int) -> torch.Tensor:
        return torch.randint(high, (n,), generator=self.generator)

    def _guidance(self, n: int) -> torch.Tensor:
        lo, hi = self.guidance_range
        return lo + (hi - lo) * torch.rand(n, generator=self.generator)

    def _window_indices(self, n: int, probs) -> torch.Tensor:
        if probs is None:
            return self._randint(self.num_windows, n)
        p = torch.as_tensor(probs, dtype=torch.float64)
        if len(p) != self.num_windows:
            raise ValueError(f"window_probs has {len(p)} entries for {self.num_windows} windows")
        return torch.multinomial(p, n, replacement=True, generator=self.generator)

    def _prompts(self, n: int) -> torch.Tensor:
        if not self.num_prompts:
            raise RuntimeError("drawing prompts needs the trajectory store (its prompt embeddings)")
        return self._randint(self.num_prompts, n)

    def _cond(self, prompt_index: torch.Tensor) -> dict:
        if self._cond_cache is not None:
            cond = {k: v[prompt_index] for k, v in self._cond_cache.items()}
        else:
            cond = self.store.cond(prompt_index.numpy())
        return {k: self._to_device(v) for k, v in cond.items()}

    def noise_like(self, n: int) -> torch.Tensor:
        return torch.randn(n, *self.teacher.sample_shape, generator=self.generator).to(self.device)

    # ------------------------------------------------------------ public draws
    def null_cond(self, n: int) -> dict:
        """The unconditional ("" prompt) condition, n rows."""
        if self._null is None:
            null = self.store.null_cond(1) if self.store is not None else self.teacher.encode([""])
            self._null = {k: v[:1].to(self.device, torch.float32) for k, v in null.items()}
        return {k: v.expand(n, *v.shape[1:]) for k, v in self._null.items()}

    def segments(self, n: int, window_probs=None, online_fraction: float = 0.0) -> dict[str, Any]:
        """n window segments (z at edge k, teacher's z at edge k+1): cached rows first, then online rows."""
        n_online = int(round(n * online_fraction))
        n_cached = n - n_online
        k = self._window_indices(n, window_probs)
        t0 = time.perf_counter()
        parts = []
        if n_cached:
            idx = self._randint(self.store.num_samples, n_cached)
            z0, z1 = self.store.segments(idx.numpy(), k[:n_cached].numpy())
            p = self._store_prompt[idx]
            parts.append((torch.as_tensor(np.asarray(z0)), torch.as_tensor(np.asarray(z1)), p,
                          self._store_guidance[idx]))
        if n_online:
            p = self._prompts(n_online)
            parts.append((self.noise_like(n_online).cpu(), None, p, self._guidance(n_online)))
        z_start = torch.cat([q[0] for q in parts]).to(self.device, torch.float32)
        prompt = torch.cat([q[2] for q in parts])
        guidance = torch.cat([q[3] for q in parts]).to(self.device)
        cond = self._cond(prompt)
        self.wait_seconds += time.perf_counter() - t0
        z_end = torch.empty_like(z_start)
        if n_cached:
            z_end[:n_cached] = parts[0][1].to(self.device, torch.float32)
        if n_online:
            sl = slice(n_cached, n)
            z_start[sl], z_end[sl] = self.rollout(z_start[sl], k[sl].to(self.device),
                                                  {c: v[sl] for c, v in cond.items()}, guidance[sl])
        kd = k.to(self.device)
        online = torch.zeros(n, dtype=torch.bool, device=self.device)
        online[n_cached:] = True
        return {"z_start": z_start, "z_end": z_end, "sigma_start": self.edges.to(self.device)[kd],
                "sigma_end": self.edges.to(self.device)[kd + 1], "k": kd, "cond": cond,
                "guidance": guidance, "online_mask": online, "prompt_index": prompt.to(self.device)}

    def real(self, n: int) -> dict[str, Any]:
        """Real clean samples x0 with their caption's condition, from the run's latent store (`flowsteer encode`:
        `data.images`, or the embedded teacher's training digits); docs/precision.md."""
        t0 = time.perf_counter()
        if self.cfg.teacher.kind == "exact":           # exact data of the run's prompts (no image files)
            from pipeline.datasets import generate_prompts

            prompts = generate_prompts(self.cfg)
            idx = self._randint(len(prompts), n)
            chosen = [prompts[int(i)] for i in idx]
            x0 = self.teacher.sample_data(chosen, self.generator)
            cond = {k: v.to(self.device, torch.float32) for k, v in self.teacher.encode(chosen).items()}
        else:
            latents = self.latent_store()
            idx = self._next_real(latents.num_samples, n)
            rows = idx.numpy()
            x0 = torch.as_tensor(latents.latents(rows))
            cond = {k: self._to_device(v) for k, v in latents.cond(rows).items()}
        out = {"x0": self._to_device(x0), "cond": cond, "guidance": self._guidance(n).to(self.device),
               "index": idx}
        self.wait_seconds += time.perf_counter() - t0
        return out

    def teacher_samples(self, n: int) -> dict[str, Any]:
        """The store's final teacher samples as x0, with their prompt and guidance (reflow on teacher samples:
        `train.method_options.perflow.x0: teacher_samples`)."""
        t0 = time.perf_counter()
        idx = self._next_real(self.store.num_samples, n)
        last = np.full(n, self.num_windows - 1)
        x0 = torch.as_tensor(np.asarray(self.store.segments(idx.numpy(), last)[1]))
        out = {"x0": self._to_device(x0), "cond": self._cond(self._store_prompt[idx]),
               "guidance": self._store_guidance[idx].to(self.device), "index": idx}
        self.wait_seconds += time.perf_counter() - t0
        return out

    def has_real_data(self) -> bool:
        return has_real_data(self.cfg)

    def latent_store(self):
        """The run's real-image latent store (opened once; a missing or unfinished one is a UserError)."""
        if self._latents is None:
            from pipeline.latents import LatentStore, latent_store_dir

            if not has_real_data(self.cfg):
                raise UserError(f"no real images for a {self.cfg.teacher.kind} teacher: set data.images and run "
                                f"`flowsteer encode`")
            self._latents = LatentStore.open(latent_store_dir(self.cfg))
        return self._latents

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        """float32 on the device; from pinned memory on CUDA so the copy overlaps (the prefetch thread's)."""
        t = torch.as_tensor(np.asarray(t) if not isinstance(t, torch.Tensor) else t).to(torch.float32)
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    # ------------------------------------------------------------ teacher solves
    def _window_grid(self, k: torch.Tensor) -> torch.Tensor:
        """Per-row sub-grids [M/K + 1, B] of the teacher's fixed grid covering window k."""
        cols = k.cpu().long()[None, :] * self.per_window + torch.arange(self.per_window + 1)[:, None]
        return self.grid[cols]

    @torch.no_grad()
    def teacher_window(self, z: torch.Tensor, k, cond: dict, guidance, grid: torch.Tensor | None = None) -> torch.Tensor:
        """The teacher with CFG over window k (M/K Euler sub-steps from edge k to k+1); k int or per row.
        `grid`: per-row sub-grids [steps + 1, B] of another grid's windows (e.g. diffusers' default grid)."""
        t0 = time.perf_counter()
        k = torch.as_tensor(k).expand(z.shape[0])
        g = torch.as_tensor(guidance, dtype=torch.float32, device=z.device).expand(z.shape[0])
        model = guided(self.teacher.velocity, self.null_cond(z.shape[0]), g)
        out = euler(model, z, (self._window_grid(k) if grid is None else grid).to(z.device), cond)
        self.teacher_seconds += time.perf_counter() - t0
        return out

    @torch.no_grad()
    def rollout(self, noise: torch.Tensor, k: torch.Tensor, cond: dict, guidance: torch.Tensor):
        """OTA start points: the teacher from noise (sigma=1) to edge k, then through window k.

        Rows share one batched call per window: at window j only rows with k >= j are still moving."""
        z, z_start, z_end = noise.clone(), noise.clone(), noise.clone()
        for j in range(int(k.max()) + 1 if len(k) else 0):
            at = k == j
            z_start[at] = z[at]
            live = k >= j
            sub = {c: v[live] for c, v in cond.items()}
            z[live] = self.teacher_window(z[live], j, sub, guidance[live])
            z_end[at] = z[at]
        return z_start, z_end

    # ------------------------------------------------------------ real data and its position
    def _next_real(self, size: int, n: int) -> torch.Tensor:
        """This rank's n indices of the next global batch (n * world) on an epoch-seeded permutation.

        All ranks advance the same global cursor, which is checkpointed; rank r keeps positions
        [r n, (r + 1) n) of each global batch."""
        glob = []
        while len(glob) < n * self.world:
            epoch, offset = self._real_pos
            g = torch.Generator().manual_seed((self.shared_seed + 1_000_003 * (epoch + 1)) % (1 << 63))
            perm = torch.randperm(size, generator=g)
            take = perm[offset:offset + n * self.world - len(glob)].tolist()
            glob += take
            offset += len(take)
            self._real_pos = [epoch + 1, 0] if offset >= size else [epoch, offset]
        return torch.tensor(glob[self.rank * n:(self.rank + 1) * n], dtype=torch.long)

    def state_dict(self) -> dict[str, Any]:
        return {"real_pos": list(self._real_pos), "wait_seconds": self.wait_seconds,
                "teacher_seconds": self.teacher_seconds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._real_pos = list(state["real_pos"])
        self.wait_seconds = state.get("wait_seconds", 0.0)
        self.teacher_seconds = state.get("teacher_seconds", 0.0)
