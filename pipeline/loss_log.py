"""A training run's loss log (`losses.jsonl`, one JSON line per logged step, rank 0 only) and its means.

A logged loss is the mean over the steps since the previous line (one step's batch is too noisy to read, e.g.
the discriminator's accuracy on a few rows); the means restart at every segment, so a resumed run logs exactly
what an uninterrupted one does. After a resume `trim` drops the lines of steps the checkpoint does not hold.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class LossLog:
    """Appends rows to `path` (None: keeps the means, writes nothing) and to `tensorboard` when set."""

    def __init__(self, path: Path | None):
        self.path = Path(path) if path is not None else None
        self.tensorboard = None            # a pipeline.tensorboard.TensorBoardLogger (the train stage sets it)
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}

    def add(self, values: dict[str, float]) -> None:
        """One step's values, towards the next line's means."""
        for key, value in values.items():
            self._sums[key] = self._sums.get(key, 0.0) + value
            self._counts[key] = self._counts.get(key, 0) + 1

    def means(self) -> dict[str, float]:
        """The means since the last call (then restarted)."""
        out = {key: self._sums[key] / self._counts[key] for key in self._sums}
        self._sums, self._counts = {}, {}
        return out

    def write(self, row: dict[str, Any]) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        if self.tensorboard is not None:
            self.tensorboard.scalars(row)

    def trim(self, step: int) -> None:
        """Keep the lines of steps <= `step` (a resumed run redoes the others), dropping a torn line (a write
        cut short by a full disk or a kill); the file is rewritten atomically."""
        from pipeline.files import atomic_write_bytes

        self._sums, self._counts = {}, {}
        if self.path is None or not self.path.exists():
            return
        rows, torn = [], 0
        for line in self.path.read_text(errors="replace").splitlines():
            try:
                row = json.loads(line) if line.strip() else None
                row_step = int(row["step"]) if row is not None else None
            except (ValueError, TypeError, KeyError):
                torn += 1
                continue
            if row_step is not None and row_step <= step:
                rows.append(line)
        if torn:
            print(f"warning: {self.path}: dropped {torn} unreadable line(s) (a write cut short)")
        atomic_write_bytes(self.path, "".join(r + "\n" for r in rows).encode())
