"""Drafters: everything that differs between Medusa heads, an EAGLE-3 draft and the next drafter, one module each.

A drafter module defines a ``Drafter`` subclass and registers it under its method name (``train.method``, and
the method vLLM's ``speculative_config`` names). Stages ask the registry and never test ``method ==``:

- **config**: ``keys``, a pydantic model of its ``train.*`` keys, validated with the rest of the config;
- **training**: ``prepare`` (driver-side work before the workers start), ``build``, ``attach``, ``loss``,
  ``metrics``, the per-position ``chain`` that gives the expected acceptance length, ``meta`` for checkpoints;
- **export**: ``export_files`` (its servable layout), ``describe`` and ``card`` (labels and model-card text);
- **eval**: ``detect`` (is this export directory mine?), ``speculative_config``, ``untrained`` (the same shape
  as training starts it, to show what training bought).

Adding a drafter is one module here plus its tests: the registry (``register``/``get``/``names``) is all the
stages see. Heavy libraries (torch, transformers, speculators) are imported inside the methods that use them, so
importing the registry stays cheap (every ``medusa_ray`` import does, to know the drafters' config keys).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, Iterable

from pydantic import BaseModel

from medusa_ray.config import Config, register_drafter_keys
from medusa_ray.errors import UserError

__all__ = ["Drafter", "register", "get", "names", "detect", "expected_acceptance"]


def expected_acceptance(chain: list[float]) -> float:
    """Tokens per verification step if draft position k is accepted with probability ``chain[k]`` given the ones
    before it: ``1 + sum_k prod_{i<=k} chain_i``."""
    total, product = 1.0, 1.0
    for p in chain:
        product *= p
        total += product
    return total


class Drafter:
    """One drafter. Class-level members describe it; an instance trains it (built on every training worker from
    the config and what ``prepare`` returned)."""

    method: ClassVar[str]
    """Its ``train.method`` name, also vLLM's ``speculative_config["method"]``."""
    title: ClassVar[str]
    """What it is called in a sentence: "Medusa heads", "EAGLE-3 draft"."""
    position: ClassVar[str]
    """What one draft position is called in tables: "head", "step"."""
    keys: ClassVar[type[BaseModel]]
    """Its own config keys (``train.<key>``), with defaults and docs."""
    meta_keys: ClassVar[tuple[str, ...]] = ()
    """Keys its checkpoints' meta must carry (what ``meta`` writes)."""
    weights_file: ClassVar[str]
    """The export's weights file."""
    serves_with_tgi: ClassVar[bool] = False

    steps: int
    """Draft positions trained (heads, unrolled steps)."""
    width: int
    """Columns of the per-position stats tensor ``loss`` returns; they sum across micro-batches and ranks."""

    def __init__(self, cfg: Config, prepared: dict[str, Any] | None = None):
        self.cfg = cfg
        self.prepared = prepared or {}

    # ---- config -------------------------------------------------------------------------------------------
    @classmethod
    def num_positions(cls, train_cfg) -> int:
        """Draft positions this config trains (and vLLM drafts by default)."""
        raise NotImplementedError

    @classmethod
    def shape(cls, train_cfg, hidden_size: int, vocab_size: int) -> dict[str, Any]:
        """The meta values a checkpoint must have for this config to resume it (its own keys first)."""
        raise NotImplementedError

    # ---- training ----------------------------------------------------------------------------------------
    needs_preparation: ClassVar[bool] = False
    """Whether ``prepare`` must see the training rows before the workers start (train runs it as a Ray task)."""

    @classmethod
    def prepare(cls, cfg: Config, label_rows: Iterable[list[int]]) -> dict[str, Any] | None:
        """Work before the training workers start, over every training row's labels (token ids, -100 where not
        trained on); what it returns reaches every worker's instance as ``prepared``."""
        return None

    @classmethod
    def describe_training(cls, train_cfg, prepared: dict[str, Any] | None) -> str:
        """What is about to be trained, for the line training prints first."""
        raise NotImplementedError

    def name(self, k: int) -> str:
        """Metric prefix of draft position k."""
        raise NotImplementedError

    def build(self, base, device, dtype):
        raise NotImplementedError

    def attach(self, decoder) -> None:
        """Hook into the frozen base's decoder, if the drafter reads more than its last hidden state."""

    @classmethod
    def feature_layers(cls, train_cfg) -> int:
        """Hidden-size-wide tensors per token that ``features`` returns (the feature cache's size)."""
        return 1

    def features(self, decoder, ids, mask) -> dict[str, Any]:
        """What the drafter reads of the frozen base for a right-padded batch: named ``[B, T, ...]`` tensors in the
        base's dtype, computed under ``no_grad``. Position ``t`` depends only on tokens up to ``t``, so each row's
        first ``len`` positions can be cached and reused in any batch (``medusa_ray.train.features``)."""
        import torch

        with torch.no_grad():
            # No KV cache: nothing is generated, and building one costs memory on every step.
            return {"last": decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state}

    def loss(self, engine, features, batch, device):
        """(loss, stats ``[steps, width]``, attention mask) of one micro-batch, from its ``features``."""
        raise NotImplementedError

    def metrics(self, stats) -> dict[str, float]:
        raise NotImplementedError

    def top1(self, metrics: dict[str, float]) -> list[float]:
        return [metrics[f"{self.name(k)}_top1"] for k in range(self.steps)]

    def chain(self, metrics: dict[str, float]) -> list[float]:
        """Per position, the chance vLLM accepts it given the ones before: what ``expected_acceptance`` takes."""
        return self.top1(metrics)

    def meta(self, module) -> dict[str, Any]:
        """Its shape, for the checkpoint meta (``meta_keys``)."""
        raise NotImplementedError

    def trainable(self, name: str) -> bool:
        """Whether a parameter belongs in the checkpoint's weights (the base's own parts don't)."""
        return True

    @classmethod
    def summary_columns(cls, train_cfg) -> list[str]:
        """Metric suffixes training's summary table shows per position."""
        return ["top1"]

    # ---- export ------------------------------------------------------------------------------------------
    @classmethod
    def check_weights(cls, weights: dict, meta: dict[str, Any], where) -> None:
        """Refuse checkpoint weights that are not what ``meta`` describes (one line)."""

    @classmethod
    def export_files(cls, weights: dict, meta: dict[str, Any], base_name: str, dtype, published_base: str):
        """A function ``write(tmp_dir)`` writing the servable files, prepared (and checked) before anything is
        written. ``base_name`` is where the base loads from here; the files name it ``published_base`` (a local
        path is published redacted)."""
        raise NotImplementedError

    @classmethod
    def describe(cls, meta: dict[str, Any]) -> tuple[str, str]:
        """(label, value): one summary row naming its shape."""
        raise NotImplementedError

    @classmethod
    def card(cls, meta: dict[str, Any], base: str) -> list[str]:
        """The model card's title and description lines."""
        raise NotImplementedError

    @classmethod
    def card_keys(cls) -> tuple[str, ...]:
        """Its config keys the card's training table shows."""
        return tuple(cls.keys.model_fields)

    # ---- eval --------------------------------------------------------------------------------------------
    @classmethod
    def detect(cls, config: dict[str, Any]) -> dict[str, Any] | None:
        """For an export's ``config.json``: ``{"steps": positions drafted, "base": base it was exported for}``
        when the directory is this drafter's, else None."""
        raise NotImplementedError

    @classmethod
    def max_speculative_tokens(cls, steps: int) -> int | None:
        """The most tokens vLLM can draft per step from an export with ``steps`` positions (None: no limit)."""
        return None

    @classmethod
    def speculative_config(cls, draft_dir: str, num_tokens: int) -> dict[str, Any]:
        return {"method": cls.method, "model": draft_dir, "num_speculative_tokens": num_tokens}

    @classmethod
    def untrained(cls, export_dir: Path, base: str, out: Path) -> Path:
        """A draft of the export's shape as training starts it, written to ``out``."""
        raise NotImplementedError

    @classmethod
    def heldout_accuracy(cls, base: str, draft_dir: Path, heldout: str, cfg: Config) -> tuple[dict, int] | None:
        """Teacher-forced accuracy per draft position on held-out distilled rows: ({name: [top-1..]}, positions),
        or None where the drafter has no such measure."""
        return None


_REGISTRY: dict[str, type[Drafter]] = {}


def register(cls: type[Drafter]) -> type[Drafter]:
    """Class decorator: make ``cls`` a drafter ``train.method`` can name, with its config keys."""
    if cls.method in _REGISTRY and _REGISTRY[cls.method] is not cls:
        raise ValueError(f"drafter {cls.method!r} is already registered ({_REGISTRY[cls.method].__module__})")
    register_drafter_keys(cls.method, cls.keys)
    _REGISTRY[cls.method] = cls
    return cls


def names() -> list[str]:
    return list(_REGISTRY)


def get(method: str) -> type[Drafter]:
    try:
        return _REGISTRY[method]
    except KeyError:
        raise UserError(f"unknown drafter {method!r} (known: {', '.join(_REGISTRY)})") from None


def detect(draft_dir: Path) -> tuple[type[Drafter], dict[str, Any]]:
    """Which drafter an export directory holds, and what its ``config.json`` says (``steps``, ``base``)."""
    path = draft_dir / "config.json"
    if not path.is_file():
        raise UserError(f"{draft_dir} is not a drafter directory: it has no config.json (run `medusa-ray export`)")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    for cls in _REGISTRY.values():
        found = cls.detect(config)
        if found is not None:
            return cls, {**found, "config": config}
    raise UserError(f"{path}: not a drafter any registered method reads ({', '.join(_REGISTRY)})")


def _import_all() -> None:
    """Every module of this package registers its drafter on import (Medusa first: the default). Discovered, not
    listed, so a new drafter is one new module; and every process that imports medusa_ray (Ray workers too)
    knows every drafter."""
    import importlib
    import pkgutil

    names = sorted((m.name for m in pkgutil.iter_modules(__path__)), key=lambda n: (n != "medusa", n))
    for name in names:
        importlib.import_module(f"{__name__}.{name}")


_import_all()
