"""Push an export directory to the Hugging Face Hub with the stock ``huggingface_hub`` client.

The token comes from ``HF_TOKEN`` or ``hf auth login`` through the client itself; we never print, log or
write it. ``HF_ENDPOINT`` is read at call time so a private Hub mirror (or a test stand-in) works even when
``huggingface_hub`` was imported before it was set.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medusa_ray.errors import UserError
from medusa_ray.export.files import LOCAL_FILE

log = logging.getLogger(__name__)


def _redact(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text


def _reason(exc: Exception, token: str) -> str:
    return _redact(str(exc).splitlines()[0] if str(exc) else type(exc).__name__, token)


@dataclass
class HubTarget:
    """A repo we have checked we can push to: the token works, can write, and the repo exists."""

    api: Any
    repo_id: str
    url: str
    token: str


def prepare_push(repo_id: str, private: bool | None = None) -> HubTarget:
    """Everything that can refuse a push, checked before the export is touched: a token, one that the Hub
    accepts and that may write, and a repo we may create or already have. Failures are one UserError.

    ``private``: True means the repo must be private, False that a new one is created public, None "not asked"
    (nothing is sent: the organisation's private-by-default setting holds). ``create_repo(exist_ok=True)``
    ignores ``private`` for a repo that already exists, so the repo's actual visibility is read back and a
    public one is refused when private was asked for.
    """
    from huggingface_hub import HfApi, get_token

    token = get_token()
    if not token:
        raise UserError(f"cannot push to {repo_id}: no Hugging Face token (set HF_TOKEN or run `hf auth login`)")
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token)
    try:
        who = api.whoami()
    except Exception as exc:  # noqa: BLE001 - network, offline mode, a revoked token: all end the same way
        raise UserError(f"cannot push to {repo_id}: the Hub did not accept the token ({_reason(exc, token)})") \
            from None
    if ((who.get("auth") or {}).get("accessToken") or {}).get("role") == "read":
        raise UserError(f"cannot push to {repo_id}: the Hugging Face token is read-only; pushing needs a write "
                        "token (or a fine-grained one with write access to the repo)")
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        is_private = api.repo_info(repo_id, repo_type="model").private
    except Exception as exc:  # noqa: BLE001 - permission, name, network
        raise UserError(f"cannot push to {repo_id}: {_reason(exc, token)}") from None
    if private and is_private is not True:
        raise UserError(f"cannot push to {repo_id}: export.private is set but the repo is public (it already "
                        "existed); make it private on the Hub or push to another repo")
    return HubTarget(api, repo_id, str(url), token)


def upload(target: HubTarget, folder: Path) -> str:
    """Upload every file of ``folder`` to the prepared repo in one commit; returns the repo URL."""
    log.info("uploading %s to %s", folder, target.url)
    try:
        target.api.upload_folder(repo_id=target.repo_id, folder_path=str(folder), repo_type="model",
                                 commit_message="Upload a drafter (medusa-ray export)",
                                 ignore_patterns=[LOCAL_FILE])  # this machine's paths stay here
    except Exception as exc:  # noqa: BLE001 - network, auth, permission, offline mode: all end the same way
        raise UserError(f"push to {target.repo_id} failed: {_reason(exc, target.token)}") from None
    return target.url

