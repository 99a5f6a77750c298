"""Prompt tables and image-caption sets as users keep them (docs/store.md, "Input formats").

Prompts (`generate.prompts`): .txt (one a line, blank lines skipped), .jsonl, .csv, .parquet or a directory
saved by HF `datasets` (`save_to_disk`: Arrow stream files listed in state.json). The text column is
`generate.prompt_column`, else the first of prompt / caption / text that exists. Everything is read in
batches (Parquet row groups, Arrow record batches, CSV blocks, lines), never whole into Python lists: the
driver copies the column into `prompts.parquet` beside the store while checking it and hashing it, and
workers read back only their shard's rows (`TextColumn.take`).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa

from pipeline.errors import UserError

TEXT_COLUMNS = ("prompt", "caption", "text")
BATCH_ROWS = 8192           # rows per read batch and per row group of the copies we write
FORMATS = ".txt, .jsonl, .csv, .parquet or a saved HF datasets directory"


# ---------------------------------------------------------------- reading any format in batches
def _hf_files(path: Path) -> list[Path]:
    """The Arrow files of a `Dataset.save_to_disk` directory (a DatasetDict: its `train` split)."""
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        if not splits:
            raise UserError(f"{path}: HF DatasetDict without splits")
        path = path / ("train" if "train" in splits else splits[0])
    state = path / "state.json"
    if not state.is_file():
        raise UserError(f"{path} is a directory but not a saved HF dataset (no state.json); "
                        f"expected {FORMATS}")
    return [path / f["filename"] for f in json.loads(state.read_text()).get("_data_files", [])]


def table_batches(path: Path, columns: Sequence[str] | None = None,
                  batch_rows: int = BATCH_ROWS) -> tuple[list[str], Iterator[pa.RecordBatch]]:
    """(column names, record batches) of a table file of any supported format except .txt."""
    import pyarrow.csv as pcsv
    import pyarrow.ipc as ipc
    import pyarrow.parquet as pq

    if path.is_dir():
        files = _hf_files(path)
        names = list(ipc.open_stream(pa.memory_map(str(files[0]))).schema.names) if files else []

        def hf():
            for f in files:
                for batch in ipc.open_stream(pa.memory_map(str(f))):
                    yield batch.select(list(columns)) if columns else batch
        return names, hf()
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        pf = pq.ParquetFile(str(path))
        return list(pf.schema_arrow.names), pf.iter_batches(batch_size=batch_rows, columns=columns)
    if suffix == ".csv":
        text_types = {c: pa.string() for c in columns or ()}     # a CSV cell is text, even "123"
        reader = pcsv.open_csv(str(path), convert_options=pcsv.ConvertOptions(
            column_types=text_types, include_columns=list(columns) if columns else None))
        return list(reader.schema.names), iter(reader)
    if suffix == ".jsonl":
        return _jsonl_batches(path, columns, batch_rows)
    raise UserError(f"{path}: unknown extension '{path.suffix}' (expected {FORMATS})")


def _jsonl_batches(path: Path, columns, batch_rows: int):
    """JSON lines parsed one line at a time (exact row numbers in errors, constant memory)."""
    names: list[str] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                names = list(json.loads(line))
                break

    def gen():
        rows: list[dict] = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise UserError(f"{path}: line {n + 1} is not valid JSON ({exc.msg})") from None
                rows.append({c: obj.get(c) for c in columns or names})
                if len(rows) == batch_rows:
                    yield _py_batch(rows, columns or names)
                    rows = []
        if rows:
            yield _py_batch(rows, columns or names)
    return names, gen()


def _py_batch(rows: list[dict], columns) -> pa.RecordBatch:
    """Values kept as Python objects until checked (a number among captions must be reported, not cast)."""
    arrays = []
    for c in columns:
        values = [r.get(c) for r in rows]
        try:
            arrays.append(pa.array(values))
        except (pa.ArrowInvalid, pa.ArrowTypeError):     # mixed types: keep them as text-or-not markers
            arrays.append(pa.array([v if isinstance(v, str) or v is None else _NOT_TEXT for v in values]))
    return pa.RecordBatch.from_arrays(arrays, names=list(columns))


_NOT_TEXT = "\x00<not text>\x00"


def pick_column(path: Path, names: Sequence[str], wanted: str | None, candidates: Sequence[str], key: str) -> str:
    """The configured column, else the first candidate present; a missing one names what was found."""
    if wanted is not None:
        if wanted not in names:
            raise UserError(f"{key} '{wanted}' is not a column of {path} (columns found: {', '.join(names) or 'none'})")
        return wanted
    for c in candidates:
        if c in names:
            return c
    raise UserError(f"{path} has none of the columns {', '.join(candidates)} (columns found: "
                    f"{', '.join(names) or 'none'}); set {key}")


def text_batches(path: str | Path, column: str | None = None, key: str = "generate.prompts",
                 column_key: str = "generate.prompt_column") -> Iterator[list[str]]:
    """Checked text rows of any supported format, in batches: a null or non-text row is a UserError
    naming its row (0-based, counting data rows)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{key} not found: {path}")
    if path.is_file() and path.suffix.lower() == ".txt":
        yield from _txt_batches(path)
        return
    names, _ = table_batches(path)
    col = pick_column(path, names, column, TEXT_COLUMNS, column_key)
    _, batches = table_batches(path, [col])
    start = 0
    for batch in batches:
        arr = batch.column(0)
        if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type) or pa.types.is_null(arr.type)):
            raise UserError(f"{path}: column '{col}' row {start} is {arr.type}, not text")
        values = arr.to_pylist()
        for i, v in enumerate(values):
            if v is None:
                raise UserError(f"{path}: column '{col}' row {start + i} is null")
            if v == _NOT_TEXT:
                raise UserError(f"{path}: column '{col}' row {start + i} is not text")
        start += len(values)
        yield values


def _txt_batches(path: Path) -> Iterator[list[str]]:
    batch: list[str] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                batch.append(line.strip())
                if len(batch) == BATCH_ROWS:
                    yield batch
                    batch = []
    if batch:
        yield batch


def copy_text_column(src: str | Path, dest: Path, column: str | None = None, key: str = "generate.prompts",
                     column_key: str = "generate.prompt_column") -> tuple[int, str]:
    """Stream the checked text column of `src` into a one-column Parquet `dest` (row groups of BATCH_ROWS);
    returns (rows, sha256 of the rows joined by newlines). Written atomically; an empty source is an error."""
    import pyarrow.parquet as pq

    from pipeline.files import atomic_path

    h, rows = hashlib.sha256(), 0
    with atomic_path(dest) as tmp:
        with pq.ParquetWriter(str(tmp), pa.schema([("text", pa.string())])) as writer:
            for values in text_batches(src, column, key, column_key):
                for v in values:
                    h.update(b"\n" if rows else b"")
                    h.update(v.encode())
                    rows += 1
                writer.write_table(pa.table({"text": pa.array(values, pa.string())}), row_group_size=BATCH_ROWS)
        if rows == 0:
            raise UserError(f"{key} {src} has no rows (empty file)")
    return rows, h.hexdigest()[:16]


# ---------------------------------------------------------------- reading a written text column back
class TextColumn:
    """A one-column Parquet file written by `copy_text_column`: length from metadata, rows by row group."""

    def __init__(self, path: str | Path):
        import pyarrow.parquet as pq

        self.path = Path(path)
        self._file = pq.ParquetFile(str(self.path))
        meta = self._file.metadata
        self._starts = np.cumsum([0] + [meta.row_group(g).num_rows for g in range(meta.num_row_groups)])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def take(self, indices) -> list[str]:
        """Rows at `indices` (reads only the row groups holding them)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"text row out of range (rows < {len(self)})")
        groups = np.searchsorted(self._starts, idx, side="right") - 1
        out: list[str] = [""] * len(idx)
        for g in np.unique(groups):
            col = self._file.read_row_group(int(g), columns=["text"]).column(0).to_pylist()
            for j in np.nonzero(groups == g)[0]:
                out[j] = col[idx[j] - self._starts[g]]
        return out

    def __getitem__(self, i: int) -> str:
        return self.take([i])[0]

    def __iter__(self) -> Iterator[str]:
        for g in range(len(self._starts) - 1):
            yield from self._file.read_row_group(g, columns=["text"]).column(0).to_pylist()
