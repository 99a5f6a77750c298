"""Prompt tables and image-caption sets as users keep them (docs/store.md, "Input formats").

Prompts (`generate.prompts`): .txt (one a line, blank lines skipped), .jsonl, .csv, .parquet or a directory
saved by HF `datasets` (`save_to_disk`: Arrow stream files listed in state.json). The text column is
`generate.prompt_column`, else the first of prompt / caption / text that exists. Everything is read in
batches (Parquet row groups, Arrow record batches, CSV blocks, lines), never whole into Python lists: the
driver copies the column into `prompts.parquet` beside the store while checking it and hashing it, and
workers read back only their shard's rows (`TextColumn.take`).
"""
from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa

from pipeline.errors import UserError

TEXT_COLUMNS = ("prompt", "caption", "text")
PROMPTS_FILE = "prompts.parquet"    # generate's checked copy of the prompts, beside the trajectory store
BATCH_ROWS = 1024           # rows per read batch and per row group of the copies we write
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


def table_batches(path: Path, columns: Sequence[str] | None = None) -> tuple[list[str], Iterator[pa.RecordBatch]]:
    """(column names, record batches of at most BATCH_ROWS rows) of a table of any supported format but .txt."""
    names, batches = _table_batches(path, columns, BATCH_ROWS)

    def sliced():
        for batch in batches:
            for lo in range(0, batch.num_rows, BATCH_ROWS):
                yield batch.slice(lo, BATCH_ROWS)
    return names, sliced()


def _table_batches(path: Path, columns, batch_rows: int):
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
        try:                  # quoted cells may hold newlines (RFC 4180): the reader must not split blocks there
            reader = pcsv.open_csv(str(path), parse_options=pcsv.ParseOptions(newlines_in_values=True),
                                   convert_options=pcsv.ConvertOptions(
                                       column_types=text_types, include_columns=list(columns) if columns else None))
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise UserError(f"{path}: cannot be read as CSV ({_first_line(exc)})") from None
        return list(reader.schema.names), _named_errors(path, "CSV", reader)
    if suffix == ".jsonl":
        return _jsonl_batches(path, columns, batch_rows)
    raise UserError(f"{path}: unknown extension '{path.suffix}' (expected {FORMATS})")


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__


def _named_errors(path: Path, what: str, batches):
    """Record batches of a pyarrow reader, its read errors (bad UTF-8, ragged rows) as a UserError naming the file."""
    try:
        yield from batches
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise UserError(f"{path}: cannot be read as {what} ({_first_line(exc)})") from None


def text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, line) of a UTF-8 text file (a BOM is skipped); a line that is not UTF-8 is a
    UserError naming the file and the line, never a UnicodeDecodeError."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise UserError(f"{path}: line {n} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at column "
                                f"{exc.start + 1}); save the file as UTF-8") from None
            yield n, line


def read_text(path: Path) -> str:
    """A whole UTF-8 text file (e.g. a caption), with text_lines' errors."""
    return "".join(line for _, line in text_lines(Path(path)))


def _json_object(path: Path, n: int, line: str) -> dict:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: line {n} is not valid JSON ({exc.msg})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: line {n} is a JSON {type(obj).__name__}, not an object "
                        f"({{\"prompt\": ...}} per line)")
    return obj


def _jsonl_batches(path: Path, columns, batch_rows: int):
    """JSON lines parsed one line at a time (exact row numbers in errors, constant memory)."""
    names: list[str] = []
    for n, line in text_lines(path):
        if line.strip():
            names = list(_json_object(path, n, line))
            break

    def gen():
        rows: list[dict] = []
        for n, line in text_lines(path):
            if line.strip():
                obj = _json_object(path, n, line)
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
    for _, line in text_lines(path):
        if line.strip():
            batch.append(line.strip())
            if len(batch) >= BATCH_ROWS:
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

    with atomic_path(dest) as tmp:
        with pq.ParquetWriter(str(tmp), pa.schema([("text", pa.string())])) as writer:
            rows, sha = rows_hash(text_batches(src, column, key, column_key), on_batch=lambda values: writer.write_table(
                pa.table({"text": pa.array(values, pa.string())}), row_group_size=BATCH_ROWS))
        if rows == 0:
            raise UserError(f"{key} {src} has no rows (empty file)")
    return rows, sha


def rows_hash(batches: Iterable[Sequence[str]], on_batch: Callable[[Sequence[str]], Any] | None = None
              ) -> tuple[int, str]:
    """(rows, their hash) in one pass over batches of text rows: the hash is sha256 of the rows joined by
    newlines (16 hex digits), the prompts' hash in a store's meta. `on_batch` sees each batch (e.g. to copy it)."""
    h, rows = hashlib.sha256(), 0
    for values in batches:
        for v in values:
            h.update(b"\n" if rows else b"")
            h.update(v.encode())
            rows += 1
        if on_batch is not None:
            on_batch(values)
    return rows, h.hexdigest()[:16]


# ---------------------------------------------------------------- generate's prompts
def generate_prompts(cfg):
    """The prompt rows of generate.prompts (any format here) or the embedded digit prompts: a list for the
    digits, else generate's own copy (a TextColumn: len, [i], take, iteration) once generate has prepared
    it, else the rows read in batches into a list (small sets only)."""
    if cfg.generate.prompts is None:
        from pipeline.digits import DIGIT_PROMPTS

        return list(DIGIT_PROMPTS)
    copy = cfg.stage_dir("generate") / PROMPTS_FILE
    if copy.is_file():
        return TextColumn(copy)
    return [p for batch in text_batches(cfg.generate.prompts, cfg.generate.prompt_column) for p in batch]


def prompt_summary(cfg) -> tuple[int, str]:
    """(number of prompts, rows_hash of them): one streamed pass, cached per file state."""
    if cfg.generate.prompts is None:
        from pipeline.digits import DIGIT_PROMPTS

        return rows_hash([DIGIT_PROMPTS])
    path = Path(cfg.generate.prompts)
    if not path.exists():
        raise UserError(f"generate.prompts not found: {path}")
    st = path.stat()
    return _scan_prompts(str(path.absolute()), cfg.generate.prompt_column, st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=8)
def _scan_prompts(path: str, column: str | None, mtime_ns: int, size: int) -> tuple[int, str]:
    rows, sha = rows_hash(text_batches(path, column))
    if rows == 0:
        raise UserError(f"generate.prompts {path} has no prompts (empty file)")
    return rows, sha


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

    def __getitem__(self, i: int | slice) -> str | list[str]:
        if isinstance(i, slice):
            return self.take(range(len(self))[i])
        return self.take([i])[0]

    def __iter__(self) -> Iterator[str]:
        for g in range(len(self._starts) - 1):
            yield from self._file.read_row_group(g, columns=["text"]).column(0).to_pylist()


# ---------------------------------------------------------------- image-caption sets (data.images)
IMAGE_COLUMNS = ("image", "image_path", "path")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def folder_images(folder: Path) -> list[Path]:
    """Images under `folder` (recursively, sorted), each needing a .txt caption of the same stem beside it."""
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise UserError(f"data.images folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    for p in images:
        if not p.with_suffix(".txt").is_file():
            raise UserError(f"data.images: {p} has no caption file {p.with_suffix('.txt').name} beside it")
    return images


def image_column_kind(path: Path, column: str) -> str:
    """'path' (text: a file path, relative to the table's folder) or 'bytes' (binary, or HF Image structs)."""
    _, batches = table_batches(path, [column])
    for batch in batches:
        t = batch.column(0).type
        if pa.types.is_string(t) or pa.types.is_large_string(t):
            return "path"
        if pa.types.is_binary(t) or pa.types.is_large_binary(t) or (pa.types.is_struct(t) and
                                                                     t.get_field_index("bytes") >= 0):
            return "bytes"
        raise UserError(f"{path}: image column '{column}' is {t}, not a path or image bytes")
    raise UserError(f"data.images {path} has no rows (empty file)")


def copy_image_set(data, captions_dest: Path, paths_dest: Path) -> int:
    """Plan an image-caption set (`data` = the config's data section): captions into `captions_dest`, image
    paths (absolute; empty where the image is bytes in the source table) into `paths_dest`, both one-column
    Parquet files read back with TextColumn; returns the number of rows (after data.limit)."""
    import pyarrow.parquet as pq

    from pipeline.files import atomic_path

    src = Path(data.images)
    if not src.exists():
        raise UserError(f"data.images not found: {src}")
    limit = data.limit or None
    if src.is_dir() and not (src / "state.json").is_file() and not (src / "dataset_dict.json").is_file():
        images = folder_images(src)[:limit]
        caps = [read_text(p.with_suffix(".txt")).strip() for p in images]
        pairs = [([str(p.absolute()) for p in images], caps)]
    else:
        names, _ = table_batches(src)
        image_col = pick_column(src, names, data.image_column, IMAGE_COLUMNS, "data.image_column")
        kind = image_column_kind(src, image_col)
        base = src if src.is_dir() else src.parent
        captions = text_batches(src, data.caption_column, "data.images", "data.caption_column")
        paths = (_path_batches(src, image_col, base) if kind == "path" else
                 ([""] * len(c) for c in text_batches(src, data.caption_column, "data.images", "data.caption_column")))
        pairs = zip(paths, captions)
    rows = 0
    with atomic_path(captions_dest) as ctmp, atomic_path(paths_dest) as ptmp:
        schema = pa.schema([("text", pa.string())])
        with pq.ParquetWriter(str(ctmp), schema) as cw, pq.ParquetWriter(str(ptmp), schema) as pw:
            for paths, caps in pairs:
                take = len(caps) if limit is None else max(0, min(len(caps), limit - rows))
                if take == 0:
                    break
                cw.write_table(pa.table({"text": pa.array(caps[:take], pa.string())}), row_group_size=BATCH_ROWS)
                pw.write_table(pa.table({"text": pa.array(list(paths)[:take], pa.string())}),
                               row_group_size=BATCH_ROWS)
                rows += take
        if rows == 0:
            raise UserError(f"data.images {src} has no rows (empty)")
    return rows


def _path_batches(src: Path, column: str, base: Path) -> Iterator[list[str]]:
    start = 0
    for batch in table_batches(src, [column])[1]:
        values = batch.column(0).to_pylist()
        for i, v in enumerate(values):
            if not isinstance(v, str) or not v:
                raise UserError(f"{src}: image column '{column}' row {start + i} is {'null' if v is None else 'empty'}")
        start += len(values)
        yield [str((base / v).absolute()) if not Path(v).is_absolute() else v for v in values]


def source_image_bytes(src: Path, column: str, lo: int, hi: int) -> list[bytes]:
    """Image bytes of rows [lo, hi) of a table (Parquet row groups / Arrow batches outside the range are skipped)."""
    out: list[bytes] = []
    start = 0
    for batch in table_batches(src, [column])[1]:
        n = batch.num_rows
        if start + n > lo and start < hi:
            part = batch.slice(max(0, lo - start), min(hi, start + n) - max(lo, start)).column(0).to_pylist()
            out += [v["bytes"] if isinstance(v, dict) else v for v in part]
        start += n
        if start >= hi:
            break
    return out


ALPHA_BACKGROUNDS = {"white": 255, "black": 0}
HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")   # 16-bit greyscale PNG/TIFF (Pillow's "I" holds it too)


def load_image(source, shape: Sequence[int], alpha_background: str = "white"):
    """A path or encoded bytes -> float32 tensor [C, H, W] in [-1, 1]: shorter side resized to fit, centre
    crop (C = 1: greyscale, else RGB). Modes are handled explicitly (docs/store.md, "Input formats"):
    16-bit greyscale is scaled by 1/65535 (not clipped through 8 bits); an image with alpha (RGBA, LA, PA,
    a palette with a transparent colour) is composited on `alpha_background` (white | black), or refused
    with `refuse`; a float image ("F") is refused (its range is unknown)."""
    import io

    import torch
    from PIL import Image

    c, h, w = (int(s) for s in shape)
    name = "an image in data.images" if isinstance(source, (bytes, bytearray)) else str(source)
    img = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)
    if img.mode == "F":
        raise UserError(f"{name}: a floating-point image (mode F) has no known value range; save it as 8- or 16-bit")
    if img.mode in HIGH_DEPTH_MODES:
        return _from_unit_float(_high_depth(img, name), c, h, w)
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (img.mode == "P" and "transparency" in img.info):
        if alpha_background not in ALPHA_BACKGROUNDS:
            raise UserError(f"{name} has an alpha channel (mode {img.mode}) and data.alpha_background is "
                            f"'{alpha_background}'; set it to white or black to composite, or drop the alpha")
        rgba = img.convert("RGBA")
        back = Image.new("RGBA", rgba.size, (ALPHA_BACKGROUNDS[alpha_background],) * 3 + (255,))
        img = Image.alpha_composite(back, rgba)
    img = img.convert("L" if c == 1 else "RGB")
    scale = max(h / img.height, w / img.width)
    img = img.resize((max(w, round(img.width * scale)), max(h, round(img.height * scale))), Image.BICUBIC)
    left, top = (img.width - w) // 2, (img.height - h) // 2
    img = img.crop((left, top, left + w, top + h))
    arr = np.asarray(img, dtype=np.float32).reshape(h, w, -1).transpose(2, 0, 1)
    return torch.from_numpy(arr / 127.5 - 1.0)


def _high_depth(img, name: str) -> np.ndarray:
    """A 16-bit greyscale image as float32 [H, W] in [0, 1]."""
    arr = np.asarray(img).astype(np.float32)
    if arr.min() < 0 or arr.max() > 65535:
        raise UserError(f"{name}: 32-bit integer image with values outside 0..65535; save it as 8- or 16-bit")
    return arr / 65535.0


def _from_unit_float(grey: np.ndarray, c: int, h: int, w: int):
    """Greyscale in [0, 1] -> [C, H, W] in [-1, 1]: resize and crop as load_image, in float (no 8-bit step)."""
    import torch
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(grey, dtype=np.float32))   # mode F
    scale = max(h / img.height, w / img.width)
    img = img.resize((max(w, round(img.width * scale)), max(h, round(img.height * scale))), Image.BICUBIC)
    left, top = (img.width - w) // 2, (img.height - h) // 2
    arr = np.clip(np.asarray(img.crop((left, top, left + w, top + h)), dtype=np.float32), 0.0, 1.0)
    return torch.from_numpy(np.repeat(arr[None], c, axis=0) * 2.0 - 1.0)
