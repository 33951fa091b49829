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


def _generated(tokenizer, text, special="<|user|>", eos=True):
    """Ids a model could have generated for ``text``: one token per character (not how the tokenizer splits it),
    ``special`` after the third, and the end-of-sequence token last."""
    ids = [t for ch in text for t in tokenizer(ch, add_special_tokens=False)["input_ids"]]
    ids = ids[:3] + [tokenizer.convert_tokens_to_ids(special)] + ids[3:]
    return ids + [tokenizer.eos_token_id] * eos


def test_generated_token_ids_are_trained_verbatim_between_template_rendered_turns(tokenizer):
    """Item 0 of issue 23: a reply's stored ids (a special token inside, a split the tokenizer would not make)
    are the training sequence's reply tokens and its labels; the prompt around them is the template's."""
    first, second = _generated(tokenizer, "3, 4, 5, 6."), _generated(tokenizer, "t-i-g-e-r.", eos=False)
    assert tokenizer(tokenizer.decode(first, skip_special_tokens=True), add_special_tokens=False)["input_ids"] \
        != [t for t in first if t < 5]  # re-tokenizing the text would lose the split (and the special token)
    messages = [dict(m) for m in CONVERSATION]
    messages[2]["token_ids"], messages[4]["token_ids"] = first, second
    messages[2]["content"] = tokenizer.decode(first, skip_special_tokens=True)  # as vLLM returns the text
    ex = tokenize_messages(tokenizer, messages, "chat", max_length=512)
    assert not ex.retokenized

    def encode(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    prompt = tokenizer.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    middle = tokenizer.apply_chat_template(CONVERSATION[:4], tokenize=False, add_generation_prompt=True)
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    # The prompt exactly as vLLM tokenizes it, the first reply's ids with the end-of-sequence token the model
    # generated (the template's "<|end|>" is not repeated), the next turns, the second reply (cut at
    # max_tokens: no end token of its own, so the template's closes it) and the template's tail.
    assert ex.input_ids == (encode(prompt) + first + encode("\n" + middle[len(prompt) + len(CONVERSATION[2]["content"])
                                                                          + len("<|end|>\n"):])
                            + second + [end] + encode("\n"))
    assert [i for i, y in enumerate(ex.labels) if y != -100] == (
        list(range(len(encode(prompt)), len(encode(prompt)) + len(first)))
        + list(range(len(ex.input_ids) - len(second) - 2, len(ex.input_ids) - 1)))
    assert all(y in (-100, t) for t, y in zip(ex.input_ids, ex.labels))

    # A row without ids for a reply is re-tokenized there (and flagged); a row with none is exactly as before.
    messages[4].pop("token_ids")
    partly = tokenize_messages(tokenizer, messages, "chat", max_length=512)
    assert partly.retokenized and partly.input_ids[:len(encode(prompt)) + len(first)] == encode(prompt) + first
    plain = tokenize_messages(tokenizer, CONVERSATION, "chat", max_length=512)
    assert plain.retokenized and plain.input_ids == encode(tokenizer.apply_chat_template(CONVERSATION, tokenize=False))


def test_generated_ids_in_completion_rows_and_bad_ids(tokenizer):
    ids = _generated(tokenizer, " 1, 2, 3.")
    messages = [{"role": "user", "content": "Count from 1 to 3:"},
                {"role": "assistant", "content": tokenizer.decode(ids, skip_special_tokens=True), "token_ids": ids}]
    ex = tokenize_messages(tokenizer, messages, "completion", max_length=512)
    prompt = tokenizer("Count from 1 to 3:")["input_ids"]
    assert ex.input_ids == prompt + ids and ex.labels == [-100] * len(prompt) + ids and not ex.retokenized
    for bad in ([len(tokenizer)], ["7"], [True], 5):
        messages[1]["token_ids"] = bad
        with pytest.raises(BadRowError, match=r"messages\[1\].token_ids"):
            tokenize_messages(tokenizer, messages, "completion", max_length=512)


def test_tokenize_batch_flags_rows_trained_on_retokenized_text(random_tiny_model, tokenizer):
    import numpy as np

    with_ids = [dict(m) for m in CONVERSATION]
    for m in with_ids:
        if m["role"] == "assistant":
            m["token_ids"] = tokenizer(m["content"], add_special_tokens=False)["input_ids"]
    messages = np.empty(2, dtype=object)
    messages[0], messages[1] = with_ids, CONVERSATION
    out = tokenize_batch({"id": np.array(["ids", "text"]), "messages": messages}, str(random_tiny_model), 512)
    assert out["retokenized"].tolist() == [False, True]
    # Canonical ids and the template's end token: the same sequence either way.
    assert out["input_ids"][0].tolist() == out["input_ids"][1].tolist()
