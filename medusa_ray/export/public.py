"""What an export may tell the world: an allow-list of settings and numbers, with no paths or credentials.

An export directory is made to be pushed to the Hub, often to a public repo. The run config behind it holds
endpoint URLs, tracking URIs (which may carry a password), bucket names and home directories; none of that
belongs in a model card. So the files inside an export are built from an allow-list, and every location
that is kept (the base model, the data's and the checkpoint's names) goes through ``redact`` first.

``redact`` publishes an http(s) URL as its scheme and public host name only; any other URL (``s3://``,
``gs://``, ``hdfs://``, ``file://``: the first component is a bucket or an internal host), one whose host is
an IP address or an internal name, and one ``medusa_ray.redact`` finds ambiguous (a password with ``/`` in
it), as its scheme and a stable id. A local path keeps its last two components, less any that name a user
(the directory under ``/home`` or ``/Users``, ``~user``, the login name) or hold an IP address.
"""

from __future__ import annotations

import getpass
import hashlib
import ipaddress
import os
import re
from pathlib import PurePosixPath
from typing import Any

from medusa_ray.redact import is_url, split_url, strip_credentials

# Settings that describe how the heads were made and say nothing about where: (section, key).
_PUBLIC_SETTINGS: dict[str, tuple[str, ...]] = {
    "distill": ("mode", "temperature", "top_p", "max_tokens", "seed"),
    "train": ("method", "medusa_num_heads", "medusa_num_layers", "share_lm_head", "eagle3_ttt_steps",
              "eagle3_draft_vocab_size", "eagle3_layers", "head_decay", "topk", "max_length",
              "num_workers", "zero_stage", "batch_size", "grad_accum", "lr", "weight_decay", "warmup_ratio",
              "warmup_steps", "max_steps", "epochs", "max_epochs", "min_steps", "step_budget", "patience",
              "val_fraction", "val_min_rows", "val_max_rows", "val_every", "seed"),
    "eval": ("num_prompts", "max_tokens", "num_speculative_tokens"),
}
_PUBLIC_META = ("format", "base_model", "method", "medusa_num_heads", "medusa_num_layers", "share_lm_head",
                "eagle3_ttt_steps", "eagle3_layer_ids", "eagle3_draft_vocab_size", "hidden_size", "vocab_size",
                "global_step", "zero_stage", "world_size", "metrics", "validation", "base_architectures")
_PUBLIC_DATA = ("rows", "tokens", "truncated", "epoch", "bad_rows")
_PUBLIC_EVAL = ("base_model", "num_prompts", "max_tokens", "num_speculative_tokens", "acceptance_length",
                "accepted_per_position", "num_drafts", "num_draft_tokens", "num_accepted_tokens", "output_tokens",
                "tokens_per_s_base", "tokens_per_s_medusa", "speedup", "outputs_identical", "head_accuracy",
                "heldout_positions", "method")
# Schemes whose host is a public web server worth naming; every other scheme's "host" is a bucket, a
# container or a cluster-internal server.
_WEB_SCHEMES = {"http", "https"}
_INTERNAL_SUFFIXES = (".internal", ".local", ".localdomain", ".lan", ".corp", ".home", ".intranet", ".svc",
                      ".cluster.local", ".consul")
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")
_IPV4 = re.compile(r"(?<![0-9])[0-9]{1,3}(\.[0-9]{1,3}){3}(?![0-9])")
# Shared service accounts name nobody; a path component equal to one of these is kept.
_GENERIC_USERS = {"root", "ray", "ubuntu", "user", "users", "admin", "ec2-user", "nobody", "jovyan", "home"}


def redact(location: str | None) -> str | None:
    """A location safe to publish: an http(s) URL as scheme and public host; any other URL, or one with an
    IP or internal host, as scheme and stable id; a local path as its last two components without user names
    or IPs; a Hub id (``org/name``) unchanged."""
    if not location:
        return location
    text = str(location).strip()
    if is_url(text):
        scheme, netloc, _ = split_url(text)
        host = _public_host(netloc) if scheme in _WEB_SCHEMES and netloc is not None else None
        return f"{scheme}://{host}" if host else f"{scheme}:{_redacted(text)}"
    if _HUB_ID.fullmatch(text) and not text.startswith("."):
        return text
    if "@" in text or ":" in text or "\\" in text:  # user@host:/path, C:\\Users\\..., anything else odd
        return _redacted(text)
    parts = [p for p in PurePosixPath(text).parts if p not in ("/", ".", "..")]
    private = _private_components(parts)
    kept = [p for i, p in enumerate(parts) if i >= len(parts) - 2 and i not in private]
    return str(PurePosixPath(*kept)) if kept else _redacted(text)


def _redacted(location: str) -> str:
    return f"redacted-{source_id(location)}"


def _public_host(netloc: str) -> str | None:
    """The host of ``netloc`` when it is a public DNS name; None for IPs, internal names and junk."""
    host = netloc.rpartition(":")[0] if netloc.rpartition(":")[2].isdigit() else netloc
    host = host.lower().rstrip(".")
    if host.startswith("["):
        return None  # an IPv6 literal
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        pass
    if (not re.fullmatch(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)+", host)
            or host.endswith(_INTERNAL_SUFFIXES) or host.rsplit(".", 1)[-1].isdigit()):
        return None
    return host


def _user_names() -> set[str]:
    names = {os.environ.get(k, "") for k in ("USER", "LOGNAME", "USERNAME", "SUDO_USER")}
    try:
        names.add(getpass.getuser())
    except Exception:  # noqa: BLE001 - no passwd entry in some containers
        pass
    return {n.lower() for n in names if n} - _GENERIC_USERS


def _private_components(parts: list[str]) -> set[int]:
    """Indexes of the path components that name a user or hold an IP address."""
    users = _user_names()
    private = set()
    for i, part in enumerate(parts):
        lower = part.lower()
        tokens = set(re.split(r"[-_.+ ]+", lower))
        if (part.startswith("~") or _IPV4.search(part) or (i and parts[i - 1].lower() in ("home", "users"))
                or tokens & users or lower in users):
            private.add(i)
    return private


def source_id(location: str) -> str:
    """A stable fingerprint of a full location, to recognise the same checkpoint without publishing its path.
    Taken over the location without its credentials, so that a password never goes into a published hash."""
    return hashlib.sha256(strip_credentials(location).encode()).hexdigest()[:16]


def public_config(config: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"model": redact(config.get("model"))}
    for section, keys in _PUBLIC_SETTINGS.items():
        values = config.get(section) or {}
        out[section] = {k: values[k] for k in keys if k in values}
    return out


def public_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's ``medusa_meta.json`` as an export may carry it."""
    out = {k: meta[k] for k in _PUBLIC_META if k in meta}
    out["base_model"] = redact(meta.get("base_model"))
    out["config"] = public_config(meta.get("config") or {})
    data = meta.get("data") or {}
    out["data"] = {k: data[k] for k in _PUBLIC_DATA if k in data} | {"source": redact(data.get("source"))}
    return out


def public_eval(results: dict[str, Any]) -> dict[str, Any]:
    """Eval's numbers, without output texts (which quote the prompts) or local paths."""
    out = {k: results[k] for k in _PUBLIC_EVAL if k in results}
    out["base_model"] = redact(results.get("base_model"))
    compared = results.get("compared") or {}
    if compared:
        out["compared"] = {name: {k: v for k, v in other.items() if k in _PUBLIC_EVAL and k != "base_model"}
                           for name, other in compared.items()}
    return out
