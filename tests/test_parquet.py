"""No Parquet file we read can run code: a pickled-object column is refused before any row is read.

Ray Data registers an Arrow extension type whose cells unpickle when read; these tests plant one (its pickle
writes a marker file when loaded) in every kind of file we read and check the marker never appears.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from medusa_ray import parquet
from medusa_ray.errors import UserError


class _Planted:
    """Unpickling this writes the file named by the environment variable: proof that code ran."""

    def __reduce__(self):
        return (os.system, (f"touch {os.environ['MEDUSA_RAY_PWNED']}",))


@pytest.fixture
def pwned(tmp_path, monkeypatch) -> Path:
    marker = tmp_path / "pwned"
    monkeypatch.setenv("MEDUSA_RAY_PWNED", str(marker))
    return marker


def _pickled_column(values: list) -> pa.Array:
    import ray.data  # noqa: F401 - registers the extension type, as every process that imports ray.data does
    from ray.data.extensions import ArrowPythonObjectArray

    return ArrowPythonObjectArray.from_objects(values)


def _messages(text: str) -> str:
    return json.dumps([{"role": "user", "content": text}, {"role": "assistant", "content": "ok"}])


def _write(path: Path, columns: dict[str, pa.Array]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path


def test_the_planted_cell_really_runs_code_when_read_plainly(tmp_path, pwned):
    """The hazard is real: without the check, reading the column unpickles and runs the payload."""
    f = _write(tmp_path / "p.parquet", {"messages": _pickled_column([_Planted()])})
    pq.read_table(f).to_pylist()
    assert pwned.exists()


def test_prompts_with_a_pickled_cell_are_refused_unread(tmp_path, pwned):
    from medusa_ray.data import read_conversations

    f = _write(tmp_path / "prompts.parquet", {"messages": _pickled_column([_Planted()])})
    with pytest.raises(UserError, match=r"prompts\.parquet: column 'messages' has the Arrow extension type"):
        read_conversations(f)
    assert not pwned.exists()


def test_nested_extension_types_are_refused(tmp_path, pwned):
    nested = pa.StructArray.from_arrays([pa.array(["x"]), _pickled_column([_Planted()])], ["text", "extra"])
    f = _write(tmp_path / "nested.parquet", {"id": pa.array(["a"]), "meta": nested})
    with pytest.raises(UserError, match="column 'meta'"):
        parquet.read_table(f)
    listed = pa.ListArray.from_arrays(pa.array([0, 1], pa.int32()), _pickled_column([_Planted()]))
    f = _write(tmp_path / "listed.parquet", {"id": pa.array(["a"]), "items": listed})
    with pytest.raises(UserError, match="column 'items'"):
        parquet.open_file(f)
    assert not pwned.exists()


def test_a_planted_shard_in_distills_output_is_refused_by_the_resume_scan(tmp_path, pwned):
    from medusa_ray.distill.output import existing_ids

    out = tmp_path / "distilled"
    _write(out / "shard-planted.parquet", {"id": _pickled_column([_Planted()]), "messages": pa.array([_messages("a")])})
    with pytest.raises(UserError, match="shard-planted.parquet: column 'id'"):
        existing_ids(out)
    assert not pwned.exists()


def test_training_rows_and_heldout_rows_with_a_pickled_cell_are_refused(tmp_path, pwned):
    from medusa_ray.train.data import check_schema
    from medusa_ray.train.plan import make_plan

    f = _write(tmp_path / "train" / "shard-0.parquet",
               {"id": pa.array(["a"]), "messages": pa.array([_messages("a")]), "model": _pickled_column([_Planted()])})
    for read in (lambda: check_schema([str(f)]), lambda: make_plan([str(f)], 0, 0.0, 1, 1)):
        with pytest.raises(UserError, match="column 'model'"):
            read()
    from medusa_ray.model.accuracy import head_accuracy

    f = _write(tmp_path / "heldout.parquet", {"messages": _pickled_column([_Planted()])})
    with pytest.raises(UserError, match="column 'messages'"):
        head_accuracy("unused-model", tmp_path, str(f), 1, 1)
    assert not pwned.exists()


def test_plain_files_still_read(tmp_path):
    f = _write(tmp_path / "ok.parquet", {"id": pa.array(["a"]), "messages": pa.array([_messages("hi")])})
    assert parquet.read_table(f, ["id"]).to_pylist() == [{"id": "a"}]
    assert parquet.num_rows(f) == 1
    with pytest.raises(UserError, match="not a readable Parquet file"):
        parquet.read_schema(tmp_path / "missing.parquet")
