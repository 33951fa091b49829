"""Input readers: every format gives the same conversations and ids; bad records are located, not fatal."""

from __future__ import annotations

import json

import pytest

from medusa_ray.data import detect_format, read_conversations
from medusa_ray.errors import UserError

CONVS = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count from 1 to 5."},
     {"role": "assistant", "content": "1, 2, 3, 4, 5."}],
    [{"role": "user", "content": "Spell the word tiger."}, {"role": "assistant", "content": "t-i-g-e-r."},
     {"role": "user", "content": "Now river."}, {"role": "assistant", "content": "r-i-v-e-r."}],
    [{"role": "user", "content": "Name 3 months starting from May."}],
]
_SPEAKER = {"system": "system", "user": "human", "assistant": "gpt"}


def _sharegpt(convs):
    return [{"conversations": [{"from": _SPEAKER[m["role"]], "value": m["content"]} for m in c]} for c in convs]


def _ids(result):
    return [c.id for c in result.conversations]


@pytest.fixture()
def files(tmp_path):
    sg = tmp_path / "sg.json"
    sg.write_text(json.dumps(_sharegpt(CONVS), indent=2))
    jl = tmp_path / "msgs.jsonl"
    jl.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVS))
    return sg, jl


def test_same_conversations_and_ids_in_every_format(files, tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    sg, jl = files
    pq.write_table(pa.table({"messages": CONVS}), tmp_path / "msgs.parquet")
    ds_dir = tmp_path / "hf"
    datasets.Dataset.from_dict({"messages": CONVS}).save_to_disk(str(ds_dir))

    results = {
        "sharegpt": read_conversations(sg),
        "jsonl": read_conversations(jl),
        "parquet": read_conversations(tmp_path / "msgs.parquet"),
        "hf": read_conversations(ds_dir),
    }
    for fmt, result in results.items():
        assert result.format == fmt
        assert [c.messages for c in result.conversations] == CONVS, fmt
        assert not result.invalid
    ids = _ids(results["jsonl"])
    assert len(set(ids)) == len(CONVS)
    assert all(_ids(r) == ids for r in results.values())
    assert results["parquet"].conversations[2].source.endswith("msgs.parquet[row 2]")
    # A re-read gives the same ids: they are what resume keys on.
    assert _ids(read_conversations(jl)) == ids


def test_sharegpt_records_know_their_line(files):
    sg, _ = files
    text = sg.read_text().splitlines()
    for conv in read_conversations(sg).conversations:
        line = int(conv.source.rsplit(":", 1)[1])
        assert text[line - 1].strip() == "{"
        assert conv.messages[0]["content"] in "\n".join(text[line - 1 : line + 4])


def test_bad_records_are_located_and_the_rest_is_read(tmp_path):
    path = tmp_path / "bad.jsonl"
    lines = [
        json.dumps({"messages": CONVS[0]}),
        '{"messages": [{"role": "user", "content": "unterminated',
        json.dumps({"messages": []}),
        "",
        json.dumps({"messages": [{"role": "assistant", "content": "hi"}]}),
        json.dumps({"messages": [{"role": "tool", "content": "x"}]}),
        json.dumps({"conversations": [{"from": "human", "value": 7}]}),
        json.dumps({"messages": CONVS[1]}),
        json.dumps({"messages": CONVS[0]}),  # duplicate of line 1
        json.dumps({"prompt": "Count from 3 to 9."}),
    ]
    path.write_text("\n".join(lines) + "\n")
    result = read_conversations(path)
    assert [c.source for c in result.conversations] == [f"{path}:1", f"{path}:8", f"{path}:10"]
    assert result.conversations[2].messages == [{"role": "user", "content": "Count from 3 to 9."}]
    reasons = {r.source.rsplit(":", 1)[1]: r.reason for r in result.invalid}
    assert set(reasons) == {"2", "3", "5", "6", "7"}
    assert "not valid JSON" in reasons["2"]
    assert reasons["3"] == "empty conversation"
    assert reasons["5"] == "no user turn"
    assert "unsupported role 'tool'" in reasons["6"]
    assert "must be a string" in reasons["7"]
    assert result.duplicates == 1
    assert len({r.id for r in result.invalid}) == 5
    assert result.records == 9


def test_limit_takes_the_first_records(files):
    _, jl = files
    result = read_conversations(jl, limit=2)
    assert [c.messages for c in result.conversations] == CONVS[:2]


def test_directory_of_prompt_files(files):
    sg, _ = files
    result = read_conversations(sg.parent)
    assert result.format == "files"
    assert result.duplicates == len(CONVS)  # the same conversations in both files: read once
    assert len(result.conversations) == len(CONVS)


def test_unreadable_inputs_fail_with_the_location(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('[\n  {"conversations": []},\n  {"conversations": [\n')
    with pytest.raises(UserError, match=r"broken\.json:4:1: not valid JSON"):
        read_conversations(broken)
    with pytest.raises(UserError, match="does not exist"):
        read_conversations(tmp_path / "missing.jsonl")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match="cannot tell the format"):
        detect_format(tmp_path / "notes.txt")
