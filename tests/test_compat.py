"""Private Ray and vLLM APIs live in medusa_ray/compat.py only, and an upgrade that moves one fails here, loudly."""

import importlib
import re
from pathlib import Path

import pytest

from medusa_ray import compat

PACKAGE = Path(compat.__file__).parent
# What a private API looks like in an import or an attribute access.
PRIVATE = re.compile(r"\b(?:ray|vllm)\.[\w.]*\b_(?:private|internal)\b|\b_internal_kv_\w+|\b_get_global_client\b"
                     r"|\bengine_core\b|\bglobal_worker\b")


@pytest.mark.parametrize("module,name", compat.PRIVATE_NAMES, ids=[f"{m}.{n}" for m, n in compat.PRIVATE_NAMES])
def test_every_private_name_we_use_still_exists(module, name):
    assert hasattr(importlib.import_module(module), name), f"{module}.{name} moved: update medusa_ray/compat.py"


def test_no_module_but_compat_uses_a_private_api():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "compat.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if PRIVATE.search(code) and not code.strip().startswith(('"', "'")):
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{number}: {line.strip()}")
    assert offenders == []


def test_the_callback_base_is_serve_llms():
    from medusa_ray.distill.replica import ReplicaLogging

    assert issubclass(ReplicaLogging, compat.serve_llm_callback_base())
