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
    from medusa_ray.export.public import redact

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
    from medusa_ray.export.public import redact

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
    from medusa_ray.export.public import source_id

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

    prepare_push("org/heads", private=False)  # export.private's default: the user did not ask
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
