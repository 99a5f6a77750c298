"""The teacher solves a training batch needs, done in the training process on the device, once per step.

The loader (pipeline/loader.py) hands over a step's rows (pipeline/data.py); `Method.complete` turns them into
the batch with these: the teacher with CFG over a window (PeRFlow's window ends, SCFlow's final states), and
the OTA rollouts from noise for a batch's online rows, one batched call per window. Their time is
`teacher_seconds` (the train log's `teacher_data_s`), apart from the loader's wait (`data_wait_s`).
"""
from __future__ import annotations

import time

import torch

from pipeline.data import Windows
from pipeline.sampling import euler, guided


class TeacherSolves:
    """The frozen teacher's solves on `device`, on the fixed grid of `windows`."""

    def __init__(self, teacher, store, device, windows: Windows, cfg=None):
        self.teacher, self.store, self.cfg = teacher, store, cfg
        self.device = torch.device(device)
        self.windows = windows
        self.edges = windows.edges.to(self.device)
        self.teacher_seconds = 0.0
        self._null = None

    def to_device(self, rows: dict) -> dict:
        """Drawn rows on this device, floats as float32 (what the loader hands a step)."""
        from pipeline.loader import to_device

        return to_device(rows, self.device)

    def real_rows(self, real: dict) -> dict:
        """StepRows.real's rows with x0 and its condition: as read, or for the exact teacher sampled from its data
        law for the drawn prompts (a generator seeded by the row's draw) and encoded, here on the device."""
        if "exact_prompt" not in real:
            return real
        from pipeline.datasets import generate_prompts

        prompts = generate_prompts(self.cfg)
        chosen = [prompts[int(i)] for i in real["exact_prompt"]]
        generator = torch.Generator().manual_seed(int(real["exact_seed"][0]))
        x0 = self.teacher.sample_data(chosen, generator).to(self.device, torch.float32)
        cond = {k: v.to(self.device, torch.float32) for k, v in self.teacher.encode(chosen).items()}
        return {**real, "x0": x0, "cond": cond}

    def null_cond(self, n: int) -> dict:
        """The unconditional ("" prompt) condition, n rows."""
        if self._null is None:
            null = self.store.null_cond(1) if self.store is not None else self.teacher.encode([""])
            self._null = {k: v[:1].to(self.device, torch.float32) for k, v in null.items()}
        return {k: v.expand(n, *v.shape[1:]) for k, v in self._null.items()}

    @torch.no_grad()
    def teacher_window(self, z: torch.Tensor, k, cond: dict, guidance, grid: torch.Tensor | None = None) -> torch.Tensor:
        """The teacher with CFG over window k (M/K Euler sub-steps from edge k to k+1); k int or per row.
        `grid`: per-row sub-grids [steps + 1, B] of another grid's windows (e.g. diffusers' default grid)."""
        t0 = time.perf_counter()
        k = torch.as_tensor(k).expand(z.shape[0])
        g = torch.as_tensor(guidance, dtype=torch.float32, device=z.device).expand(z.shape[0])
        model = guided(self.teacher.velocity, self.null_cond(z.shape[0]), g)
        out = euler(model, z, (self.windows.sub_grids(k) if grid is None else grid).to(z.device), cond)
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

    @torch.no_grad()
    def complete_segments(self, seg: dict) -> dict:
        """Segments on the device with their online rows rolled out (their z_start holds the rows' noise)."""
        online = seg["online_mask"]
        if bool(online.any()):
            rows = online.nonzero().squeeze(1)
            cond = {c: v[rows] for c, v in seg["cond"].items()}
            seg["z_start"][rows], seg["z_end"][rows] = self.rollout(seg["z_start"][rows], seg["k"][rows], cond,
                                                                    seg["guidance"][rows])
        return seg
