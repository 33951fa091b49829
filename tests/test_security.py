"""Issue 24: nothing a dataset, a checkpoint or a neighbour can make us run or leak.

Unit tests only (no Ray cluster, no vLLM): redaction of published locations, Hub visibility, tracked params,
distill's reply parsing and error text, the Serve app lease protocol against a fake KV store.
"""

from __future__ import annotations

import json
import threading

import pytest

from medusa_ray.redact import strip_credentials, strip_credentials_in_text

# ---------------------------------------------------------------- item 4: what an export publishes

# (location, substrings that must not survive)
HOSTILE_LOCATIONS = [
    ("https://alice:pa55/w0rd@host.example/x", ["alice", "pa55", "w0rd"]),
    ("https://alice:hunter@2secret@host.example/x", ["alice", "hunter", "2secret"]),
    ("https://alice:topsecret?more@host.example/", ["alice", "topsecret", "more@"]),
    ("https://alice:topsecret#more@host.example/", ["alice", "topsecret", "more@"]),
    ("https://host.example/x?sig=SIGSECRET&X-Amz-Credential=AKIDSECRET", ["SIGSECRET", "AKIDSECRET"]),
    ("https://host.example/x#frag-secret", ["frag-secret"]),
    ("HTTPS://ALICE:PWSECRET@host.example/x", ["ALICE", "PWSECRET"]),
    ("https://alice%40corp:pw%2Fsecret@host.example/x", ["alice", "secret"]),
    ("s3://bucket-secret/x", ["bucket-secret"]),
    ("s3://AKIAKEY:SECRETKEY@bucket-secret/distilled?X-Amz-Signature=SIGSECRET", ["AKIAKEY", "SECRETKEY",
                                                                                   "bucket-secret", "SIGSECRET"]),
    ("gs://my-private-bucket/data", ["my-private-bucket"]),
    ("hdfs://namenode.internal:8020/user/alice/x", ["alice", "namenode"]),
    ("file:///home/alice/x", ["alice"]),
    ("http://10.1.2.3:5000/api", ["10.1.2.3"]),
    ("http://[fd00::1234]:8000/v1", ["fd00"]),
    ("http://mlflow.internal:5000/", ["mlflow.internal"]),
    ("/home/alice/secret-project/data.jsonl", ["alice"]),
    ("/Users/alice/x", ["alice"]),
    ("~alice/x", ["alice"]),
    ("/mnt/10.0.0.5/x", ["10.0.0.5"]),
    ("alice@login-node:/data/x", ["alice", "login-node"]),
    ("/data/carol42/x", ["carol42"]),
    ("/scratch/carol42-runs/ckpt", ["carol42"]),
]


@pytest.fixture
def carol(monkeypatch):
    monkeypatch.setenv("USER", "carol42")


@pytest.mark.parametrize("location,secrets", HOSTILE_LOCATIONS)
def test_redact_publishes_no_secret(location, secrets, carol):
    from medusa_ray.redact import public_location as redact

    public = redact(location)
    assert public, location
    for secret in secrets:
        assert secret.lower() not in public.lower(), f"{location!r} -> {public!r} keeps {secret!r}"


@pytest.mark.parametrize("location,secrets", HOSTILE_LOCATIONS)
def test_public_meta_publishes_no_secret(location, secrets, carol):
    from medusa_ray.export.public import public_eval, public_meta

    meta = {"base_model": location, "global_step": 3, "data": {"source": location, "rows": 2},
            "config": {"model": location, "train": {"lr": 0.1, "storage_path": location},
                       "distill": {"endpoint": location, "temperature": 0.0}}}
    text = json.dumps(public_meta(meta)) + json.dumps(public_eval({"base_model": location, "speedup": 1.5}))
    for secret in secrets:
        assert secret.lower() not in text.lower(), f"{location!r} leaks {secret!r}: {text}"


def test_redact_keeps_what_is_public():
    from medusa_ray.redact import public_location as redact

    assert redact("meta-llama/Llama-3.1-8B-Instruct") == "meta-llama/Llama-3.1-8B-Instruct"
    assert redact("gpt2") == "gpt2"
    assert redact("outputs/tiny-model") == "outputs/tiny-model"
    assert redact("https://u:p@api.example.com:8443/v1?key=k") == "https://api.example.com"
    assert redact("/mnt/shared/medusa/ray_results/run/checkpoint_000003") == "run/checkpoint_000003"
    assert redact(None) is None and redact("") == ""
    # An object-store location is published as its scheme and a stable id, the same whatever the credentials.
    assert redact("s3://k:one@bucket/x") == redact("s3://k:two@bucket/x") != redact("s3://bucket/y")
    assert redact("s3://bucket/x").startswith("s3:")


def test_source_id_never_hashes_a_password():
    from medusa_ray.redact import source_id

    assert source_id("s3://k:one@bucket/x") == source_id("s3://k:two@bucket/x") == source_id("s3://bucket/x")
    assert source_id("s3://bucket/x") != source_id("s3://bucket/y")
    assert source_id("/a/b") == source_id("/a/b") != source_id("/a/c")


@pytest.mark.parametrize("url,expected", [
    ("http://u:secret@host/", "http://host/"),
    ("https://k:secret@h/v1", "https://h/v1"),
    ("https://user:p@ss@h:8000/v1?token=t#f", "https://h:8000/v1"),
    ("https://user:pa/ss@host/x", "https://[redacted]"),
    ("https://user:pa?ss@host/x", "https://[redacted]"),
    ("http://[::1", "http://[redacted]"),
    ("/local/path", "/local/path"),
    ("file:///tmp/mlruns", "file:///tmp/mlruns"),
])
def test_strip_credentials(url, expected):
    assert strip_credentials(url) == expected


def test_strip_credentials_in_text():
    text = "HTTP 503 from https://k:secret@h/v1/chat/completions; url=URL('https://u:pw@x.example/a?sig=zz')"
    out = strip_credentials_in_text(text)
    assert "secret" not in out and "pw" not in out and "sig" not in out
    assert "https://h/v1/chat/completions" in out and "https://x.example/a" in out


# ---------------------------------------------------------------- item 5: a private push stays private

TOKEN = "hf_security_test_token"


@pytest.fixture
def hub(monkeypatch):
    import huggingface_hub.constants

    from hub_standin import HubStandIn

    with HubStandIn(token=TOKEN, writable_orgs={"org"}, private_orgs={"org"}) as standin:
        monkeypatch.setenv("HF_ENDPOINT", standin.url)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        yield standin


def _uploads(hub) -> list[str]:
    return [r for r in hub.requests if "/preupload/" in r or "/commit/" in r]


def test_not_asking_for_private_keeps_the_organisations_private_default(hub):
    from medusa_ray.export.hub import prepare_push

    from medusa_ray.config import build_config

    assert build_config({}).export.private is None  # export.private's default: the user did not ask
    prepare_push("org/heads", private=None)
    assert all("private" not in body and "visibility" not in body for body in hub.created), hub.created
    assert hub.repos["org/heads"].private, "an explicit private=False overrode the org's private default"


def test_asking_for_private_refuses_an_existing_public_repo_before_uploading(hub, tmp_path):
    from hub_standin import Repo

    from medusa_ray.errors import UserError
    from medusa_ray.export.hub import prepare_push

    hub.repos["org/public-heads"] = Repo("org/public-heads", private=False)
    with pytest.raises(UserError, match=r"org/public-heads: export\.private is set but the repo is public"):
        prepare_push("org/public-heads", private=True)
    assert _uploads(hub) == [] and hub.repos["org/public-heads"].files == {}

    target = prepare_push("org/new-heads", private=True)
    assert hub.repos["org/new-heads"].private and target.repo_id == "org/new-heads"
    assert hub.created[-1].get("visibility") == "private" or hub.created[-1].get("private") is True


# ---------------------------------------------------------------- item 7: what the trackers are told

TRACKING_SECRETS = ["secret", "bucket-secret", "u:", "k:"]


def _secret_config(*extra):
    from medusa_ray.config import build_config

    return build_config({}, ["train.mlflow_tracking_uri=http://u:secret@mlflow.example:5000/",
                             "distill.endpoint=https://k:secret@h.example/v1",
                             "train.storage_path=s3://bucket-secret/x", "train.data=/home/alice/secret/data",
                             "distill.output_dir=/home/alice/secret/distill", *extra])


def test_tracked_params_hold_hyper_parameters_and_no_secret():
    from medusa_ray.tracking import tracked_params

    cfg = _secret_config()
    params = tracked_params(cfg)
    text = json.dumps(params)
    for secret in TRACKING_SECRETS + ["alice"]:
        assert secret not in text, f"{secret!r} reaches the trackers: {text}"
    assert params["train"]["lr"] == cfg.train.lr and params["train"]["method"] == "medusa"
    assert params["train"]["tracking"] == cfg.train.tracking and params["model"] == cfg.model
    assert params["distill"]["endpoint"] == "https://h.example/v1"  # where it distilled, without the key
    assert "storage_path" not in params["train"] and "output_dir" not in params["distill"]


class _FakeMlflowClient:
    """Enough of ``MlflowClient`` for ``open_tracker``: records the URI it was given and what was logged."""

    instances: list["_FakeMlflowClient"] = []

    def __init__(self, tracking_uri):
        from types import SimpleNamespace as NS

        self.tracking_uri, self.logged, self._ns = tracking_uri, [], NS
        _FakeMlflowClient.instances.append(self)

    def get_experiment_by_name(self, name):
        return None

    def create_experiment(self, name):
        return "1"

    def create_run(self, experiment_id, run_name=None):
        return self._ns(info=self._ns(run_id="r1", experiment_id=experiment_id))

    def get_run(self, run_id):
        return self._ns(info=self._ns(run_id=run_id, experiment_id="1", lifecycle_stage="active"),
                        data=self._ns(params={}))

    def update_run(self, run_id, status):
        pass

    def log_batch(self, run_id, metrics=(), params=(), tags=()):
        self.logged += [(p.key, p.value) for p in params] + [(t.key, t.value) for t in tags]

    def set_terminated(self, run_id, status):
        pass


def test_tracking_json_and_mlflow_params_hold_no_password(tmp_path, monkeypatch):
    import mlflow.tracking

    from medusa_ray.tracking import open_tracker

    _FakeMlflowClient.instances.clear()
    monkeypatch.setattr(mlflow.tracking, "MlflowClient", _FakeMlflowClient)
    cfg = _secret_config("train.tracking=[mlflow]")
    with open_tracker(cfg, tmp_path / "run") as tracker:
        tracker.log_summary({"output_dir": "s3://AK:secret@bucket/x?sig=secret"}, prefix="distill/")
    client = _FakeMlflowClient.instances[0]
    assert client.tracking_uri == cfg.train.mlflow_tracking_uri  # MLflow itself still gets the credentials
    state = (tmp_path / "run" / "tracking.json").read_text()
    assert "secret" not in state and json.loads(state)["mlflow"]["tracking_uri"] == "http://mlflow.example:5000/"
    logged = json.dumps(client.logged)
    for secret in TRACKING_SECRETS:
        assert secret not in logged, f"{secret!r} reaches MLflow: {logged}"
    assert ("train.lr", str(cfg.train.lr)) in client.logged

    # Resuming recognises the same MLflow store although tracking.json only keeps the URI without its password.
    with open_tracker(cfg, tmp_path / "run"):
        pass
    assert json.loads((tmp_path / "run" / "tracking.json").read_text())["mlflow"]["run_id"] == "r1"
    assert len(_FakeMlflowClient.instances) == 2


# ---------------------------------------------------------------- item 7: distill's error text and log lines

ENDPOINT = "https://k:secret@h.example/v1"


def test_engine_description_names_the_endpoint_without_its_key():
    from medusa_ray.distill.engine import Engine

    engine = Engine(model_id="m", mode="chat", in_flight=1, request_timeout_s=1.0, url=ENDPOINT)
    assert "secret" not in engine.description and "h.example" in engine.description


def test_http_error_rows_carry_no_credentials():
    import asyncio
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from medusa_ray.distill.engine import HttpClient

    class Down(BaseHTTPRequestHandler):
        def do_POST(self):
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Down)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://k:secret@127.0.0.1:{server.server_address[1]}/v1/chat/completions?api_key=secret"

        async def ask():
            async with HttpClient(url, {}, "chat", 10.0) as client:
                return await client.complete({"model": "m", "messages": []})

        reply = asyncio.run(ask())
    finally:
        server.shutdown()
        server.server_close()
    assert reply["error"].startswith("HTTP 503") and "secret" not in reply["error"], reply


def test_error_rows_strip_credentials_whatever_the_client_says():
    import asyncio

    from medusa_ray.config import build_config
    from medusa_ray.distill.conversation import Distiller

    class Leaky:
        async def complete(self, body):
            return {"text": "", "finish_reason": "", "prompt_tokens": 0, "completion_tokens": 0,
                    "error": f"ClientResponseError: 401, url=URL('{ENDPOINT}/chat/completions')"}

    cfg = build_config({}, ["distill.max_retries=0", f"distill.endpoint={ENDPOINT}"]).to_dict()
    distiller = Distiller(cfg, "m", {"kind": "custom"}, in_flight=1, client_factory=lambda spec: Leaky())
    distiller._slots = asyncio.Semaphore(1)
    record = {"id": "a", "source": "f:1", "invalid": None, "messages": json.dumps([{"role": "user", "content": "hi"}])}
    row = asyncio.run(distiller.conversation(record))
    assert row["outcome"] == "failed" and "secret" not in row["error"] and "h.example" in row["error"]


# ---------------------------------------------------------------- item 11: malformed replies are error rows

MALFORMED_REPLIES = [
    ({"choices": ["x"]}, "chat"),
    ({"choices": ["x"]}, "completion"),
    ({"choices": "x"}, "chat"),
    ({"choices": {"0": {"message": {"content": "hi"}}}}, "chat"),
    ({"choices": [None]}, "chat"),
    ({"choices": [{"message": "hi"}]}, "chat"),
    ({"choices": [{"message": ["hi"]}]}, "chat"),
    ({"choices": [{"message": {"content": ["a", "b"]}}]}, "chat"),
    ({"choices": [{"message": {"content": [{"type": "text", "text": "hi"}]}}]}, "chat"),
    ({"choices": [{"message": {"content": {"text": "hi"}}}]}, "chat"),
    ({"choices": [{"message": {"content": 5}}]}, "chat"),
    ({"choices": [{"text": ["x"]}]}, "completion"),
    ({"choices": [{"text": {"x": 1}}]}, "completion"),
    ({"choices": [{"message": {"content": "hi"}, "finish_reason": ["stop"]}]}, "chat"),
    ({"choices": [{"message": {"content": "hi"}}], "usage": "lots"}, "chat"),
    ({"choices": [{"message": {"content": "hi"}}], "usage": {"prompt_tokens": "many"}}, "chat"),
    ({"choices": [{"message": {"content": "hi"}}], "usage": {"completion_tokens": float("inf")}}, "chat"),
    ({"choices": [{"message": {"content": "hi"}}], "usage": {"completion_tokens": float("nan")}}, "chat"),
    ({"choices": [{"message": {"content": "hi"}}], "usage": {"completion_tokens": -3}}, "chat"),
    ({"choices": [{"message": {"content": "hi"}}], "usage": {"completion_tokens": [1]}}, "chat"),
    ("not a dict", "chat"),
    (None, "chat"),
    ([{"choices": []}], "chat"),
    ({"error": ["boom"]}, "chat"),
    ({"error": {"message": {"nested": "x\ny"}}}, "chat"),
    ({"object": "error", "message": None}, "chat"),
    ({"error": "multi\nline\nerror"}, "chat"),
    ({"choices": [{"message": {"content": "hi"}, "token_ids": "1 2"}]}, "chat"),
    ({"choices": [{"text": "hi", "token_ids": [1, -2]}]}, "completion"),
    ({"choices": [{"text": "hi", "token_ids": [1.5]}]}, "completion"),
]


@pytest.mark.parametrize("response,mode", MALFORMED_REPLIES)
def test_malformed_replies_become_failed_rows(response, mode):
    from medusa_ray.distill.engine import parse_reply

    out = parse_reply(response, mode)
    assert set(out) == {"text", "finish_reason", "prompt_tokens", "completion_tokens", "token_ids", "error"}
    assert out["token_ids"] is None
    assert out["error"] and isinstance(out["error"], str) and "\n" not in out["error"], out
    assert isinstance(out["text"], str) and isinstance(out["finish_reason"], str)
    assert isinstance(out["prompt_tokens"], int) and isinstance(out["completion_tokens"], int)


def test_well_formed_replies_still_parse():
    from medusa_ray.distill.engine import parse_reply

    chat = {"choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1}}
    assert parse_reply(chat, "chat") == {"text": "hi", "finish_reason": "stop", "prompt_tokens": 3,
                                         "completion_tokens": 1, "token_ids": None, "error": ""}
    # A reply with no content (e.g. only tool calls) is an empty reply, not a failure; usage may be absent.
    assert parse_reply({"choices": [{"message": {"content": None}, "finish_reason": None}]}, "chat") == {
        "text": "", "finish_reason": "", "prompt_tokens": 0, "completion_tokens": 0, "token_ids": None, "error": ""}
    assert parse_reply({"choices": [{"text": "x", "finish_reason": "length"}], "usage": None},
                       "completion")["text"] == "x"


# ---------------------------------------------------------------- item 9: the shared Serve app's leases

class FakeKV:
    """Ray's GCS internal KV as ``ray.experimental.internal_kv`` exposes it, in memory and thread-safe;
    ``_internal_kv_put`` returns whether the key already existed, as Ray's does."""

    def __init__(self):
        self.data: dict[tuple, bytes] = {}
        self.lock = threading.Lock()
        self.after_list = None  # called once, after the next listing was taken and before it is returned

    @staticmethod
    def _b(x):
        return x.encode() if isinstance(x, str) else x

    def put(self, key, value, overwrite=True, *, namespace=None):
        with self.lock:
            k = (namespace, self._b(key))
            exists = k in self.data
            if overwrite or not exists:
                self.data[k] = self._b(value)
            return exists

    def get(self, key, *, namespace=None):
        with self.lock:
            return self.data.get((namespace, self._b(key)))

    def delete(self, key, *, del_by_prefix=False, namespace=None):
        with self.lock:
            return int(self.data.pop((namespace, self._b(key)), None) is not None)

    def list(self, prefix, *, namespace=None):
        with self.lock:
            keys = [k for ns, k in self.data if ns == namespace and k.startswith(self._b(prefix))]
        hook, self.after_list = self.after_list, None
        if hook:
            hook()
        return keys


@pytest.fixture
def serve_fakes(monkeypatch):
    """No cluster: a fake KV, one live job, and a fake Serve whose apps are a set."""
    from types import SimpleNamespace

    from ray import serve
    from ray.experimental import internal_kv

    from medusa_ray.distill import engine

    kv = FakeKV()
    apps: set[str] = set()
    monkeypatch.setattr(internal_kv, "_internal_kv_put", kv.put)
    monkeypatch.setattr(internal_kv, "_internal_kv_get", kv.get)
    monkeypatch.setattr(internal_kv, "_internal_kv_del", kv.delete)
    monkeypatch.setattr(internal_kv, "_internal_kv_list", kv.list)
    monkeypatch.setattr(engine, "_job_id", lambda: "01000000")
    monkeypatch.setattr(engine, "_live_jobs", lambda: {"01000000"})
    monkeypatch.setattr(engine, "_app_running", lambda name: name in apps)
    monkeypatch.setattr(engine, "_teardown", lambda name, serve_was_up: apps.discard(name))
    monkeypatch.setattr(engine, "_serve_controller_running", lambda: True)
    monkeypatch.setattr(serve, "status", lambda: SimpleNamespace(applications={a: None for a in apps}))
    return SimpleNamespace(kv=kv, apps=apps)


def test_a_leaving_run_never_deletes_an_app_a_joining_run_found_running(serve_fakes):
    """The leaver lists the leases (none but its own); the joiner then adds its lease and finds the app running;
    the leaver deletes the app. With the claim, the joiner waits and starts the app again instead."""
    from medusa_ray.distill.engine import _leases, shared_app

    name, apps = "medusa-distill-race", serve_fakes.apps
    starts, seen = [], []
    entered, leaver_done = threading.Event(), threading.Event()

    def start(who):
        def go():
            starts.append(who)
            apps.add(name)
        return go

    def joiner():
        with shared_app(name, start("joiner")):
            entered.set()
            leaver_done.wait(10)
            seen.append(name in apps)  # is the app this run uses still there?

    thread = threading.Thread(target=joiner)

    def let_the_joiner_in():
        thread.start()
        entered.wait(1.0)  # on a correct implementation the joiner is blocked until the leaver is done

    with shared_app(name, start("leaver")):
        serve_fakes.kv.after_list = let_the_joiner_in  # the leaver's listing of leases
    leaver_done.set()
    thread.join(10)
    assert not thread.is_alive()
    assert seen == [True], "the leaver deleted the app while the joiner was using it"
    assert starts == ["leaver", "joiner"] and name not in apps
    assert _leases(name) == [] and all(b"#" not in k for _, k in serve_fakes.kv.data), serve_fakes.kv.data


def test_two_runs_starting_together_start_the_app_once(serve_fakes, monkeypatch):
    from medusa_ray.distill import engine
    from medusa_ray.distill.engine import shared_app

    name, apps = "medusa-distill-twins", serve_fakes.apps
    starts = []
    a_starting, b_looked, b_in = threading.Event(), threading.Event(), threading.Event()
    running = engine._app_running

    def app_running(n):
        if threading.current_thread().name == "B":
            b_looked.set()
        return running(n)

    monkeypatch.setattr(engine, "_app_running", app_running)

    def start_a():
        starts.append("A")
        a_starting.set()
        b_looked.wait(1.0)  # B looks meanwhile (on a correct implementation it cannot: it waits for A)
        apps.add(name)

    def b():
        a_starting.wait(10)
        with shared_app(name, lambda: starts.append("B") or apps.add(name)):
            b_in.set()

    thread = threading.Thread(target=b, name="B")
    thread.start()
    with shared_app(name, start_a):
        b_in.wait(10)
    thread.join(10)
    assert not thread.is_alive()
    assert starts == ["A"], f"serve.run called by {starts}"
    assert name not in apps
