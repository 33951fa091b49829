"""Regenerate the config reference in docs/config.md from medusa_ray/config.py: `python scripts/sync_readme.py`.

(The name is historical: the reference used to live in README.md.)
"""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medusa_ray.config import reference_markdown  # noqa: E402

START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"
page = ROOT / "docs" / "config.md"
text = page.read_text()
pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
if not pattern.search(text):
    sys.exit(f"{page}: no {START} ... {END} block to rewrite")
page.write_text(pattern.sub(lambda _: f"{START}\n{reference_markdown()}\n{END}", text))
print(f"config reference written to {page.relative_to(ROOT)}")
