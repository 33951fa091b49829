"""Push an export directory to the Hugging Face Hub with the stock ``huggingface_hub`` client.

The token comes from ``HF_TOKEN`` or ``hf auth login`` through the client itself; we never print, log or
write it. ``HF_ENDPOINT`` is read at call time so a private Hub mirror (or a test stand-in) works even when
``huggingface_hub`` was imported before it was set.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from medusa_ray.errors import UserError

log = logging.getLogger(__name__)


def _redact(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text


def push_to_hub(folder: Path, repo_id: str, private: bool = False) -> str:
    """``create_repo(exist_ok=True)`` + ``upload_folder``; returns the repo URL. Failures are one UserError."""
    from huggingface_hub import HfApi, get_token

    token = get_token()
    if not token:
        raise UserError(f"cannot push to {repo_id}: no Hugging Face token (set HF_TOKEN or run `hf auth login`); "
                        f"the export in {folder} is intact")
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        log.info("uploading %s to %s", folder, url)
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                          commit_message="Upload Medusa heads (medusa-ray export)")
    except Exception as exc:  # noqa: BLE001 - network, auth, permission, offline mode: all end the same way
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"push to {repo_id} failed: {_redact(reason, token)}; the export in {folder} is intact") \
            from None
    return str(url)
