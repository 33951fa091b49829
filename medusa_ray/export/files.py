"""The names of the files in an export directory, and its marker: what the writer, the card and eval share.

The marker (``medusa_ray_export.json``) says where an export came from and what it holds; only a directory
with a marker is ever replaced or refreshed by medusa-ray.
"""

from __future__ import annotations

import json
from pathlib import Path

MARKER_FILE = "medusa_ray_export.json"
EVAL_FILE = "eval_results.json"
"""Written by ``eval`` into an export it measured: the numbers only (it may be pushed to a public repo)."""
COMPARISON_FILE = "drafters.json"
"""Written by ``pipeline`` when it trained several drafters: each one's numbers on the same prompts."""
CARD_FILE = "README.md"
LOCAL_FILE = ".medusa_ray_local.json"
"""Where the export's base model and the export itself are on this machine (absolute paths): read by ``eval``,
never uploaded. The published files name a local base by a redacted name only."""
EXPORT_FORMAT = "medusa-ray-export/1"


def local_base(out: Path) -> str | None:
    """The base model's path on this machine, when the export was made from a local base."""
    try:
        return json.loads((Path(out) / LOCAL_FILE).read_text()).get("base_model")
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None


def read_marker(out: Path) -> dict | None:
    """The export's marker, or None when ``out`` holds no medusa-ray export."""
    try:
        marker = json.loads((Path(out) / MARKER_FILE).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return marker if isinstance(marker, dict) and marker.get("format") == EXPORT_FORMAT else None
