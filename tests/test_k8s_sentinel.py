"""Offline checks of the Sentinel overlay (k8s/overlays/gpu-sentinel, k8s/redis-sentinel), with the same
renderer and schema validators as tests/test_k8s_manifests.py, plus its start scripts run for real: their
choice of primary, and the Sentinel config they write loaded by a real redis-server --sentinel."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from deployments.config import AppArgs
from routing.redis_connect import parse_sentinel_url
from tests.sentinel_cluster import Node
from tests.test_k8s_manifests import (K8S, K8S_VERSIONS, _k8s_validate, _ray_templates, _render_script, app_config,
                                      crd_errors, matches, one, raycluster_from, rayservice, render, serve_config)

OVERLAY = K8S / "overlays" / "gpu-sentinel"
PASSWORD = "p w'd\"\\x"  # quotes, a backslash, a space: written into config files, it must survive


@pytest.fixture(scope="module")
def docs() -> list[dict]:
    return render(OVERLAY)


def test_the_variant_manifest_is_current():
    mod = _render_script()
    manifest = "k8s/overlays/gpu-sentinel/rayservice.yaml"
    source, config, replaced = mod.VARIANTS[manifest]
    root = K8S.parent
    expected = mod.render_variant((root / source).read_text(), (root / config).read_text(), replaced,
                                  (source, config))
    assert (root / manifest).read_text() == expected, "run: python k8s/render_serve_config.py"


def test_rayservice_validates_against_kuberay_crds(docs):
    rs = rayservice(docs)
    assert crd_errors(rs) == [] and crd_errors(raycluster_from(rs)) == []


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_core_objects_and_pod_templates_validate(docs, version):
    core = [d for d in docs if not d["apiVersion"].startswith("ray.io/")]
    assert {"StatefulSet", "Service", "ConfigMap", "PodDisruptionBudget", "Secret"} <= {d["kind"] for d in core}
    for d in core:
        _k8s_validate(d, version)
    for group, template in _ray_templates(rayservice(docs)):
        _k8s_validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": group},
                       "template": template}, version)


def _pods_of(docs: list[dict], service: dict) -> dict:
    """The StatefulSet whose pods the Service selects (exactly one)."""
    (sts,) = [s for s in docs if s["kind"] == "StatefulSet"
              and matches(service["spec"]["selector"], s["spec"]["template"]["metadata"]["labels"])]
    return sts


def test_the_app_asks_the_sentinels_and_waits_for_a_replica(docs):
    args = app_config(serve_config(docs))["args"]
    parsed = AppArgs.model_validate(args)
    assert parsed.durability == "strict" and parsed.min_replicas_acked >= 1
    target = parse_sentinel_url(args["store_url"])
    assert len(target.sentinels) == 3
    for host, port in target.sentinels:
        pod, service_name = host.split(".", 1)
        service = one(docs, "Service", service_name)
        assert service["spec"]["clusterIP"] == "None" and port in {p["port"] for p in service["spec"]["ports"]}
        sts = _pods_of(docs, service)
        assert sts["spec"]["serviceName"] == service_name
        assert pod.startswith(sts["metadata"]["name"] + "-")
        assert int(pod.rsplit("-", 1)[1]) < sts["spec"]["replicas"]
    store = one(docs, "StatefulSet", "swiftserve-store")
    assert parsed.min_replicas_acked <= store["spec"]["replicas"] - 1  # a replica can be lost too
    scripts = one(docs, "ConfigMap", "swiftserve-store-config")["data"]
    assert f"sentinel monitor {target.service} " in scripts["start-sentinel.sh"]


def test_the_gcs_keeps_its_own_redis(docs):
    rc = rayservice(docs)["spec"]["rayClusterConfig"]
    host = urlsplit("//" + rc["gcsFaultToleranceOptions"]["redisAddress"].split("://")[-1]).hostname
    gcs_redis = _pods_of(docs, one(docs, "Service", host))
    assert gcs_redis["metadata"]["name"] == "swiftserve-redis" and gcs_redis["spec"]["replicas"] == 1


def test_every_store_pod_and_the_app_share_one_password_secret(docs):
    args = app_config(serve_config(docs))["args"]
    rs = rayservice(docs)
    (llm,) = [t for g, t in _ray_templates(rs) if g == "llm-workers"]
    app_env = {e["name"]: e for e in llm["spec"]["containers"][0]["env"]}
    secret = app_env[args["store_password_env"]]["valueFrom"]
    for name in ("swiftserve-store", "swiftserve-store-sentinel"):
        container = one(docs, "StatefulSet", name)["spec"]["template"]["spec"]["containers"][0]
        env = {e["name"]: e for e in container["env"]}
        assert env["REDIS_PASSWORD"]["valueFrom"] == secret
    one(docs, "Secret", secret["secretKeyRef"]["name"])


# --- the start scripts, run for real ----------------------------------------------------------------

def _run_script(tmp_path: Path, name: str, hostname: str, sentinel_says: str = "") -> tuple[list[str], Path]:
    """Run a start script with `hostname`, `redis-cli` (answering `sentinel_says`) and `redis-server`
    stubbed; returns the arguments redis-server got and the directory the script wrote to."""
    docs = render(K8S / "redis-sentinel")
    script = one(docs, "ConfigMap", "swiftserve-store-config")["data"][name]
    run_dir, bin_dir = tmp_path / "run", tmp_path / "bin"
    run_dir.mkdir(exist_ok=True)
    bin_dir.mkdir(exist_ok=True)
    stubs = {"hostname": f"echo {hostname}", "redis-cli": f"printf '%s' '{sentinel_says}'",
             "redis-server": f'for a in "$@"; do echo "$a"; done > {tmp_path}/args'}
    for stub, body in stubs.items():
        (bin_dir / stub).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / stub).chmod(stat.S_IRWXU)
    (tmp_path / name).write_text(script.replace("/run/sentinel", str(run_dir)))
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "REDIS_PASSWORD": PASSWORD}
    subprocess.run(["sh", str(tmp_path / name)], env=env, check=True, timeout=30)
    return (tmp_path / "args").read_text().splitlines(), run_dir


@pytest.mark.parametrize("hostname, sentinel_says, replica_of", [
    ("swiftserve-store-0", "", None),  # first start: pod 0 is the primary
    ("swiftserve-store-2", "", "swiftserve-store-0.swiftserve-store-headless"),
    # after a failover pod 0 comes back as a replica of the primary the Sentinels name
    ("swiftserve-store-0", "swiftserve-store-1.swiftserve-store-headless\n6379\n",
     "swiftserve-store-1.swiftserve-store-headless"),
])
def test_a_store_pod_starts_as_primary_or_replica(tmp_path, hostname, sentinel_says, replica_of):
    args, _ = _run_script(tmp_path, "start-store.sh", hostname, sentinel_says)
    assert args[args.index("--replica-announce-ip") + 1] == f"{hostname}.swiftserve-store-headless"
    assert args[args.index("--requirepass") + 1] == args[args.index("--masterauth") + 1] == PASSWORD
    if replica_of is None:
        assert "--replicaof" not in args
    else:
        assert args[args.index("--replicaof") + 1:] == [replica_of, "6379"]


@pytest.mark.redis
def test_the_sentinel_config_runs_on_a_real_sentinel(tmp_path):
    server = shutil.which("redis-server")
    if not server:
        pytest.skip("redis-server not installed")
    args, run_dir = _run_script(tmp_path, "start-sentinel.sh", "swiftserve-store-sentinel-1")
    assert args == [str(run_dir / "sentinel.conf"), "--sentinel"]
    conf = (run_dir / "sentinel.conf").read_text()
    assert "sentinel monitor swiftserve swiftserve-store-0.swiftserve-store-headless 6379 2" in conf
    primary, sentinel = Node(tmp_path, "primary", PASSWORD), Node(tmp_path, "sentinel", PASSWORD)
    try:
        primary.start(["--port", str(primary.port), "--bind", "127.0.0.1", "--save", "", "--requirepass", PASSWORD])
        local = (conf.replace("port 26379", f"port {sentinel.port}\nbind 127.0.0.1")
                 .replace("swiftserve-store-0.swiftserve-store-headless 6379", f"127.0.0.1 {primary.port}")
                 .replace("announce-ip swiftserve-store-sentinel-1.swiftserve-store-sentinel-headless",
                          "announce-ip 127.0.0.1"))
        (run_dir / "sentinel.conf").write_text(local)
        sentinel.start([str(run_dir / "sentinel.conf"), "--sentinel"])
        deadline = time.monotonic() + 10
        # the primary's run id is known once the Sentinel's INFO got through: auth-pass is right
        while b"runid\r\n$40\r\n" not in sentinel.request([b"SENTINEL", b"MASTER", b"swiftserve"]):
            assert time.monotonic() < deadline, "the Sentinel cannot talk to the primary"
            time.sleep(0.1)
        wrong = Node(tmp_path, "wrong", "not the password")
        wrong.port = sentinel.port
        assert wrong.request([b"PING"]).startswith(b"-NOAUTH")  # the Sentinel wants the password
    finally:
        sentinel.kill()
        primary.kill()
