"""Static checks of everything under cluster/ and jobs/: KubeRay manifests against the real CRD schemas,
cluster-launcher YAMLs against Ray's own autoscaler schema, the Dockerfile, the runtime env and the job
entrypoints' argument handling. No Kubernetes, cloud or Ray cluster needed; runs in seconds."""

from __future__ import annotations

import copy
import json
import re
import shlex
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CRD_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "kuberay-crds"
KUBERAY = REPO / "cluster" / "kuberay"
LAUNCHERS = [REPO / "cluster" / "aws.yaml", REPO / "cluster" / "gcp.yaml"]
STAGES = ["distill", "train", "export", "eval", "pipeline"]
# The long-lived autoscaling cluster and the job run on it; beside them, RayJobs that bring a cluster of their own.
MAIN = ("raycluster.yaml", "rayjob.yaml")
JOB_CLUSTERS = [KUBERAY / "rayjob-70b.yaml"]


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _manifests() -> list[tuple[Path, dict]]:
    return [(p, d) for p in sorted(KUBERAY.glob("*.yaml")) for d in _docs(p)]


def _one(kind: str) -> dict:
    """The one ``kind`` of the main manifests (raycluster.yaml, rayjob.yaml)."""
    found = [d for p, d in _manifests() if p.name in MAIN and d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind} in {MAIN}, found {len(found)}"
    return found[0]


# --- a Kubernetes-like validator for CRD schemas -------------------------------------------------------

_FORMATS = jsonschema.FormatChecker()


@_FORMATS.checks("int32")
def _int32(value) -> bool:
    return not isinstance(value, int) or -(2**31) <= value < 2**31


@_FORMATS.checks("int64")
def _int64(value) -> bool:
    return not isinstance(value, int) or -(2**63) <= value < 2**63


def _list_type(validator, list_type, instance, schema):
    """x-kubernetes-list-type: `map` items are unique by their keys, `set` items are unique."""
    if not isinstance(instance, list):
        return
    if list_type == "map":
        keys = schema.get("x-kubernetes-list-map-keys", [])
        seen = [tuple(item.get(k) for k in keys) for item in instance if isinstance(item, dict)]
        dupes = {s for s in seen if seen.count(s) > 1}
        if dupes:
            yield jsonschema.ValidationError(f"duplicate entries for list-map keys {keys}: {sorted(dupes)}")
    elif list_type == "set":
        dumped = [json.dumps(i, sort_keys=True) for i in instance]
        if len(set(dumped)) != len(dumped):
            yield jsonschema.ValidationError("duplicate items in a list-type=set")


def _cel_rules(validator, rules, instance, schema):
    # The API server evaluates these CEL rules; this test cannot, so a manifest must not rely on them.
    yield jsonschema.ValidationError(
        f"sets a field guarded by CEL rules this test cannot check: {[r['rule'] for r in rules]}"
    )


_K8sValidator = jsonschema.validators.extend(
    jsonschema.Draft4Validator,
    {"x-kubernetes-list-type": _list_type, "x-kubernetes-validations": _cel_rules},
)


def _strict(schema):
    """Make a CRD schema behave like the API server with strict field validation (kubectl's default):
    unknown fields are errors, `nullable` allows null, int-or-string takes either."""
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {name: _strict(sub) for name, sub in out["properties"].items()}
    for key in ("items", "additionalProperties"):
        if isinstance(out.get(key), dict):
            out[key] = _strict(out[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in out:
            out[key] = [_strict(sub) for sub in out[key]]
    if out.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.get("type") == "object" and not out.get("x-kubernetes-preserve-unknown-fields"):
        out.setdefault("additionalProperties", False if "properties" in out else out.get("additionalProperties", True))
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


# libyaml when present: the CRD files are megabytes and the pure-Python loader takes tens of seconds.
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@lru_cache(maxsize=None)
def _crd_schema(api_version: str, kind: str) -> dict | None:
    """The strict schema for one kind, from ../shared/kuberay-crds/<group>_<kind>s.yaml."""
    if not CRD_DIR.is_dir():
        pytest.skip(f"KubeRay CRDs not found at {CRD_DIR} (expected ../shared/kuberay-crds beside the repo)")
    group, _, version = api_version.partition("/")
    path = CRD_DIR / f"{group}_{kind.lower()}s.yaml"
    if not path.is_file():
        return None
    for crd in yaml.load_all(path.read_text(), Loader=_Loader):
        if crd and crd.get("kind") == "CustomResourceDefinition" and crd["spec"]["names"]["kind"] == kind:
            for v in crd["spec"]["versions"]:
                if v["name"] == version and crd["spec"]["group"] == group:
                    return _strict(v["schema"]["openAPIV3Schema"])
    return None


_DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def _crd_errors(doc: dict) -> list[str]:
    """All schema violations of one manifest, as 'path: message' lines (empty when it is valid)."""
    schema = _crd_schema(doc.get("apiVersion", ""), doc.get("kind", ""))
    if schema is None:
        return [f"no CRD schema for apiVersion={doc.get('apiVersion')} kind={doc.get('kind')}"]
    errors = [
        f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
        for e in _K8sValidator(schema, format_checker=_FORMATS).iter_errors(doc)
    ]
    name = (doc.get("metadata") or {}).get("name", "")
    if not (_DNS1123.match(name) and len(name) <= 63):
        errors.append(f"metadata.name: {name!r} is not a valid resource name")
    return errors


# --- KubeRay manifests ---------------------------------------------------------------------------------


def test_every_kuberay_manifest_validates_against_its_crd():
    manifests = _manifests()
    kinds = [d["kind"] for _, d in manifests]
    assert "RayCluster" in kinds and "RayJob" in kinds, kinds
    for path, doc in manifests:
        if doc["apiVersion"].startswith("ray.io/"):
            assert _crd_errors(doc) == [], f"{path.name} {doc['kind']}/{doc['metadata']['name']}"
        else:
            # Core objects beside them: only the kinds we mean to ship, each named.
            assert (doc["apiVersion"], doc["kind"]) in {("v1", "PersistentVolumeClaim"), ("v1", "ConfigMap"),
                                                        ("networking.k8s.io/v1", "NetworkPolicy")}
            assert _DNS1123.match(doc["metadata"]["name"])


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda c: c["spec"].__setitem__("enableInTreeAutoscaler", True), "enableInTreeAutoscaler"),
        (lambda c: c["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
         .__setitem__("imagePullPolicyy", "Always"), "imagePullPolicyy"),
        (lambda c: c["spec"]["workerGroupSpecs"][0].__setitem__("maxReplicas", "eight"), "maxReplicas"),
        (lambda c: c["spec"]["workerGroupSpecs"][0].__setitem__("maxReplicas", 2**40), "maxReplicas"),
        (lambda c: c["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]
         .__setitem__("nvidia.com/gpu", "one"), "nvidia.com/gpu"),
        (lambda c: c["spec"]["headGroupSpec"]["template"]["spec"]["containers"].append(
            copy.deepcopy(c["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0])), "duplicate"),
        (lambda c: c["spec"].__setitem__("managedBy", "someone"), "CEL"),
        (lambda c: c["metadata"].__setitem__("name", "Medusa_Ray"), "metadata.name"),
    ],
    ids=["unknown-field", "unknown-nested-field", "int-as-text", "int32-overflow", "bad-quantity", "duplicate-container", "cel", "name"],
)
def test_validator_rejects_broken_raycluster(mutate, expected):
    # The schema check above is only worth something if it catches the mistakes people make.
    cluster = copy.deepcopy(_one("RayCluster"))
    mutate(cluster)
    errors = _crd_errors(cluster)
    assert any(expected in e for e in errors), errors


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def test_raycluster_has_cpu_head_and_autoscaled_gpu_workers():
    import ray

    spec = _one("RayCluster")["spec"]
    assert spec["rayVersion"] == ray.__version__
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    head = _containers(spec["headGroupSpec"]["template"])[0]
    assert "nvidia.com/gpu" not in head["resources"].get("limits", {})

    gpu_groups = [g for g in spec["workerGroupSpecs"]
                  if "nvidia.com/gpu" in _containers(g["template"])[0]["resources"].get("limits", {})]
    assert gpu_groups, "no worker group with nvidia.com/gpu limits"
    for group in gpu_groups:
        assert group["minReplicas"] == 0 and group["maxReplicas"] >= 2
        assert group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]
        tolerations = group["template"]["spec"].get("tolerations", [])
        assert any(t["key"] == "nvidia.com/gpu" for t in tolerations)

    # One image and the same shared storage everywhere; the Hub token comes from a Secret.
    pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    images = {c["image"] for p in pods for c in _containers(p)}
    assert len(images) == 1, images
    claim = _one("PersistentVolumeClaim")
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    for pod in pods:
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        container = _containers(pod)[0]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert volumes[mounts["/mnt/shared"]]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
        token = {e["name"]: e for e in container["env"]}["HF_TOKEN"]
        assert token["valueFrom"]["secretKeyRef"]["optional"] is True


# --- how the cluster is locked ---------------------------------------------------------------------------

RAY_PORTS = {8265, 10001, 6379}


def _pod_templates(docs: dict[str, dict]) -> dict[str, dict]:
    spec = docs["RayCluster"]["spec"]
    pods = {"head": spec["headGroupSpec"]["template"]}
    pods.update({f"worker {g['groupName']}": g["template"] for g in spec["workerGroupSpecs"]})
    if "RayJob" in docs:  # a RayService has no submitter
        pods["submitter"] = docs["RayJob"]["spec"].get("submitterPodTemplate") or {"spec": {"containers": [{}]}}
    return pods


def _hub_secret(container: dict) -> str | None:
    for env in container.get("env") or []:
        if env["name"] == "HF_TOKEN":
            return env["valueFrom"]["secretKeyRef"]["name"]
    return None


def _kuberay_security_problems(docs: dict[str, dict]) -> list[str]:
    """What an operator reviewing cluster/kuberay/ would flag; empty when the cluster is locked."""
    problems = []
    auth = docs["RayCluster"]["spec"].get("authOptions") or {}
    if auth.get("mode") != "token" or not auth.get("secretName"):
        problems.append("RayCluster: authOptions must be mode=token with a secretName")
    pods = _pod_templates(docs)
    for name, pod in pods.items():
        pod_security = pod["spec"].get("securityContext") or {}
        if pod_security.get("runAsNonRoot") is not True:
            problems.append(f"{name}: pod securityContext.runAsNonRoot is not true")
        for c in pod["spec"]["containers"]:
            security = c.get("securityContext") or {}
            if security.get("allowPrivilegeEscalation") is not False or security.get("privileged"):
                problems.append(f"{name}: container may escalate privileges")
            if "ALL" not in (security.get("capabilities") or {}).get("drop", []):
                problems.append(f"{name}: container keeps its Linux capabilities")
    if "submitter" in pods:
        submitter_env = {e["name"]: e for e in pods["submitter"]["spec"]["containers"][0].get("env") or []}
        ref = (submitter_env.get("RAY_AUTH_TOKEN") or {}).get("valueFrom", {}).get("secretKeyRef", {})
        if (ref.get("name"), ref.get("key")) != (auth.get("secretName"), "auth_token"):
            problems.append("RayJob submitter: RAY_AUTH_TOKEN does not come from the cluster's auth Secret")
    # Hub tokens: write access only where the driver pushes (the head), read-only on workers, none elsewhere.
    # A RayService never pushes: no pod of it holds the write token.
    head_secret = _hub_secret(pods["head"]["spec"]["containers"][0])
    for name, pod in pods.items():
        secret = _hub_secret(pod["spec"]["containers"][0])
        if "RayService" in docs:
            if secret == WRITE_TOKEN:
                problems.append(f"{name}: a RayService holds the Hub write token it never uses")
        elif name.startswith("worker") and (secret is None or secret == head_secret):
            problems.append(f"{name}: HF_TOKEN must be the read-only token, not the head's")
        if name == "submitter" and secret is not None:
            problems.append("submitter: holds a Hub token it never uses")
    # The NetworkPolicy: Ray's ports only from inside the namespace.
    policy = docs.get("NetworkPolicy")
    labels = docs["RayCluster"]["spec"]["headGroupSpec"]["template"]["metadata"]["labels"]
    if policy is None:
        return problems + ["no NetworkPolicy"]
    selector = policy["spec"]["podSelector"].get("matchLabels", {})
    if not selector or any(labels.get(k) != v for k, v in selector.items()) or "Ingress" not in policy["spec"].get(
            "policyTypes", []):
        problems.append("NetworkPolicy: does not select the cluster's pods for ingress")
    admitted: set[int] = set()
    for rule in policy["spec"].get("ingress", []):
        peers = rule.get("from")
        if not peers:
            problems.append("NetworkPolicy: a rule admits every source")
            continue
        for peer in peers:
            if "ipBlock" in peer or peer.get("namespaceSelector") == {}:
                problems.append("NetworkPolicy: a rule admits sources outside the namespace")
        ports = {p["port"] for p in rule.get("ports") or []}
        if not ports:
            if any(peer.get("podSelector", {}).get("matchLabels") != selector for peer in peers):
                problems.append("NetworkPolicy: every port is open to pods other than the cluster's own")
        elif any(peer.get("podSelector") == {} for peer in peers):
            admitted |= ports
            if ports - RAY_PORTS:
                problems.append(f"NetworkPolicy: ports {sorted(ports - RAY_PORTS)} open to the namespace")
    if admitted != RAY_PORTS:
        problems.append(f"NetworkPolicy: the namespace reaches ports {sorted(admitted)}, not {sorted(RAY_PORTS)}")
    return problems


def _kuberay_docs(name: str = "raycluster.yaml") -> dict[str, dict]:
    """The objects of one cluster by kind: raycluster.yaml with rayjob.yaml, or a RayJob file whose own cluster
    (``rayClusterSpec``) stands as its RayCluster."""
    if name == "raycluster.yaml":
        return {d["kind"]: d for p, d in _manifests() if p.name in MAIN}
    docs = {d["kind"]: d for d in _docs(KUBERAY / name)}
    if "RayService" in docs:  # its cluster is ``rayClusterConfig``
        service = docs["RayService"]
        docs["RayCluster"] = {"metadata": service["metadata"], "spec": service["spec"]["rayClusterConfig"]}
        return docs
    job = docs["RayJob"]
    docs["RayCluster"] = {"metadata": job["metadata"], "spec": job["spec"]["rayClusterSpec"]}
    return docs


SERVICES = ["rayservice.yaml"]
CLUSTERS = ["raycluster.yaml", *(p.name for p in JOB_CLUSTERS), *SERVICES]
WRITE_TOKEN = "hf-write-token"


@pytest.mark.parametrize("name", CLUSTERS)
def test_kuberay_cluster_is_locked(name):
    assert _kuberay_security_problems(_kuberay_docs(name)) == []


@pytest.mark.parametrize("mutate, expected", [
    (lambda d: d["RayCluster"]["spec"].pop("authOptions"), "authOptions"),
    (lambda d: d.pop("NetworkPolicy"), "no NetworkPolicy"),
    (lambda d: d["NetworkPolicy"]["spec"]["ingress"].append({"from": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}),
     "outside the namespace"),
    (lambda d: d["NetworkPolicy"]["spec"]["ingress"][1]["ports"].append({"port": 8000}), "[8000]"),
    (lambda d: d["RayCluster"]["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
     ["securityContext"].__setitem__("allowPrivilegeEscalation", True), "escalate"),
    (lambda d: d["RayCluster"]["spec"]["headGroupSpec"]["template"]["spec"].pop("securityContext"), "runAsNonRoot"),
    (lambda d: d["RayCluster"]["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
     .__setitem__("env", d["RayCluster"]["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]),
     "read-only"),
    (lambda d: d["RayJob"]["spec"].pop("submitterPodTemplate"), "RAY_AUTH_TOKEN"),
], ids=["no-auth", "no-policy", "open-cidr", "extra-port", "escalation", "root", "write-token-on-workers",
        "submitter-without-token"])
@pytest.mark.parametrize("name", CLUSTERS)
def test_security_review_catches(mutate, expected, name, request):
    docs = copy.deepcopy(_kuberay_docs(name))
    case = request.node.callspec.id
    if "RayService" in docs and any(c in case for c in ("write-token-on-workers", "submitter-without-token")):
        pytest.skip("a RayService has no submitter, and none of its pods has a write token to copy")
    mutate(docs)
    assert any(expected in p for p in _kuberay_security_problems(docs)), _kuberay_security_problems(docs)


def test_rayjob_runs_the_pipeline_on_the_raycluster_with_a_valid_config(tmp_path):
    from medusa_ray.cli import build_parser
    from medusa_ray.config import load_config

    cluster, job = _one("RayCluster"), _one("RayJob")
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}

    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "python"
    # The script is this repo's jobs/pipeline.py, at the path the image puts it (Dockerfile WORKDIR).
    workdir = re.search(r"^WORKDIR\s+(\S+)", (REPO / "cluster" / "Dockerfile").read_text(), re.M).group(1)
    script = Path(argv[1])
    assert script.is_relative_to(workdir) and (REPO / script.relative_to(workdir)).is_file(), argv[1]
    assert script.name == "pipeline.py"

    # --config names the ConfigMap file mounted on the head; the config itself validates.
    args = build_parser().parse_args(["pipeline", *argv[2:]])
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]
    mount = {m["name"]: m["mountPath"] for m in head["containers"][0]["volumeMounts"]}
    volume = next(v for v in head["volumes"] if "configMap" in v)
    config_map = _one("ConfigMap")
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    filename = Path(args.config).name
    assert Path(args.config) == Path(mount[volume["name"]]) / filename
    config_file = tmp_path / filename
    config_file.write_text(config_map["data"][filename])
    cfg = load_config(config_file, args.overrides)
    assert cfg.train.num_workers >= 2 and cfg.distill.max_replicas and cfg.distill.max_replicas > 1
    # Everything a later stage or a restarted pod needs lives on the shared volume.
    for path in (cfg.distill.output_dir, cfg.train.storage_path, cfg.export.output_dir):
        assert path.startswith("/mnt/shared/") or path.startswith("s3://"), path
    assert yaml.safe_load(job["spec"]["runtimeEnvYAML"])


# --- the 70B example: a RayJob with a GPU cluster of its own ----------------------------------------------

def _image_workdir() -> str:
    return re.search(r"^WORKDIR\s+(\S+)", (REPO / "cluster" / "Dockerfile").read_text(), re.MULTILINE).group(1)


def _70b() -> tuple[dict, dict, dict]:
    """(docs by kind, the RayJob's spec, its cluster's spec) of rayjob-70b.yaml."""
    docs = _kuberay_docs("rayjob-70b.yaml")
    return docs, docs["RayJob"]["spec"], docs["RayCluster"]["spec"]


def _70b_config(overrides: list[str] | None = None):
    from medusa_ray.cli import build_parser
    from medusa_ray.config import load_config

    argv = shlex.split(_70b()[1]["entrypoint"])
    args = build_parser().parse_args(["pipeline", *argv[2:]])
    path = REPO / Path(args.config).relative_to(_image_workdir())
    assert path == REPO / "configs" / "llama-70b.yaml"
    return load_config(path, [*args.overrides, *(overrides or [])])


def test_70b_rayjob_brings_its_gpu_nodes_and_runs_the_70b_config():
    import ray

    docs, job, spec = _70b()
    assert spec["rayVersion"] == ray.__version__
    assert "clusterSelector" not in job and job["shutdownAfterJobFinishes"] is True
    pods = [spec["headGroupSpec"]["template"], *(g["template"] for g in spec["workerGroupSpecs"])]
    # The same image as the main cluster everywhere, the submitter's included.
    main_image = _containers(_one("RayCluster")["spec"]["headGroupSpec"]["template"])[0]["image"]
    assert {c["image"] for p in [*pods, job["submitterPodTemplate"]] for c in _containers(p)} == {main_image}
    head = _containers(spec["headGroupSpec"]["template"])[0]
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert "nvidia.com/gpu" not in head["resources"]["limits"]
    # A fixed group of whole 8-GPU nodes, with shared memory for NCCL and vLLM's tensor-parallel workers.
    (group,) = spec["workerGroupSpecs"]
    worker = _containers(group["template"])[0]
    assert worker["resources"]["requests"] == worker["resources"]["limits"]
    gpus_per_node, nodes = int(worker["resources"]["limits"]["nvidia.com/gpu"]), group["replicas"]
    assert gpus_per_node == 8 and nodes == group["minReplicas"] == group["maxReplicas"] >= 2
    assert any(t["key"] == "nvidia.com/gpu" for t in group["template"]["spec"]["tolerations"])
    mounts = {m["mountPath"]: m["name"] for m in worker["volumeMounts"]}
    volumes = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    claim = docs["PersistentVolumeClaim"]
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    for pod in pods:
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in _containers(pod)[0]["volumeMounts"]}
        assert volumes[mounts["/mnt/shared"]]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]

    # The config uses those GPUs: a worker per GPU with the base sharded; engines split by tensor parallelism.
    cfg = _70b_config()
    t = cfg.train
    assert t.num_workers == nodes * gpus_per_node and t.use_gpu is True and t.shard_base is True
    assert t.zero_stage == 3 and t.storage_path.startswith("s3://")
    for path in (cfg.distill.output_dir, cfg.export.output_dir, cfg.eval.output_json):
        assert path.startswith("/mnt/shared/"), path
    assert cfg.distill.accelerator == cfg.eval.accelerator == "gpu"
    tp = cfg.distill.engine_kwargs["tensor_parallel_size"]
    assert gpus_per_node % tp == 0 and cfg.distill.num_replicas * tp == nodes * gpus_per_node
    assert cfg.eval.engine_kwargs["tensor_parallel_size"] <= gpus_per_node


def test_70b_config_passes_the_preflight_on_its_gpus(tmp_path):
    """The preflight on the example's own numbers (the Hub model's config.json shape, written locally: no
    download): accepted on the worker group's 16 H100s, refused with too few workers, engines fitting at TP 4.
    Half the workers (8) would still fit (≈ 30 GiB each); the refusal starts at 2, naming the 3 that fit."""
    from helpers import LLAMA_70B_CONFIG, write_model_config

    from medusa_ray import preflight
    from medusa_ray.errors import UserError

    _, _, spec = _70b()
    (group,) = spec["workerGroupSpecs"]
    assert group["template"]["spec"]["nodeSelector"]["nvidia.com/gpu.product"].startswith("NVIDIA-H100-80GB")
    memory = preflight.GPU_MEMORY_GIB["H100"]
    base = write_model_config(tmp_path / "llama-3.1-70b", LLAMA_70B_CONFIG)
    cfg = _70b_config([f"model={base}"])
    assert preflight.check_train(cfg, on_gpu=True, worker_memory_gib=memory) is True
    line = preflight.train_estimate(cfg, on_gpu=True, shard_base=True).line()
    assert line in (REPO / "docs" / "cluster.md").read_text()  # the numbers the docs quote
    assert preflight.check_train(_70b_config([f"model={base}", "train.num_workers=8"]), True, memory) is True
    with pytest.raises(UserError) as err:
        preflight.check_train(_70b_config([f"model={base}", "train.num_workers=2"]), True, memory)
    assert "\n" not in str(err.value) and "use train.num_workers=3 with train.shard_base=true" in str(err.value)
    with pytest.raises(UserError, match="train.shard_base=true"):
        preflight.check_train(_70b_config([f"model={base}", "train.shard_base=false"]), True, memory)
    # Both engines fit at the configured TP 4; without it the preflight picks 4 too.
    for section in ("distill", "eval"):
        kwargs = getattr(cfg, section).engine_kwargs
        assert preflight.check_engine(cfg, section, kwargs, memory) == kwargs
        unset = {k: v for k, v in kwargs.items() if k != "tensor_parallel_size"}
        assert preflight.check_engine(cfg, section, unset, memory)["tensor_parallel_size"] == 4


# --- cluster-launcher configs ---------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_config_validates_against_ray_schema(path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(path.read_text())
    jsonschema.validate(config, _ray_schema())
    # What `ray up` does before launching anything: fill the provider defaults, validate again.
    validate_config(prepare_config(copy.deepcopy(config)))

    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and not head["resources"].get("GPU")
    gpu_types = [t for t in types.values() if t["resources"].get("GPU")]
    assert gpu_types, "no GPU worker node type"
    for node_type in gpu_types:
        assert node_type["min_workers"] == 0 and node_type["max_workers"] >= 2
    # The same image as on KubeRay.
    kuberay_image = _containers(_one("RayCluster")["spec"]["headGroupSpec"]["template"])[0]["image"]
    assert config["docker"]["image"] == kuberay_image


_WORLD_WRITABLE = re.compile(r"chmod\s+(-R\s+)?([0-7]?[0-7]{2}[2367]\b|[ao]*\+[rx]*w)")


def _launcher_security_problems(config: dict) -> list[str]:
    problems = []
    commands = {k: " ".join(config.get(k) or []) for k in
                ("initialization_commands", "setup_commands", "head_start_ray_commands", "worker_start_ray_commands")}
    for key, text in commands.items():
        if _WORLD_WRITABLE.search(text):
            problems.append(f"{key}: makes something world-writable")
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        if "RAY_AUTH_MODE=token ray start" not in commands[key]:
            problems.append(f"{key}: ray start without RAY_AUTH_MODE=token")
    host = re.search(r"--dashboard-host[= ](\S+)", commands["head_start_ray_commands"])
    if host is None or host.group(1) not in ("127.0.0.1", "localhost"):
        problems.append("head_start_ray_commands: the dashboard listens beyond localhost")
    if (config.get("file_mounts") or {}).get("/home/ray/.ray/auth_token") != "~/.ray/auth_token":
        problems.append("file_mounts: the nodes do not get the token file")
    return problems


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_cluster_is_locked(path):
    config = yaml.safe_load(path.read_text())
    assert _launcher_security_problems(config) == []
    broken = copy.deepcopy(config)
    broken["initialization_commands"].append("sudo chmod 1777 /mnt/shared")
    broken["head_start_ray_commands"] = [c.replace("127.0.0.1", "0.0.0.0") for c in broken["head_start_ray_commands"]]
    broken["worker_start_ray_commands"] = [c.replace("RAY_AUTH_MODE=token ", "")
                                           for c in broken["worker_start_ray_commands"]]
    broken.pop("file_mounts")
    problems = " | ".join(_launcher_security_problems(broken))
    for expected in ("world-writable", "beyond localhost", "worker_start_ray_commands", "token file"):
        assert expected in problems, problems


def test_launcher_validation_is_not_vacuous():
    config = yaml.safe_load(LAUNCHERS[0].read_text())
    config["available_node_types"][config["head_node_type"]]["min_wokers"] = 0
    with pytest.raises(jsonschema.ValidationError, match="min_wokers"):
        jsonschema.validate(config, _ray_schema())


def test_aws_gpu_workers_are_spot():
    config = yaml.safe_load(LAUNCHERS[0].read_text())
    for node_type in config["available_node_types"].values():
        if node_type["resources"].get("GPU"):
            assert node_type["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"


# --- image, runtime env, job entrypoints ----------------------------------------------------------------


def test_dockerfile_builds_on_matching_ray_image_with_gpu_extra():
    import tomllib

    import ray

    text = (REPO / "cluster" / "Dockerfile").read_text()
    base = re.search(r"^ARG RAY_IMAGE=(\S+)", text, re.M).group(1)
    assert base == f"rayproject/ray:{ray.__version__}-py311-gpu"
    assert re.search(r"^FROM \$\{RAY_IMAGE\}", text, re.M)
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    used = re.search(r'pip install [^\n]*"\.\[([^\]]+)\]"', text).group(1).split(",")
    assert "gpu" in used and set(used) <= set(extras)
    for src in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", text, re.M):
        for item in src.split():
            assert (REPO / item).exists(), f"Dockerfile copies {item}, which is not in the repo"


def test_runtime_env_is_valid_and_merges_with_the_driver_env(monkeypatch):
    import ray
    from ray._private.worker import _merge_runtime_env
    from ray.runtime_env import RuntimeEnv

    from medusa_ray.cluster import init_ray
    from medusa_ray.config import RayConfig

    job_env = yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text())
    RuntimeEnv(**job_env)  # Ray's own field validation
    assert ".venv/" in job_env["excludes"] and "outputs/" in job_env["excludes"]

    # The driver's ray.init(runtime_env=...) must not collide with the job's, or Ray refuses the job.
    seen = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.update(kw))
    init_ray(RayConfig(address="auto"))
    assert _merge_runtime_env(job_env, seen.get("runtime_env")) is not None


@pytest.mark.parametrize("stage", STAGES)
def test_job_entrypoint_forces_cluster_address(stage, monkeypatch, tmp_path):
    """Each jobs/<stage>.py parses like the CLI, joins `auto` unless told otherwise and runs its stage."""
    monkeypatch.syspath_prepend(str(REPO / "jobs"))
    import _entry

    from medusa_ray import cli

    calls = []
    monkeypatch.setattr("medusa_ray.cluster.init_ray", lambda cfg: calls.append(("init", cfg.address)))
    class Ran:  # what a stage returns: the CLI prints its summary
        def summary(self) -> str:
            return "ran"

    monkeypatch.setattr(cli, "run_stage", lambda args, cfg: calls.append((args.command, cfg.ray.address)) or Ran())
    assert _entry.main(stage, []) == 0
    assert calls == [("init", "auto"), (stage, "auto")]

    calls.clear()
    assert _entry.main(stage, ["ray.address=ray://head:10001"]) == 0
    assert calls[-1] == (stage, "ray://head:10001")

    config = tmp_path / "c.yaml"
    config.write_text("ray:\n  address: ''\n")  # explicitly local
    calls.clear()
    assert _entry.main(stage, ["--config", str(config)]) == 0
    assert calls[-1] == (stage, "")

    # The script itself dispatches to that stage.
    text = (REPO / "jobs" / f"{stage}.py").read_text()
    assert f'main("{stage}")' in text


def test_job_entrypoint_reports_bad_config_in_one_line():
    proc = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "train.py"), "train.medusa_num_heads=0"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "train.medusa_num_heads" in lines[0] and lines[0].startswith("jobs/train.py")


# --- the Hub token stays in its pod -----------------------------------------------------------------------

SHARED = "/mnt/shared"


def _env_settings() -> list[tuple[str, str, str]]:
    """(where, name, value) of every environment variable cluster/ sets: container env in the KubeRay
    manifests, `NAME=value` in the launchers' commands and docker options, ENV in the Dockerfile."""
    found = []

    def walk(node, where):
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "env" and isinstance(value, list):
                    found.extend((where, e["name"], str(e.get("value", ""))) for e in value if isinstance(e, dict))
                else:
                    walk(value, f"{where}.{key}")
        elif isinstance(node, list):
            for i, item in enumerate(node):
                walk(item, f"{where}[{i}]")
        elif isinstance(node, str):
            for name, value in re.findall(r"\b([A-Z][A-Z0-9_]*)=('[^']*'|\"[^\"]*\"|[^\s'\";]+)", node):
                found.append((where, name, value.strip("'\"")))

    for path, doc in _manifests():
        walk(doc, path.name)
    for path in LAUNCHERS:
        walk(yaml.safe_load(path.read_text()), path.name)
    dockerfile = (REPO / "cluster" / "Dockerfile").read_text().replace("\\\n", " ")
    for line in re.findall(r"^ENV\s+(.+)$", dockerfile, re.M):
        walk(line, "Dockerfile ENV")
    return found


def test_only_the_hub_cache_is_on_the_shared_volume():
    """HF_HOME holds the login token (HF_HOME/token): on a volume every pod mounts, one `hf auth login` would
    hand the write token to every pod and node. Only the download cache (HF_HUB_CACHE) is shared."""
    settings = _env_settings()
    assert settings, "found no environment settings under cluster/"
    for where, name, value in settings:
        assert not (name == "HF_HOME" and value.startswith(SHARED)), f"{where}: HF_HOME={value} is on the shared volume"
        if value.startswith(SHARED):
            assert not name.startswith("HF_") or name == "HF_HUB_CACHE", f"{where}: {name}={value} shares Hub state"
    for source in ["raycluster.yaml", *(p.name for p in JOB_CLUSTERS), "aws.yaml", "gcp.yaml"]:
        assert any(where.startswith(source) and name == "HF_HUB_CACHE" and value.startswith(SHARED)
                   for where, name, value in settings), f"{source}: HF_HUB_CACHE does not point at {SHARED}"
    # Every pod of each RayCluster reads the same cache.
    for name in CLUSTERS:
        spec = _kuberay_docs(name)["RayCluster"]["spec"]
        for pod in [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]:
            env = {e["name"]: e.get("value") for e in _containers(pod)[0]["env"]}
            assert env.get("HF_HUB_CACHE", "").startswith(SHARED) and "HF_HOME" not in env


def test_rayservice_serves_the_export_through_medusa_rays_app_builder(tmp_path):
    """The RayService's Serve app is `medusa-ray serve`'s (same checks, autoscaling from its config), on the
    port its pods expose, and reachable only from labelled clients; its config is a valid medusa-ray config."""
    import importlib

    from medusa_ray.config import load_config

    docs = _kuberay_docs("rayservice.yaml")
    service = docs["RayService"]["spec"]
    serve_config = yaml.safe_load(service["serveConfigV2"])
    assert serve_config["http_options"] == {"host": "0.0.0.0", "port": 8000}
    (app,) = serve_config["applications"]
    module, _, func = app["import_path"].partition(":")
    assert callable(getattr(importlib.import_module(module), func))
    config_file = tmp_path / "config.yaml"
    config_file.write_text(docs["ConfigMap"]["data"]["config.yaml"])
    cfg = load_config(config_file)
    assert cfg.serve.accelerator == "gpu" and cfg.serve.max_replicas >= cfg.serve.min_replicas >= 1
    assert app["args"]["config"].startswith("/etc/medusa-ray/") and app["args"]["draft_dir"] == cfg.export.output_dir
    spec = docs["RayCluster"]["spec"]
    assert spec["rayVersion"] == __import__("ray").__version__
    for pod in [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]:
        container = _containers(pod)[0]
        assert 8000 in {p["containerPort"] for p in container.get("ports", [])}
        assert "/etc/medusa-ray" in {m["mountPath"] for m in container["volumeMounts"]}
    gpu = spec["workerGroupSpecs"][0]
    assert gpu["maxReplicas"] >= cfg.serve.max_replicas
    # The OpenAI port: only from labelled clients, never the whole namespace.
    rules = docs["NetworkPolicy"]["spec"]["ingress"]
    serve_rules = [r for r in rules if 8000 in {p["port"] for p in r.get("ports") or []}]
    assert serve_rules and all(peer.get("podSelector", {}).get("matchLabels") for r in serve_rules for peer in r["from"])
    docs["RayCluster"]["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"][0]["valueFrom"][
        "secretKeyRef"]["name"] = WRITE_TOKEN
    assert any("write token" in p for p in _kuberay_security_problems(docs))
