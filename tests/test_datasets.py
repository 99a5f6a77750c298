"""Prompt datasets: every format read in batches into the store's prompts.parquet; each bad input one line."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.datasets import TextColumn, copy_text_column, text_batches
from pipeline.errors import UserError

ROWS = [f"prompt number {i}, with a comma" for i in range(25)]


def write_format(tmp_path, fmt: str, rows=ROWS, column="caption", extra=True):
    """`rows` in a file of format `fmt` under column `column` (plus an unrelated id column)."""
    cols = {"id": list(range(len(rows))), column: rows} if extra else {column: rows}
    if fmt == "txt":
        p = tmp_path / "p.txt"
        p.write_text("\n".join(rows) + "\n\n")
    elif fmt == "jsonl":
        p = tmp_path / "p.jsonl"
        p.write_text("".join(json.dumps({k: v[i] for k, v in cols.items()}) + "\n" for i in range(len(rows))))
    elif fmt == "csv":
        import pyarrow.csv as pcsv

        p = tmp_path / "p.csv"
        pcsv.write_csv(pa.table(cols), p)
    elif fmt == "parquet":
        p = tmp_path / "p.parquet"
        pq.write_table(pa.table(cols), p, row_group_size=7)      # several row groups
    elif fmt == "hf":
        import datasets

        p = tmp_path / "hf"
        datasets.Dataset.from_dict(cols).save_to_disk(str(p))
    return p


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "csv", "parquet", "hf"])
def test_every_format_reads_in_batches_and_copies(tmp_path, fmt, monkeypatch):
    import pipeline.datasets as ds

    monkeypatch.setattr(ds, "BATCH_ROWS", 10)        # the reader must stitch several batches
    src = write_format(tmp_path, fmt)
    batches = list(text_batches(src, None))
    assert sum(batches, []) == ROWS and max(len(b) for b in batches) <= 10 and len(batches) >= 3
    rows, sha = copy_text_column(src, tmp_path / "copy.parquet")
    col = TextColumn(tmp_path / "copy.parquet")
    assert rows == len(col) == 25 and list(col) == ROWS and col.take([24, 3, 3]) == [ROWS[24], ROWS[3], ROWS[3]]
    assert pq.ParquetFile(tmp_path / "copy.parquet").metadata.num_row_groups == 3
    assert copy_text_column(write_format(tmp_path, "txt"), tmp_path / "again.parquet")[1] == sha   # same rows


def test_prompt_column_picks_and_defaults(tmp_path):
    src = write_format(tmp_path, "parquet", column="text")
    assert sum(text_batches(src), []) == ROWS                    # default: prompt, caption, text in that order
    both = tmp_path / "both.parquet"
    pq.write_table(pa.table({"text": ["t"], "prompt": ["p"]}), both)
    assert sum(text_batches(both), []) == ["p"] and sum(text_batches(both, "text"), []) == ["t"]


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet", "hf"])
def test_missing_column_names_the_columns_found(tmp_path, fmt):
    src = write_format(tmp_path, fmt, column="words")
    with pytest.raises(UserError, match=r"none of the columns prompt, caption, text \(columns found: id, words\)"):
        list(text_batches(src))
    with pytest.raises(UserError, match=r"generate.prompt_column 'cap' is not a column .*found: id, words"):
        list(text_batches(src, "cap"))


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "csv", "parquet"])
def test_empty_file_is_refused(tmp_path, fmt):
    src = {"txt": tmp_path / "e.txt", "jsonl": tmp_path / "e.jsonl", "csv": tmp_path / "e.csv",
           "parquet": tmp_path / "e.parquet"}[fmt]
    if fmt == "parquet":
        pq.write_table(pa.table({"caption": pa.array([], pa.string())}), src)
    elif fmt == "csv":
        src.write_text("caption\n")
    else:
        src.write_text("\n" if fmt == "txt" else "")
    with pytest.raises(UserError, match="no rows|has none of the columns|empty"):
        copy_text_column(src, tmp_path / "out.parquet")
    assert not (tmp_path / "out.parquet").exists()               # nothing written


def test_null_and_non_text_rows_are_named(tmp_path):
    rows = list(ROWS)
    rows[13] = None
    src = tmp_path / "n.parquet"
    pq.write_table(pa.table({"caption": rows}), src, row_group_size=5)
    with pytest.raises(UserError, match=r"n.parquet: column 'caption' row 13 is null"):
        list(text_batches(src))
    ints = tmp_path / "i.parquet"
    pq.write_table(pa.table({"caption": [1, 2, 3]}), ints)
    with pytest.raises(UserError, match=r"column 'caption' row 0 is int64, not text"):
        list(text_batches(ints))
    js = tmp_path / "m.jsonl"
    js.write_text('{"caption": "a"}\n{"caption": 7}\n{"caption": null}\n')
    with pytest.raises(UserError, match=r"m.jsonl: column 'caption' row 1 is not text"):
        list(text_batches(js))
    js.write_text('{"caption": "a"}\n{"caption": null}\n')
    with pytest.raises(UserError, match=r"row 1 is null"):
        list(text_batches(js))
    js.write_text('{"caption": "a"}\n{"caption": "b"\n')
    with pytest.raises(UserError, match=r"line 2 is not valid JSON"):
        list(text_batches(js))


def test_unknown_extension_and_missing_path(tmp_path):
    bad = tmp_path / "p.xlsx"
    bad.write_text("x")
    with pytest.raises(UserError, match=r"unknown extension '.xlsx' \(expected .txt, .jsonl, .csv, .parquet"):
        list(text_batches(bad))
    with pytest.raises(UserError, match="not found"):
        list(text_batches(tmp_path / "nope.parquet"))
    (tmp_path / "folder").mkdir()
    with pytest.raises(UserError, match="not a saved HF dataset"):
        list(text_batches(tmp_path / "folder"))


def test_bad_prompts_file_is_one_cli_line_and_writes_nothing(make_toy_config, tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli import app
    from schemas.config import load_config

    rows = list(ROWS)
    rows[4] = None
    src = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"caption": rows}), src)
    path = make_toy_config(generate={"prompts": str(src)})
    res = CliRunner().invoke(app, ["generate", "--config", str(path)])
    assert res.exit_code == 2
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert lines == [f"error: {src}: column 'caption' row 4 is null"]
    assert not load_config(path).stage_dir("generate").exists()


def test_generate_from_a_parquet_caption_table(make_toy_config, tmp_path):
    """Prompts from a Parquet `caption` column: the store holds them beside it and each row's condition."""
    from pipeline.runner import run_job
    from pipeline.store import TrajectoryStore, generated_store_path
    from pipeline.teachers import load_teacher
    from schemas.config import load_config
    from stages.generate import jobs

    src = write_format(tmp_path, "parquet", rows=ROWS[:5])
    cfg = load_config(make_toy_config(generate={"prompts": str(src), "samples_per_prompt": 1, "shard_size": 2,
                                                "store_dtype": "float16"},
                                      teacher={"describe": "pipeline.teachers.toy:describe_toy_teacher"}))
    [job] = jobs(cfg)
    run_job(job, "local", progress=False)
    store = TrajectoryStore.open(generated_store_path(cfg))
    assert list(store.prompts) == ROWS[:5] and store.num_prompts == 5 and str(store.states.dtype) == "float16"
    enc = load_teacher(cfg).encode(ROWS[:5])
    got = store.row_cond([4, 0])               # sample rows 4 and 0: prompts 4 and 0
    assert torch_close(got["encoder_hidden_states"], enc["encoder_hidden_states"][[4, 0]])
    assert got["encoder_hidden_states"].dtype.is_floating_point and str(got["pooled_projections"].dtype) == "torch.float32"


def torch_close(a, b) -> bool:
    import torch

    return torch.allclose(a, b.float(), rtol=1e-3, atol=1e-3) and not torch.equal(a, b.float())
