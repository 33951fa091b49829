"""Tokenization and label masking: labels exactly on the assistant's tokens, nothing else."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from medusa_ray.errors import UserError
from medusa_ray.data.chat import BadRowError, load_tokenizer, tokenize_messages
from medusa_ray.train.data import check_schema, list_data_files, tokenize_batch

CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Count from 3 to 6."},
    {"role": "assistant", "content": "3, 4, 5, 6."},
    {"role": "user", "content": "Spell the word tiger."},
    {"role": "assistant", "content": "t-i-g-e-r."},
]


@pytest.fixture(scope="module")
def tokenizer(random_tiny_model):
    return load_tokenizer(str(random_tiny_model))


def _runs(labels):
    """Maximal runs of labelled positions as (start, end) index pairs."""
    runs, start = [], None
    for i, y in enumerate(labels + [-100]):
        if y != -100 and start is None:
            start = i
        elif y == -100 and start is not None:
            runs.append((start, i))
            start = None
    return runs


def test_multi_turn_chat_labels_exactly_the_assistant_turns(tokenizer):
    ex = tokenize_messages(tokenizer, CONVERSATION, "chat", max_length=512)
    assert ex.input_ids == tokenizer(tokenizer.apply_chat_template(CONVERSATION, tokenize=False),
                                     add_special_tokens=False)["input_ids"]
    runs = _runs(ex.labels)
    # One labelled run per assistant turn: its reply plus the end-of-turn token that closes it.
    replies = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    assert [tokenizer.decode(ex.input_ids[a:b]) for a, b in runs] == [r + "<|end|>" for r in replies]
    # Labels carry the token ids themselves; every other position (system, user, template) is masked.
    labelled = {i for a, b in runs for i in range(a, b)}
    for i, (tok, y) in enumerate(zip(ex.input_ids, ex.labels)):
        assert y == (tok if i in labelled else -100)
    # The token right before each run is the assistant header's newline, i.e. the prompt side.
    for a, _ in runs:
        assert tokenizer.decode(ex.input_ids[a - 2 : a]) == "<|assistant|>\n"
    assert not ex.truncated


def test_completion_rows_are_raw_text_with_labels_on_the_completion(tokenizer):
    messages = [{"role": "user", "content": "Count from 1 to 5:"}, {"role": "assistant", "content": " 1, 2, 3, 4, 5."}]
    ex = tokenize_messages(tokenizer, messages, "completion", max_length=512)
    assert ex.input_ids == tokenizer("Count from 1 to 5: 1, 2, 3, 4, 5.")["input_ids"]
    (a, b), = _runs(ex.labels)
    assert b == len(ex.input_ids)
    assert tokenizer.decode(ex.input_ids[a:]) == " 1, 2, 3, 4, 5."
    assert "<|user|>" not in tokenizer.decode(ex.input_ids)


def test_long_sequences_are_truncated_and_flagged(tokenizer):
    ex = tokenize_messages(tokenizer, CONVERSATION, "chat", max_length=12)
    assert len(ex.input_ids) == len(ex.labels) == 12 and ex.truncated


@pytest.mark.parametrize(
    "messages, mode, match",
    [
        ([{"role": "user", "content": "hi"}], "chat", "no assistant turn"),
        ([], "chat", "empty"),
        ([{"role": "user", "content": 3}], "chat", r"messages\[0\]"),
        (CONVERSATION, "completion", "exactly"),
        (CONVERSATION, "poetry", "mode"),
    ],
)
def test_bad_rows_are_rejected_with_the_reason(tokenizer, messages, mode, match):
    with pytest.raises(BadRowError, match=match):
        tokenize_messages(tokenizer, messages, mode, max_length=64)


def test_tokenize_batch_skips_and_names_the_bad_row(random_tiny_model):
    import numpy as np

    messages = np.empty(2, dtype=object)
    messages[0], messages[1] = CONVERSATION, [{"role": "user", "content": "hi"}]
    batch = {"id": np.array(["good", "bad-row-7"]), "mode": np.array(["chat", "chat"]), "messages": messages}
    out = tokenize_batch(batch, str(random_tiny_model), 64)
    assert out["bad"] == ["id=bad-row-7: no assistant turn to train on"]
    assert len(out["input_ids"]) == 1
    assert out["num_labels"][0] == sum(1 for y in out["labels"][0] if y != -100) > 0


def test_data_files_are_the_shards_directly_in_the_dir(tmp_path):
    table = pa.table({"id": ["a"], "messages": [CONVERSATION]})
    pq.write_table(table, tmp_path / "part-00001.parquet")
    pq.write_table(table, tmp_path / "part-00000.parquet")
    (tmp_path / "errors").mkdir()
    pq.write_table(pa.table({"id": ["x"], "error": ["boom"]}), tmp_path / "errors" / "part-00000.parquet")
    (tmp_path / ".part-00002.parquet.tmp").write_text("half written")
    assert [p.rsplit("/", 1)[1] for p in list_data_files(str(tmp_path))] == ["part-00000.parquet", "part-00001.parquet"]
    check_schema(list_data_files(str(tmp_path)))


def test_missing_or_malformed_data_is_a_one_line_user_error(tmp_path):
    with pytest.raises(UserError, match="no \\*.parquet"):
        list_data_files(str(tmp_path))
    with pytest.raises(UserError, match="not a directory"):
        list_data_files(str(tmp_path / "nope"))
    pq.write_table(pa.table({"id": ["a"], "text": ["hello"]}), tmp_path / "part-0.parquet")
    with pytest.raises(UserError, match=r"part-0.parquet: missing column 'messages'"):
        check_schema(list_data_files(str(tmp_path)))
