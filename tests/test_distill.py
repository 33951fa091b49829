"""distill end to end on the tiny model: real Ray Serve vLLM deployment, real Ray Data, real vLLM references.

One Serve deployment serves the whole module (``distill.run`` reuses a running identical app); a vLLM
OpenAI server for the endpoint test starts in the background at module start so its start-up overlaps.
Engines run in fp32: bf16 greedy outputs can depend on what else is in the batch, fp32 ones do not.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import asyncio

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from medusa_ray import distill, faults
from medusa_ray.config import build_config
from medusa_ray.data import read_conversations
from medusa_ray.distill import plan_rounds
from medusa_ray.distill.engine import _endpoint_base, parse_reply, serve_deployment
from medusa_ray.tiny import corpus
from endpoint_standin import FlakyEndpoint
from helpers import free_port, wait_for

ENGINE_KWARGS = {"gpu_memory_utilization": 0.1, "enforce_eager": True, "max_model_len": 512, "dtype": "float32"}
MAX_TOKENS = 64
NUM_PROMPTS = 20
_SPEAKER = {"system": "system", "user": "human", "assistant": "gpt"}


# ---------------------------------------------------------------- fast unit tests (no Ray)


def test_rounds_drop_source_answers_and_keep_system_turns():
    s, u1, a1, u2, a2, u3 = (
        {"role": "system", "content": "S"}, {"role": "user", "content": "U1"}, {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "U2"}, {"role": "assistant", "content": "A2"}, {"role": "user", "content": "U3"},
    )
    assert plan_rounds([s, u1, a1, u2, a2], "chat") == [[s, u1], [u2]]
    assert plan_rounds([s, u1, a1, u2, a2, u3], "chat") == [[s, u1], [u2], [u3]]
    # Consecutive user turns are one round; a leading greeting answers nothing.
    assert plan_rounds([a1, u1, u2, a2], "chat") == [[u1, u2]]
    assert plan_rounds([s, u1, a1, u2], "completion") == [[{"role": "user", "content": "U1"}]]


class _ScriptedClient:
    """Replies from a script, in order; records what it was sent."""

    def __init__(self, replies):
        self.replies, self.sent = list(replies), []

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        pass

    async def complete(self, body):
        self.sent.append(body)
        reply = self.replies.pop(0)
        return {"text": "", "finish_reason": "", "prompt_tokens": 1, "completion_tokens": 0, "token_ids": None,
                "error": "", **reply}


def _distill_one(messages, replies, overrides=(), row_id="c1"):
    """Run one conversation through the real ``Distiller`` UDF with a scripted client: (outcome row, client)."""
    from medusa_ray.distill.conversation import Distiller
    from medusa_ray.distill.source import PROMPT_SCHEMA

    client = _ScriptedClient(replies)
    udf = Distiller(build_config({}, list(overrides)).to_dict(), "m", {}, in_flight=4,
                    client_factory=lambda spec: client)
    batch = pa.Table.from_pylist([{"id": row_id, "messages": json.dumps(messages), "source": "f:1", "mode": None,
                                   "invalid": None}], schema=PROMPT_SCHEMA)
    (row,) = asyncio.run(udf(batch)).to_pylist()
    return row, client


def _text(messages):
    """Messages as role and content only (rows also carry each reply's ``token_ids``)."""
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def test_a_reply_cut_at_max_tokens_is_kept_and_ends_the_conversation():
    messages = [{"role": "user", "content": "count to 100"}, {"role": "assistant", "content": "1 2 3"},
                {"role": "user", "content": "and back"}, {"role": "assistant", "content": "3 2 1"}]
    row, client = _distill_one(messages, [{"text": "1 2 3 4", "finish_reason": "length", "prompt_tokens": 5,
                                           "completion_tokens": 4}], ["distill.max_tokens=4"])
    assert len(client.sent) == 1  # no second round after a cut-off reply
    assert row["outcome"] == "row" and row["finish_reason"] == "length" and row["generated_tokens"] == 4
    assert _text(row["messages"]) == [messages[0], {"role": "assistant", "content": "1 2 3 4"}]


def test_each_round_follows_the_models_own_history():
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U1"},
                {"role": "assistant", "content": "source answer"}, {"role": "user", "content": "U2"}]
    row, client = _distill_one(messages, [{"text": "A1", "finish_reason": "stop", "completion_tokens": 2,
                                           "token_ids": [7, 4, 9]},
                                          {"text": "A2", "finish_reason": "stop", "completion_tokens": 3}])
    # The next round sends the reply's text (role and content only); the row keeps each reply's ids.
    assert [b["messages"] for b in client.sent] == [
        messages[:2], messages[:2] + [{"role": "assistant", "content": "A1"}, messages[3]]]
    assert all(b["return_token_ids"] is True for b in client.sent)
    assert [m["token_ids"] for m in row["messages"]] == [None, None, [7, 4, 9], None, None]
    assert row["messages"][-1] == {"role": "assistant", "content": "A2", "token_ids": None}
    assert row["completion_tokens"] == 5 and row["prompt_tokens"] == 2
    # An empty answer ends the conversation as an error, not a row.
    row, _ = _distill_one(messages, [{"text": " ", "finish_reason": "stop"}])
    assert row["outcome"] == "empty" and row["round"] == 0


def test_failed_requests_are_retried_with_backoff_and_again_on_a_rerun(tmp_path, monkeypatch):
    from medusa_ray.distill import conversation
    from medusa_ray.distill.output import ERROR_SCHEMA, existing_ids

    waits = []

    async def sleep(seconds):
        waits.append(seconds)

    monkeypatch.setattr(conversation.asyncio, "sleep", sleep)
    down = {"error": "503 replica unavailable"}
    ok = {"text": "hello", "finish_reason": "stop", "completion_tokens": 1}
    row, client = _distill_one([{"role": "user", "content": "hi"}], [down, down, ok],
                               ["distill.max_retries=2", "distill.retry_backoff_s=3"])
    assert len(client.sent) == 3 and waits == [3.0, 6.0]  # waited before each retry, longer each time
    assert row["outcome"] == "row"
    row, _ = _distill_one([{"role": "user", "content": "hi"}], [down, down], ["distill.max_retries=1"])
    assert row["outcome"] == "failed" and row["attempts"] == 2 and "503" in row["error"]

    # Recorded failures are not final: a re-run retries them. Empty replies and invalid input stay done.
    out = tmp_path / "b"
    (out / "errors").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(
        [{"id": cid, "source": "f:1", "reason": reason, "error": "x", "round": 0, "attempts": 3, "model": "m"}
         for cid, reason in (("failed-1", "failed"), ("empty-1", "empty"), ("invalid-1", "invalid"))],
        schema=ERROR_SCHEMA), out / "errors" / "errors-a.parquet")
    assert existing_ids(out) == (set(), {"empty-1", "invalid-1"})


def test_samples_have_their_own_ids_and_seeds_and_resume_skips_each_sample_written(tmp_path):
    """distill.samples_per_prompt: each sample of a conversation is a row with its own id and seeds (sample 0
    keeps the conversation's id and seeds); a re-run claims only the samples not yet written."""
    from medusa_ray.distill.conversation import request_seed
    from medusa_ray.distill.output import DATA_SCHEMA
    from medusa_ray.distill.source import PROMPT_SCHEMA, Ledger, expand

    with pytest.raises(Exception, match="samples_per_prompt=3 needs temperature > 0"):
        build_config({}, ["distill.samples_per_prompt=3"])
    out = tmp_path / "out"
    out.mkdir()
    written = [{"id": i, "prompt_id": "c1", "messages": [{"role": "user", "content": "q"}]} for i in ("c1", "c1#s2")]
    pq.write_table(pa.Table.from_pylist(written, schema=DATA_SCHEMA), out / "shard-a.parquet")
    ledger = Ledger(str(out), samples=3)
    todo = ledger.claim(["c1", "c2", "bad", "c1"], [True, True, False, True])
    assert todo == [[1], [0, 1, 2], [0], []]  # an invalid record is reported once; a repeat is dropped
    assert {k: ledger.counts[k] for k in ("records", "skipped", "duplicates")} == \
        {"records": 4, "skipped": 2, "duplicates": 1}
    records = pa.Table.from_pylist([{"id": i, "messages": "[]", "source": "f:1", "mode": None,
                                     "invalid": None if i != "bad" else "x"} for i in ("c1", "c2", "bad", "c1")],
                                   schema=PROMPT_SCHEMA)
    rows = expand(records, todo).to_pylist()
    assert [(r["id"], r["prompt_id"], r["sample"]) for r in rows] == [
        ("c1#s1", "c1", 1), ("c2", "c2", 0), ("c2#s1", "c2", 1), ("c2#s2", "c2", 2), ("bad", "bad", 0)]

    # Each sample's requests are seeded from distill.seed and its own id; sample 0's seeds are the old ones.
    conversation = [{"role": "user", "content": "hi"}]
    sent = {}
    for rid in ("c1", "c1#s1", "c1#s2"):
        row, client = _distill_one(conversation, [{"text": "hello", "finish_reason": "stop"}],
                                   ["distill.temperature=0.8", "distill.samples_per_prompt=3", "distill.seed=5"],
                                   row_id=rid)
        assert row["id"] == rid and row["prompt_id"] == rid  # the test sends no prompt_id: the row's own id
        sent[rid] = client.sent[0]["seed"]
    assert sent["c1"] == request_seed(5, "c1", 0, 0) and len(set(sent.values())) == 3


def test_an_endpoint_that_refuses_return_token_ids_is_asked_without_it():
    """OpenAI's own API refuses fields it does not know: the client drops the field (once, for every later
    request too) and the rows keep the reply text only."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from medusa_ray.distill.engine import HttpClient

    bodies = []

    class Strict(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            bodies.append(body)
            refused = "return_token_ids" in body
            reply = ({"error": {"message": "Unrecognized request argument supplied: return_token_ids"}} if refused
                     else {"choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}]})
            data = json.dumps(reply).encode()
            self.send_response(400 if refused else 200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Strict)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    async def ask():
        async with HttpClient(f"http://127.0.0.1:{server.server_address[1]}/v1/chat/completions", {}, "chat",
                              10.0) as client:
            body = {"model": "m", "messages": [], "return_token_ids": True}
            return [await client.complete(dict(body)) for _ in range(2)], client.token_ids

    try:
        replies, asks_for_ids = asyncio.run(ask())
    finally:
        server.shutdown()
        server.server_close()
    assert [r["text"] for r in replies] == ["hi", "hi"] and all(r["token_ids"] is None for r in replies)
    assert ["return_token_ids" in b for b in bodies] == [True, False, False] and not asks_for_ids


def test_reply_parsing_and_endpoint_urls():
    chat = {"choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2}}
    assert parse_reply(chat, "chat") == {"text": "hi", "finish_reason": "stop", "prompt_tokens": 3,
                                         "completion_tokens": 2, "token_ids": None, "error": ""}
    chat["choices"][0]["token_ids"] = [5, 0, 4]
    assert parse_reply(chat, "chat")["token_ids"] == [5, 0, 4]
    chat["choices"][0]["token_ids"] = [5, "x"]
    assert "token_ids is not a list of token ids" in parse_reply(chat, "chat")["error"]
    assert parse_reply({"choices": [{"text": "x", "finish_reason": "length"}]}, "completion")["finish_reason"] == "length"
    assert parse_reply({"error": {"message": "too long", "code": 400}}, "chat")["error"] == "too long"
    assert parse_reply({"object": "error", "message": "bad"}, "chat")["error"] == "bad"
    assert _endpoint_base("http://h:1") == "http://h:1/v1"
    assert _endpoint_base("http://h:1/v1/") == "http://h:1/v1"
    assert _endpoint_base("http://h:1/v1/chat/completions") == "http://h:1/v1"


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    """20 conversations (some multi-turn, some with a system turn): 10 ShareGPT + 10 JSONL, plus 2 bad lines and
    a repeat."""
    convs = corpus.conversations(NUM_PROMPTS, seed=11, max_user_turns=3)
    assert any(sum(m["role"] == "user" for m in c) > 1 for c in convs)
    d = tmp_path_factory.mktemp("prompts")
    sharegpt = [{"conversations": [{"from": _SPEAKER[m["role"]], "value": m["content"]} for m in c]}
                for c in convs[:10]]
    (d / "a_sharegpt.json").write_text(json.dumps(sharegpt, indent=1))
    lines = [json.dumps({"messages": c}) for c in convs[10:]]
    lines.insert(3, '{"messages": [{"role": "user", "content": "oops"')  # line 4: malformed
    lines.insert(6, json.dumps({"messages": []}))  # line 7: empty conversation
    lines.append(json.dumps({"messages": convs[0]}))  # a repeat of the first ShareGPT conversation
    (d / "b_messages.jsonl").write_text("\n".join(lines) + "\n")
    return d


@pytest.fixture(scope="module")
def openai_server(tiny_model, tmp_path_factory):
    """A vLLM OpenAI server on a free port, started now and waited for only where it is used."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("server") / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_model),
         "--host", "127.0.0.1", "--port", str(port), "--gpu-memory-utilization", "0.1", "--enforce-eager",
         "--max-model-len", "512", "--dtype", "float32", "--disable-log-stats"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"},
    )
    yield f"http://127.0.0.1:{port}", proc, Path(log.name)
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def _cfg(model, input_path, output_dir, **distill_keys):
    return build_config({
        "model": str(model),
        "ray": {"num_cpus": 8, "object_store_gb": 1.0},
        "distill": {"input": str(input_path), "output_dir": str(output_dir), "max_tokens": MAX_TOKENS,
                    "engine_kwargs": ENGINE_KWARGS, "shard_size": 4, **distill_keys},
    })


@pytest.fixture(scope="module")
def serve_app(ray_session, tiny_model, prompts, openai_server, tmp_path_factory):
    cfg = _cfg(tiny_model, prompts, tmp_path_factory.mktemp("unused"))
    with serve_deployment(cfg) as name:
        yield name


@pytest.fixture(scope="module")
def distill_run(serve_app, tiny_model, prompts, tmp_path_factory):
    cfg = _cfg(tiny_model, prompts, tmp_path_factory.mktemp("distill") / "out")
    return cfg, distill.run(cfg)


def _shards(directory: Path) -> list[Path]:
    # Complete shards only: pathlib's glob also matches the hidden .tmp- file of a write in progress.
    return sorted(f for f in directory.glob("*.parquet") if not f.name.startswith("."))


def _rows(out: Path) -> list[dict]:
    return [r for f in _shards(out) for r in pq.read_table(f).to_pylist()]


def _errors(out: Path) -> list[dict]:
    return [r for f in _shards(out / "errors") for r in pq.read_table(f).to_pylist()]


# ---------------------------------------------------------------- end to end


@pytest.mark.slow
def test_assistant_turns_equal_greedy_vllm_chat(distill_run, tiny_model, prompts, tmp_path):
    cfg, summary = distill_run
    out = Path(cfg.distill.output_dir)
    rows, errors = _rows(out), _errors(out)
    source = {c.id: c for c in read_conversations(prompts).conversations}
    assert len(source) == NUM_PROMPTS
    assert summary.rows_in == NUM_PROMPTS + 3 and summary.invalid == 2 and summary.duplicates == 1
    assert summary.shards == len(_shards(out)) and all(
        pq.ParquetFile(f).metadata.num_rows <= 4 for f in _shards(out))  # shard_size
    assert summary.rows_out == len(rows) and summary.rows_out >= NUM_PROMPTS // 2
    assert summary.rows_out + summary.failed + summary.empty == NUM_PROMPTS
    # Replies cut at max_tokens are kept as rows (finish_reason "length"), never recorded as errors.
    assert summary.truncated == sum(r["finish_reason"] == "length" for r in rows)
    assert not any(e["reason"] == "truncated" for e in errors)
    assert summary.generated_tokens >= sum(r["completion_tokens"] for r in rows) > 0
    assert sorted([r["id"] for r in rows] + [e["id"] for e in errors if e["reason"] != "invalid"]) == sorted(source)
    assert any(sum(m["role"] == "assistant" for m in r["messages"]) > 1 for r in rows), "no multi-turn row"

    histories, expected, expected_ids = [], [], []
    for row in rows:
        src = source[row["id"]].messages
        # System and user turns are kept verbatim; each round is followed by exactly one regenerated answer.
        assert [m for m in _text(row["messages"]) if m["role"] != "assistant"] == \
            [m for m in src if m["role"] != "assistant"]
        assert sum(m["role"] == "assistant" for m in row["messages"]) == len(plan_rounds(src, "chat"))
        assert row["mode"] == "chat" and row["model"] == str(tiny_model) and row["finish_reason"] == "stop"
        assert row["sampling"] == {"temperature": 0.0, "top_p": 1.0, "max_tokens": MAX_TOKENS, "seed": 0}
        for i, m in enumerate(row["messages"]):
            if m["role"] == "assistant":
                histories.append(_text(row["messages"][:i]))
                expected.append(m["content"])
                expected_ids.append(m["token_ids"])

    # Completion mode through the same deployment: raw prompt in, completion out. The tiny model only
    # answers after its chat markers, so the raw prompts carry them, as a user of a template-less model would.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    firsts = [next(m["content"] for m in c.messages if m["role"] == "user") for c in list(source.values())[:6]]
    raw = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
           for q in firsts]
    (tmp_path / "raw.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in raw))
    comp_cfg = _cfg(tiny_model, tmp_path / "raw.jsonl", tmp_path / "completion", mode="completion")
    comp = distill.run(comp_cfg)
    comp_rows = _rows(tmp_path / "completion")
    assert comp.rows_out == len(comp_rows) >= 3
    for row in comp_rows:
        assert row["mode"] == "completion" and [m["role"] for m in row["messages"]] == ["user", "assistant"]

    from vllm import LLM, SamplingParams

    llm = LLM(model=str(tiny_model), seed=0, **ENGINE_KWARGS)
    greedy = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    outputs = [o.outputs[0] for o in llm.chat(histories, greedy, use_tqdm=False)]
    assert [o.text for o in outputs] == expected
    # Each reply's stored ids are the ids vLLM generated (its end-of-sequence token included).
    assert [list(o.token_ids) for o in outputs] == expected_ids
    outputs = [o.outputs[0] for o in llm.generate([r["messages"][0]["content"] for r in comp_rows], greedy,
                                                  use_tqdm=False)]
    assert [o.text for o in outputs] == [r["messages"][1]["content"] for r in comp_rows]
    assert [list(o.token_ids) for o in outputs] == [r["messages"][1]["token_ids"] for r in comp_rows]
    del llm


SAMPLED = {"temperature": 2.0, "samples_per_prompt": 2, "seed": 3, "limit": 14}
"""Sampling hot enough that the tiny model's replies hold special tokens and token splits its tokenizer would not
make (with skip_special_tokens the text loses the first, re-tokenizing it the second). The first 14 records: the
10 ShareGPT conversations, 3 JSONL ones and the malformed line 4."""


@pytest.mark.slow
def test_sampled_replies_are_kept_as_generated_ids_and_trained_on_verbatim(serve_app, tiny_model, prompts,
                                                                            tmp_path):
    """Issue 23, items 0 and 2: samples_per_prompt replies per conversation, each its own row; each reply's ids are
    what vLLM generated (special tokens and the model's own split kept, its end token included), and the
    training sequence is the prompt vLLM served followed by exactly those ids. Re-runs resume per sample."""
    from ray import serve
    from ray.serve.llm.openai_api_models import ChatCompletionRequest
    from transformers import AutoTokenizer

    from medusa_ray.data import load_tokenizer, prompt_id_of, tokenize_messages
    from medusa_ray.distill.conversation import request_seed

    out = tmp_path / "out"
    cfg = _cfg(tiny_model, prompts, out, **SAMPLED)
    summary = distill.run(cfg)
    rows = _rows(out)
    written = {r["id"] for r in rows} | {e["id"] for e in _errors(out) if e["reason"] != "invalid"}
    valid = {c.id for c in read_conversations(prompts).conversations} & {prompt_id_of(i) for i in written}
    assert written == {i for p in valid for i in (p, f"{p}#s1")}  # every sample of every conversation, once
    assert all(r["prompt_id"] == prompt_id_of(r["id"]) for r in rows) and summary.rows_out == len(rows)
    assert summary.without_token_ids == 0 and "samples per conversation" in summary.summary()
    assert {r["messages"][-1]["content"] for r in rows if r["id"].endswith("#s1")} != \
        {r["messages"][-1]["content"] for r in rows if not r["id"].endswith("#s1")}  # samples differ

    tok = load_tokenizer(str(tiny_model))
    special = set(AutoTokenizer.from_pretrained(str(tiny_model)).added_tokens_decoder)
    eos = tok.eos_token_id
    inside, resplit = 0, 0
    for row in rows:
        replies = [m for m in row["messages"] if m["role"] == "assistant"]
        for j, m in enumerate(replies):
            ids = m["token_ids"]
            assert ids and (tok.decode(ids, skip_special_tokens=True) == m["content"] or "\ufffd" in m["content"])
            # Stopped by the model: vLLM's ids end with the end-of-sequence token it generated.
            last = j == len(replies) - 1 and row["finish_reason"] == "length"
            assert (ids[-1] == eos) != last
            inside += any(t in special for t in ids[:-1])
            resplit += tok(m["content"], add_special_tokens=False)["input_ids"] != [t for t in ids if t not in special]
        # Training learns exactly the generated ids of every reply (a cut reply closed by the template's <|end|>).
        ex = tokenize_messages(tok, row["messages"], "chat", 4096)
        assert not ex.retokenized
        assert [y for y in ex.labels if y != -100] == [
            t for m in replies for t in m["token_ids"] + ([] if m["token_ids"][-1] == eos else [eos])]
    assert inside and resplit, (inside, resplit)  # the case this test is about really happened

    # The first reply's training sequence is what vLLM served: its prompt ids, then its generated ids (asked of
    # the Serve deployment again with the row's own request seed, through the client distill uses).
    handle = serve.get_deployment_handle(f"{serve_app}-llm", serve_app).options(stream=True)
    for row in rows[:3]:
        k = next(i for i, m in enumerate(row["messages"]) if m["role"] == "assistant")
        history = _text(row["messages"][:k])
        body = {"model": str(tiny_model), "messages": history, "temperature": SAMPLED["temperature"], "top_p": 1.0,
                "max_tokens": MAX_TOKENS, "seed": request_seed(SAMPLED["seed"], row["id"], 0, 0),
                "return_token_ids": True}
        response = next(iter(handle.chat.remote(ChatCompletionRequest(**body)))).model_dump()
        served = response["prompt_token_ids"] + response["choices"][0]["token_ids"]
        assert response["choices"][0]["token_ids"] == row["messages"][k]["token_ids"]
        ex = tokenize_messages(tok, row["messages"][: k + 1], "chat", 4096)
        assert ex.input_ids[: len(served)] == served
        assert tok.decode(ex.input_ids[len(served):]) == "\n"  # then only the template's newline after <|end|>

    # Resume: nothing left to do; one more sample per conversation generates exactly the new samples.
    again = distill.run(cfg)
    assert again.rows_out == 0 and again.skipped == len(written) + 1 and again.invalid == 0  # + the bad line
    more = distill.run(_cfg(tiny_model, prompts, out, **{**SAMPLED, "samples_per_prompt": 3}))
    new = {r["id"] for r in _rows(out)} - {r["id"] for r in rows}
    assert more.skipped == len(written) + 1 and new and all(i.endswith("#s2") for i in new)
    assert [r for r in _rows(out) if r["id"] in {x["id"] for x in rows}] == rows


@pytest.mark.slow
def test_seeded_sampling_survives_prompts_prefilled_over_several_engine_steps(serve_app, tiny_model, tmp_path):
    """On vLLM's CPU build a seeded request whose prompt was prefilled over two engine steps (chunked prefill)
    killed the engine ("CPU Generator does not use offset"): vLLM rewinds that request's generator, which a CPU
    generator cannot do. Sampled replies to more prompt tokens than one engine step takes must all come back."""
    words = " ".join(corpus.plain_text(200, seed=4))
    prompts = tmp_path / "long.jsonl"
    prompts.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"{i} {words[i:i + 300]}"}]})
                               + "\n" for i in range(60)))
    summary = distill.run(_cfg(tiny_model, prompts, tmp_path / "out", temperature=0.8, samples_per_prompt=2,
                               seed=1))
    assert (summary.rows_out, summary.failed) == (120, 0)


@pytest.mark.slow
def test_bad_lines_are_reported_with_location(distill_run, prompts):
    cfg, _ = distill_run
    invalid = {e["source"]: e for e in _errors(Path(cfg.distill.output_dir)) if e["reason"] == "invalid"}
    jsonl = prompts / "b_messages.jsonl"
    assert set(invalid) == {f"{jsonl}:4", f"{jsonl}:7"}
    assert "not valid JSON" in invalid[f"{jsonl}:4"]["error"]
    assert invalid[f"{jsonl}:7"]["error"] == "empty conversation"


@pytest.mark.slow
@pytest.mark.parametrize("fail_at", ["first_reply", "later_round", "shard_write"])
def test_killed_run_resumes_without_loss_or_duplicates(fail_at, distill_run, ray_session, tiny_model, prompts,
                                                       tmp_path):
    """Killed (driver and worker, SIGKILL) during the first round, mid multi-turn, and between writing a shard and
    renaming it: the re-run finds every input conversation exactly once across data and errors/."""
    out = tmp_path / "out"
    cfg = _cfg(tiny_model, prompts, out, shard_size=2)
    cfg_file = tmp_path / "distill.yaml"
    tree = cfg.to_dict()
    tree["ray"]["address"] = ray_session.get_runtime_context().gcs_address  # joins our cluster: reuses the app
    cfg_file.write_text(yaml.safe_dump(tree))
    log = tmp_path / "cli.log"
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-m", "medusa_ray", "distill", "--config", str(cfg_file)],
                              stdout=f, stderr=subprocess.STDOUT, timeout=600,
                              env={**os.environ, **faults.env(distill_kill_at=fail_at)})
    assert proc.returncode == -signal.SIGKILL, log.read_text()[-3000:]
    first = {r["id"] for r in _rows(out)}
    assert len(first) < NUM_PROMPTS  # really interrupted mid-way
    if fail_at == "shard_write":
        assert list(out.glob(".tmp-*")) or list((out / "errors").glob(".tmp-*"))  # died holding a half shard

    summary = distill.run(cfg)
    ids = [r["id"] for r in _rows(out)] + [e["id"] for e in _errors(out)]
    expected = {c.id for c in read_conversations(prompts).conversations}
    assert len(ids) == len(set(ids)) == NUM_PROMPTS + 2
    assert expected <= set(ids)
    assert summary.skipped >= len(first)
    assert not list(out.glob(".tmp-*")) and not list((out / "errors").glob(".tmp-*"))
    # The second run's rows equal the uninterrupted run's: greedy output does not depend on the kill.
    reference = {r["id"]: r["messages"] for r in _rows(Path(distill_run[0].distill.output_dir))}
    assert {r["id"]: r["messages"] for r in _rows(out)} == reference
    if fail_at == "first_reply":
        again = distill.run(cfg)  # nothing left: no engine is started, nothing is written
        assert again.rows_out == 0 and again.skipped == NUM_PROMPTS + 2 and again.shards == 0
        assert again.duplicates == 1 and again.startup_s == 0


@pytest.mark.slow
def test_endpoint_openai_server(openai_server, distill_run, tiny_model, prompts, tmp_path):
    url, proc, log = openai_server

    def answers() -> bool:
        try:
            urllib.request.urlopen(url + "/v1/models", timeout=2).read()
            return True
        except OSError:
            return False

    wait_for(answers, 300, "vLLM OpenAI server did not come up", interval=0.5,
             alive=lambda: proc.poll() is not None and log.read_text()[-3000:])
    out = tmp_path / "out"
    cfg = _cfg(tiny_model, prompts / "a_sharegpt.json", out, endpoint=url, concurrency=2)
    summary = distill.run(cfg)
    rows = _rows(out)
    assert summary.rows_out == len(rows) > 0
    assert summary.rows_out + summary.failed + summary.empty == 10
    reference = {r["id"]: r["messages"] for r in _rows(Path(distill_run[0].distill.output_dir))}
    # Same model, same greedy decoding: the server's answers equal the Serve deployment's.
    assert {r["id"]: r["messages"] for r in rows} == {r["id"]: reference[r["id"]] for r in rows}


# ---------------------------------------------------------------- endpoint failures and shared apps


@pytest.mark.slow
def test_endpoint_failures_become_error_rows_and_a_wrong_model_is_one_line(ray_session, tmp_path):
    from medusa_ray.errors import UserError

    endpoint = FlakyEndpoint(served="served-model")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"{word} {i}"}) + "\n"
                               for i, word in enumerate(["hello", "down", "hi", "down", "hey"])))
    with pytest.raises(UserError, match="serves served-model, not model=other"):
        distill.run(_cfg("other", prompts, tmp_path / "wrong", endpoint=endpoint.url))
    assert not list((tmp_path / "wrong").glob("*.parquet"))

    out = tmp_path / "out"
    summary = distill.run(_cfg("served-model", prompts, out, endpoint=endpoint.url, max_retries=1,
                               retry_backoff_s=0.1))
    assert summary.rows_out == 3 and summary.failed == 2
    assert {e["reason"] for e in _errors(out)} == {"failed"} and "503" in _errors(out)[0]["error"]

    # The replicas are back: a re-run retries the failures, and their old error rows go (each prompt once).
    endpoint.down = False
    summary = distill.run(_cfg("served-model", prompts, out, endpoint=endpoint.url))
    assert summary.rows_out == 2 and summary.skipped == 3 and summary.failed == 0
    assert len(_rows(out)) == 5 and _errors(out) == []
    endpoint.server.shutdown()


@pytest.mark.slow
def test_a_shared_serve_app_outlives_its_starter(serve_app):
    """The run that started an app leaves while another still uses it: the app stays until the last one leaves."""
    import contextlib

    from ray import serve
    from ray.experimental import internal_kv

    from medusa_ray.distill.engine import _LEASES, _app_running, _leases, shared_app

    name = "medusa-distill-test-shared"

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class Echo:
        def __call__(self, x):
            return x

    def start():
        serve.run(Echo.bind(), name=name, route_prefix=None)

    starter, other = contextlib.ExitStack(), contextlib.ExitStack()
    starter.enter_context(shared_app(name, start))
    other.enter_context(shared_app(name, lambda: pytest.fail("a running app was started again")))
    starter.close()
    assert _app_running(name)
    other.close()
    assert not _app_running(name)

    # A run that was killed left its lease behind; its job is dead, so it keeps nothing alive.
    internal_kv._internal_kv_put(f"{name}/ffffffff/killed".encode(), b"", namespace=_LEASES)
    with shared_app(name, start):
        assert _app_running(name)
    assert not _app_running(name) and _leases(name) == []
    assert _app_running(serve_app)  # the module's vLLM app was never touched

