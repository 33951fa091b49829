"""Regenerate the README's config reference from medusa_ray/config.py: `python scripts/sync_readme.py`."""

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medusa_ray.config import reference_markdown  # noqa: E402

START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"
readme = Path(__file__).resolve().parents[1] / "README.md"
text = readme.read_text()
pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
readme.write_text(pattern.sub(lambda _: f"{START}\n{reference_markdown()}\n{END}", text))
