"""Training rows for every method, drawn on the CPU by the batch loader (pipeline/loader.py).

What a batch holds is split by where the work runs (docs/precision.md, "Batches and their streams"):
- here, the *rows* of step s: trajectory-store segments, real data, noise, window and guidance draws. They come
  from `StepRows`, whose generator `batch_rng` is seeded from (seed, rank, s) alone, and whose real data sits at
  the position the real-data cursor gives step s, so batch s is a pure function of (seed, rank, s, cursor) and
  any loader worker can draw any step, in any order;
- in the training process, on the device, the teacher solves a batch needs (online OTA rollouts, PeRFlow's
  window ends): pipeline/teacher_solves.py, done once per step by `Method.complete`.

Guidance (CFG distillation, docs/methods.md): the student is guidance-free and sees only the prompt; the
teacher's scale w rides along with each row so a method can re-solve the teacher on that row. Cached rows carry
the w their trajectory was generated with (the store's `guidance`); online and real rows draw w ~
U[generate.guidance] from batch_rng, the same law generate used.

Real data is sharded across ranks: every rank walks the same per-epoch permutation (seeded from `shared_seed`,
equal on all ranks); a step draws one global batch (batch_size x world rows) at its cursor position and rank r
keeps its r-th slice, so within an epoch no two ranks draw the same image.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.checkpoint import derive_seed
from pipeline.errors import UserError
from pipeline.schedule import fixed_sigmas
from pipeline.shard_reader import empty


def has_real_data(cfg) -> bool:
    """Whether the run has real images (RunConfig.has_real_images): read from its latent store (`flowsteer
    encode`: `data.images`, or the embedded teacher's training MNIST digits), or drawn exactly (exact teacher)."""
    return cfg.has_real_images


@dataclass(frozen=True)
class Windows:
    """The teacher's fixed M-step grid and its K window edges (every (M/K)-th point of it), so teacher
    sub-steps, training windows and student steps share exactly the same sigmas."""
    grid: torch.Tensor              # [M + 1] fixed_sigmas(M, shift)
    edges: torch.Tensor             # [K + 1]
    per_window: int                 # M / K teacher sub-steps per window

    @classmethod
    def of(cls, cfg) -> "Windows":
        M, K = cfg.schedule.teacher_steps, cfg.schedule.windows
        grid = fixed_sigmas(M, cfg.schedule.shift)
        return cls(grid, grid[::M // K].clone(), M // K)

    @property
    def num_windows(self) -> int:
        return len(self.edges) - 1

    def sub_grids(self, k: torch.Tensor) -> torch.Tensor:
        """Per-row sub-grids [M/K + 1, B] of the fixed grid covering windows k."""
        cols = k.cpu().long()[None, :] * self.per_window + torch.arange(self.per_window + 1)[:, None]
        return self.grid[cols]


class RowSource:
    """Everything the rows of any step are read from: the trajectory store, the real data, the run's seeds.

    Holds no per-step state but the real-data cursor's base (the position at `base_step`, from a checkpoint),
    so it can be copied into loader workers. `at(step)` gives that step's `StepRows`."""

    def __init__(self, cfg, store, sample_shape, seed: int, rank: int = 0, world: int = 1,
                 shared_seed: int | None = None):
        self.cfg, self.store = cfg, store
        self.sample_shape = tuple(sample_shape)
        self.seed, self.rank, self.world = int(seed), rank, world
        # Seeds the real-data permutation and must be the same on every rank; alone, a rank may use its own seed.
        if shared_seed is None and world > 1:
            raise ValueError("RowSource with world > 1 needs a shared_seed equal on every rank")
        self.shared_seed = int(seed if shared_seed is None else shared_seed)
        self.windows = Windows.of(cfg)
        self.guidance_range = tuple(cfg.generate.guidance)
        self.batch_size = cfg.train.batch_size          # this rank's rows per step
        self.cursor = (0, 0)                            # (step, global real-data position at that step)
        self._latents = None
        self._num_run_prompts: int | None = None
        self._perm: tuple[int, int, torch.Tensor] | None = None     # (epoch, size, permutation)
        if store is not None:
            self.store_guidance = torch.as_tensor(np.asarray(store.guidance[:]), dtype=torch.float32)
            self.store_prompt = torch.as_tensor(np.asarray(store.prompt_index[:]), dtype=torch.long)
            self.num_prompts = store.num_prompts
            # Prompt conditions are read on every batch: keep them in memory when they are small (the
            # embedded digits: 10 prompts), else read the rows each batch needs from the store.
            self._cond_cache = store.cond(np.arange(self.num_prompts)) if store.cond_nbytes() <= 64 << 20 else None
        else:
            self.num_prompts = 0

    def at(self, step: int) -> "StepRows":
        return StepRows(self, step)

    # ------------------------------------------------------------ the real-data cursor
    def real_position(self, step: int) -> int:
        """The global real-data position of step `step`: each step owns one global batch of positions."""
        base_step, base_position = self.cursor
        return base_position + (step - base_step) * self.batch_size * self.world

    def state_dict(self, step: int) -> dict[str, Any]:
        return {"real_position": self.real_position(step)}

    def load_state_dict(self, state: dict[str, Any], step: int) -> None:
        self.cursor = (step, int(state["real_position"]))

    def real_indices(self, step: int, size: int, n: int) -> torch.Tensor:
        """This rank's n row indices of step's global batch on the epoch-seeded permutations of `size` rows
        (position p is row perm_{p // size}[p % size]; a batch crossing an epoch end takes the next epoch's)."""
        start = self.real_position(step) + self.rank * n
        out = []
        for p in range(start, start + n):
            epoch, offset = divmod(p, size)
            if self._perm is None or self._perm[:2] != (epoch, size):
                g = torch.Generator().manual_seed((self.shared_seed + 1_000_003 * (epoch + 1)) % (1 << 63))
                self._perm = (epoch, size, torch.randperm(size, generator=g))
            out.append(int(self._perm[2][offset]))
        return torch.tensor(out, dtype=torch.long)

    # ------------------------------------------------------------ what rows are read from
    def cond(self, prompt_index: torch.Tensor) -> dict[str, torch.Tensor]:
        """The prompts' conditions; read from the store they stay in its dtype (float16: half the bytes to hand
        to the step, which casts them to float32 on the device)."""
        if self._cond_cache is not None:
            return {k: v[prompt_index] for k, v in self._cond_cache.items()}
        return self.store.cond(prompt_index.numpy(), stored=True)

    def num_run_prompts(self) -> int:
        """How many prompts the run has (generate.prompts): the exact teacher draws its real data among them."""
        if self._num_run_prompts is None:
            from pipeline.datasets import generate_prompts

            self._num_run_prompts = len(generate_prompts(self.cfg))
        return self._num_run_prompts

    def latent_store(self):
        """The run's real-image latent store (opened once per process; a missing one is a UserError)."""
        if self._latents is None:
            from pipeline.latents import LatentStore, latent_store_dir

            if not has_real_data(self.cfg):
                raise UserError(f"no real images for a {self.cfg.teacher.kind} teacher: set data.images and run "
                                f"`flowsteer encode`")
            self._latents = LatentStore.open(latent_store_dir(self.cfg))
        return self._latents


class StepRows:
    """The rows of one step, on the CPU: every random choice from `rng` (the step's batch_rng)."""

    def __init__(self, source: RowSource, step: int):
        self.source, self.step = source, step
        self.rng = torch.Generator().manual_seed(derive_seed(source.seed, "batch", source.rank, step))
        self._real_drawn = False

    # ------------------------------------------------------------ small draws
    def randint(self, high: int, n: int) -> torch.Tensor:
        return torch.randint(high, (n,), generator=self.rng)

    def guidance(self, n: int) -> torch.Tensor:
        lo, hi = self.source.guidance_range
        return lo + (hi - lo) * torch.rand(n, generator=self.rng)

    def noise(self, n: int) -> torch.Tensor:
        return torch.randn(n, *self.source.sample_shape, generator=self.rng)

    def windows(self, n: int, probs=None) -> torch.Tensor:
        """Window indices: uniform, or drawn with `probs` (one weight per window)."""
        K = self.source.windows.num_windows
        if probs is None:
            return self.randint(K, n)
        p = torch.as_tensor(probs, dtype=torch.float64)
        if len(p) != K:
            raise ValueError(f"window_probs has {len(p)} entries for {K} windows")
        return torch.multinomial(p, n, replacement=True, generator=self.rng)

    def prompts(self, n: int) -> torch.Tensor:
        if not self.source.num_prompts:
            raise RuntimeError("drawing prompts needs the trajectory store (its prompt embeddings)")
        return self.randint(self.source.num_prompts, n)

    # ------------------------------------------------------------ rows
    def segments(self, n: int, window_probs=None, online_fraction: float = 0.0) -> dict[str, Any]:
        """n window segments (z at edge k, the teacher's z at edge k+1): cached rows first, then online rows,
        whose z_start holds their noise and z_end nothing yet (`TeacherSolves.complete_segments` rolls them
        out from that noise in the training process)."""
        src = self.source
        n_online = int(round(n * online_fraction))
        n_cached = n - n_online
        k = self.windows(n, window_probs)
        z_start, z_end = empty((n, *src.sample_shape)), empty((n, *src.sample_shape))
        prompt = torch.empty(n, dtype=torch.long)
        guidance = torch.empty(n)
        if n_cached:
            idx = self.randint(src.store.num_samples, n_cached)
            z0, z1 = src.store.segments(idx.numpy(), k[:n_cached].numpy())
            z_start[:n_cached], z_end[:n_cached] = torch.from_numpy(z0), torch.from_numpy(z1)
            prompt[:n_cached], guidance[:n_cached] = src.store_prompt[idx], src.store_guidance[idx]
        if n_online:
            prompt[n_cached:] = self.prompts(n_online)
            z_start[n_cached:] = self.noise(n_online)
            z_end[n_cached:] = 0
            guidance[n_cached:] = self.guidance(n_online)
        online = torch.zeros(n, dtype=torch.bool)
        online[n_cached:] = True
        edges = src.windows.edges
        return {"z_start": z_start, "z_end": z_end, "sigma_start": edges[k], "sigma_end": edges[k + 1], "k": k,
                "cond": src.cond(prompt), "guidance": guidance, "online_mask": online, "prompt_index": prompt}

    def _real_indices(self, size: int, n: int) -> torch.Tensor:
        if self._real_drawn:
            raise RuntimeError("a step draws real data once (its cursor position holds one global batch)")
        if n > self.source.batch_size:
            raise ValueError(f"a real draw of {n} rows exceeds the step's {self.source.batch_size}")
        self._real_drawn = True
        return self.source.real_indices(self.step, size, n)

    def real(self, n: int) -> dict[str, Any]:
        """Real clean samples x0 with their caption's condition, from the run's latent store (`flowsteer encode`:
        `data.images`, or the embedded teacher's training digits), in the store's dtype; docs/precision.md.

        The exact teacher's data has no files: its rows are the prompts drawn and a seed, and the teacher samples
        x0 and encodes the prompts in the training process (`TeacherSolves.real_rows`)."""
        if self.source.cfg.teacher.kind == "exact":
            idx = self.randint(self.source.num_run_prompts(), n)
            seed = torch.randint(1 << 62, (1,), generator=self.rng)
            return {"exact_prompt": idx, "exact_seed": seed, "guidance": self.guidance(n), "index": idx}
        latents = self.source.latent_store()
        idx = self._real_indices(latents.num_samples, n)
        rows = idx.numpy()
        return {"x0": latents.latents(rows, stored=True), "cond": latents.cond(rows, stored=True),
                "guidance": self.guidance(n), "index": idx}

    def teacher_samples(self, n: int) -> dict[str, Any]:
        """The store's final teacher samples as x0, with their prompt and guidance (reflow on teacher samples:
        `train.method_options.perflow.x0: teacher_samples`); they walk the real-data cursor."""
        src = self.source
        idx = self._real_indices(src.store.num_samples, n)
        last = np.full(n, src.windows.num_windows - 1)
        x0 = torch.from_numpy(np.asarray(src.store.segments(idx.numpy(), last)[1]))
        return {"x0": x0, "cond": src.cond(src.store_prompt[idx]), "guidance": src.store_guidance[idx], "index": idx}

    def has_real_data(self) -> bool:
        return has_real_data(self.source.cfg)
