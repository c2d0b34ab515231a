"""Operating swiftserve as a user would: the wheel installed in a fresh venv, `swiftserve serve` as a
subprocess (its own local Ray), the CLI's one-line errors, metrics at zero, OpenAI shapes through the
openai client, and the drain on SIGTERM with a stream in flight (checked against the real Redis record)."""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import site
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from routing.redis_store import RedisSessionStore
from tests.redis_server import RedisServer, free_port

ROOT = Path(__file__).resolve().parents[1]
MODEL = yaml.safe_load((ROOT / "configs" / "local.yaml").read_text())["applications"][0]["args"]["model_id"]
KEY = "op-test-key-0123456789abcdef"
GRACE_S = 3.0

pytestmark = pytest.mark.ray


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=kw.pop("timeout", 180), **kw)


def one_line_error(out: subprocess.CompletedProcess, *words: str) -> str:
    """A failed command's stderr is exactly one line, naming what is wrong."""
    lines = out.stderr.strip().splitlines()
    assert out.returncode != 0 and len(lines) == 1, out.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


# ---- the wheel ---------------------------------------------------------------
@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """The wheel built from this tree, installed (no deps: they come from the test interpreter's site) in a fresh venv."""
    tmp = tmp_path_factory.mktemp("wheel")
    built = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp),
                 str(ROOT)], timeout=300)
    assert built.returncode == 0, built.stderr
    wheel = next(tmp.glob("swiftserve-*.whl"))
    env_dir = tmp / "venv"
    made = run([sys.executable, "-m", "venv", str(env_dir)])
    assert made.returncode == 0, made.stderr
    installed = run([str(env_dir / "bin" / "pip"), "install", "-q", "--no-deps", "--force-reinstall", str(wheel)])
    assert installed.returncode == 0, installed.stderr
    see_test_site_packages(env_dir)
    return env_dir


def see_test_site_packages(env_dir: Path) -> None:
    """Let the venv import what the interpreter running the tests has (torch, ray, ...). Not
    --system-site-packages: under the README's .venv that is the base interpreter's, which has none of them.
    Plain path lines, after the venv's own site-packages, so its wheel comes first; the test interpreter's
    .pth files are not run (an editable install of this tree would hook imports ahead of the wheel)."""
    purelib = run([str(env_dir / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
    assert purelib.returncode == 0, purelib.stderr
    (Path(purelib.stdout.strip()) / "swiftserve-tests-parent.pth").write_text("\n".join(site.getsitepackages()) + "\n")


def venv_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "OPENAI_API_KEY")}
    return {**env, "PYTHONNOUSERSITE": "1"}


def test_wheel_ships_the_configs_and_the_checkpoint(venv, tmp_path):
    where = run([str(venv / "bin" / "python"), "-c", "import configs, deployments, swift_engine; "
                 "print(configs.__file__); print(deployments.__file__); print(swift_engine.__file__)"],
                cwd=tmp_path, env=venv_env())
    assert where.returncode == 0 and all(str(venv) in line for line in where.stdout.split()), where.stdout
    helped = run([str(venv / "bin" / "swiftserve"), "serve", "--help"], cwd=tmp_path,
                 env={**venv_env(), "COLUMNS": "1000"})  # no wrapping inside the path
    default = re.search(r"\(default: (\S+local\.yaml)\)", helped.stdout)
    assert helped.returncode == 0 and default and Path(default[1]).is_file() and str(venv) in default[1]
    # the packaged default config validates and its bundled model resolves: the next check is the port
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = run([str(venv / "bin" / "swiftserve"), "serve", "--host", "127.0.0.1", "--port", str(port)],
                  cwd=tmp_path, env=venv_env(), timeout=60)
    one_line_error(out, f"port {port}", "in use")


# ---- checks before Ray starts ------------------------------------------------
def test_bad_config_and_unknown_model_are_one_line_before_ray(tmp_path):
    spec = yaml.safe_load((ROOT / "configs" / "local.yaml").read_text())
    spec["applications"][0]["args"]["engine"]["window_tokens"] = -3
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(spec))
    start = time.monotonic()
    out = run([sys.executable, "-m", "deployments.cli", "serve", "--config", str(tmp_path / "bad.yaml")])
    one_line_error(out, "applications[0].args.engine.window_tokens")
    spec["applications"][0]["args"]["engine"].update(window_tokens=252, model="no-such-org/no-such-model")
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(spec))
    ports = [arg for flag in ("--port", "--dashboard-port", "--metrics-port") for arg in (flag, str(free_port()))]
    out = run([sys.executable, "-m", "deployments.cli", "serve", "--config", str(tmp_path / "model.yaml"), *ports])
    one_line_error(out, "'no-such-org/no-such-model'")  # not "port 8265 in use" when another Ray runs here
    out = run([sys.executable, "-m", "deployments.cli", "chat", "--model", "no-such-org/no-such-model"])
    one_line_error(out, "'no-such-org/no-such-model'")
    out = run([sys.executable, "-m", "deployments.cli", "chat", "--url", f"http://127.0.0.1:{free_port()}/v1"])
    one_line_error(out, "cannot connect")
    assert time.monotonic() - start < 150  # no Ray, no hub retries (seconds each, minutes on a loaded machine)


def test_ctrl_c_stops_the_reply_and_keeps_the_conversation(tmp_path):
    """Engine-alone chat in a pseudo-terminal: Ctrl-C mid-reply, then another turn on the same history."""
    import pexpect

    env = {**os.environ, "HOME": str(tmp_path)}
    child = pexpect.spawn(sys.executable, ["-m", "deployments.cli", "chat", "--model", "tiny", "--session", "pty",
                                           "--max-tokens", "100000", "--window-tokens", "60"],
                          env=env, cwd=str(ROOT), encoding="utf-8", timeout=120)
    child.expect("you> ")
    child.sendline("tell me everything")
    child.expect("bot> ")
    child.read_nonblocking(200, timeout=60)  # the reply is streaming
    child.sendintr()
    child.expect(r"\[stopped\]")
    child.expect("you> ")
    child.sendline("and again")
    child.expect("bot> ")
    time.sleep(1)
    child.sendintr()
    child.expect("you> ")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    history = json.loads((tmp_path / ".cache" / "swiftserve" / "chats" / "pty.json").read_text())
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
    assert history[2]["content"] == "and again" and history[1]["content"]


# ---- a running server (from the wheel) -----------------------------------------
@pytest.fixture(scope="module")
def server(venv, tmp_path_factory):
    """`swiftserve serve` from the wheel: the packaged default config with a real Redis store and API keys."""
    tmp = tmp_path_factory.mktemp("serve")
    redis, proc = RedisServer(), None
    try:  # a server that fails to start (or a failed test) leaves neither it nor its Redis running
        redis.start()
        proc, ports = serve_from_wheel(venv, tmp, redis)
        yield {"proc": proc, "url": f"http://127.0.0.1:{ports['port']}", "redis": redis, "log": tmp / "serve.log",
               "metrics": f"http://127.0.0.1:{ports['metrics']}/metrics", "home": tmp}
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        redis.close()


def serve_from_wheel(venv: Path, tmp: Path, redis: RedisServer) -> tuple[subprocess.Popen, dict]:
    """`swiftserve serve` started and ready, with its ports; killed here if it never gets ready."""
    import configs

    spec = yaml.safe_load((Path(configs.__file__).parent / "local.yaml").read_text())
    args = spec["applications"][0]["args"]
    args.update(store_url=redis.url, api_keys_file=str(tmp / "keys"))
    (tmp / "keys").write_text(f"ops:{KEY}\n")
    (tmp / "app.yaml").write_text(yaml.safe_dump(spec))
    ports = {"port": free_port(), "metrics": free_port(), "dashboard": free_port()}
    log = open(tmp / "serve.log", "w+")
    proc = subprocess.Popen([str(venv / "bin" / "swiftserve"), "serve", "--config", str(tmp / "app.yaml"),
                             "--host", "127.0.0.1", "--port", str(ports["port"]), "--grace-s", str(GRACE_S),
                             "--metrics-port", str(ports["metrics"]), "--dashboard-port", str(ports["dashboard"])],
                            stdout=log, stderr=subprocess.STDOUT, cwd=tmp, env=venv_env())
    try:
        deadline = time.monotonic() + 420  # a loaded 2-core machine takes minutes
        while "swiftserve ready in" not in (tmp / "serve.log").read_text():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp / "serve.log").read_text()[-3000:]
            time.sleep(0.5)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc, ports


def test_ready_means_every_series_at_zero_and_health(server):
    series = {}
    deadline = time.monotonic() + 30  # Ray exports every few seconds
    names = ["generated_tokens_total", "reprefills_total", "session_claims_total", "cache_evictions_total",
             "commit_failures_total", "sessions_resident", "sessions_host", "sessions_ids_only",
             "host_cache_bytes_used", "sessions_running", "cache_pages_used",
             "cache_pages_total", "cache_pages_shared"]
    while time.monotonic() < deadline:
        text = urllib.request.urlopen(server["metrics"]).read().decode()
        series = {n: re.findall(rf"^ray_swiftserve_{n}{{(.*)}} (\S+)$", text, re.M) for n in names}
        if all(len(found) >= 2 for found in series.values()):  # both replicas have exported
            break
        time.sleep(2)
    assert all(series.values()), {n: len(v) for n, v in series.items()}
    nonzero = [(n, v) for n, found in series.items() if n != "cache_pages_total" for _, v in found if float(v)]
    assert not nonzero
    replicas = {re.search(r'replica="([^"]+)"', labels)[1] for labels, _ in series["sessions_resident"]}
    assert len(replicas) == 2 and all(f'model="{MODEL}"' in labels for labels, _ in series["sessions_resident"])
    # /health routes one call to an LLMServer replica; the ingress's router, created for its first call,
    # starts every decision series at zero
    assert httpx.get(server["url"] + "/health").json() == {"status": "ready"}
    decisions = {}
    for _ in range(15):  # the zeros can be exported before the first decision's count is
        text = urllib.request.urlopen(server["metrics"]).read().decode()
        decisions = dict(re.findall(r'^ray_swiftserve_routing_decisions_total{.*decision="(\w+)".*} (\S+)$', text, re.M))
        if sum(float(v) for v in decisions.values()):
            break
        time.sleep(2)
    assert decisions == {"owner": "0.0", "ring": "0.0", "fallback": "1.0", "backoff": "0.0"}


def test_openai_shapes(server):
    client = openai.OpenAI(base_url=server["url"] + "/v1", api_key=KEY, max_retries=0)
    model = client.models.retrieve(MODEL)
    assert model.id == MODEL and model.created > 1_700_000_000 and model.model_extra["max_model_len"] > 0
    assert [m.id for m in client.models.list().data] == [MODEL]
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("no-such-model")
    assert err.value.code == "model_not_found"
    with pytest.raises(openai.AuthenticationError) as err:
        openai.OpenAI(base_url=server["url"] + "/v1", api_key="wrong-key-0123456789", max_retries=0).models.list()
    assert err.value.code == "invalid_api_key"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=[{"role": "robot", "content": "x"}])
    assert err.value.code is None and err.value.param == "messages.[0].role"
    bad = httpx.post(server["url"] + "/v1/chat/completions", content=b"{not json",
                     headers={"authorization": f"Bearer {KEY}", "content-type": "application/json"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] is None and bad.json()["error"]["code"] is None
    completion = client.completions.create(model=MODEL, prompt="The", max_tokens=3, logprobs=2, temperature=0)
    assert completion.usage.completion_tokens == 3 and completion.choices[0].logprobs is not None
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt="The", max_tokens=3, logprobs=9)
    assert err.value.param == "logprobs"


def chat_cli(server, *args: str, stdin: str = "", **env) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "deployments.cli", "chat", *args], input=stdin, cwd=ROOT, timeout=120,
               env={**os.environ, "HOME": str(server["home"]), **env})


def test_chat_cli_against_the_server(server):
    url = server["url"]
    out = chat_cli(server, "--url", url + "/v1", "--session", "cli-1", "--max-tokens", "5", stdin="hello\n",
                   OPENAI_API_KEY=KEY)
    assert out.returncode == 0 and "bot> " in out.stdout, out.stderr
    assert httpx.get(f"{url}/v1/sessions/cli-1", headers={"authorization": f"Bearer {KEY}"}).json()["turns"] == 1
    one_line_error(chat_cli(server, "--url", url, "--api-key", "wrong-key-0123456789", stdin="hi\n"), "401")
    one_line_error(chat_cli(server, "--url", url + "/nowhere", "--api-key", KEY, stdin="hi\n"), "404")
    # another client moved the session on: resuming the saved history is a 409, said in one line
    httpx.delete(f"{url}/v1/sessions/cli-1", headers={"authorization": f"Bearer {KEY}"})
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "other"}], max_tokens=2,
                                   extra_headers={"x-session-id": "cli-1"})
    out = chat_cli(server, "--url", url, "--api-key", KEY, "--session", "cli-1", stdin="more\n")
    assert out.returncode == 0 and re.search(r"^error: conflict \(409\).*$", out.stderr, re.M), out.stderr


def test_every_dashboard_metric_is_exported_after_traffic(server):
    client = openai.OpenAI(base_url=server["url"] + "/v1", api_key=KEY, max_retries=0)
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                            stream=True, extra_headers={"x-session-id": "dash"})
    assert len([c for c in stream if c.choices and c.choices[0].delta.content]) >= 1
    wanted, exported = {p.metric for p in dashboard_module().PANELS}, set()
    for _ in range(15):  # Ray exports every few seconds
        exported = set(re.findall(r"^(ray_swiftserve_\w+?)(?:_bucket|_count|_sum)?{", urllib.request.urlopen(
            server["metrics"]).read().decode(), re.M))
        if wanted <= exported:
            break
        time.sleep(2)
    assert wanted <= exported, wanted - exported


def test_sigterm_drains_a_running_stream(server):
    url, headers = server["url"], {"authorization": f"Bearer {KEY}", "x-session-id": "drain"}
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2, "temperature": 0}
    first = httpx.post(url + "/v1/chat/completions", json=body, headers=headers, timeout=60)
    assert first.status_code == 200, first.text
    reply = first.json()["choices"][0]["message"]["content"]
    events: list[str] = []
    signalled = []

    async def stream_then_signal():
        history = body["messages"] + [{"role": "assistant", "content": reply}, {"role": "user", "content": "go on"}]
        long = {**body, "messages": history, "stream": True, "max_tokens": 1024, "ignore_eos": True}
        async with httpx.AsyncClient(timeout=60) as http:
            async with http.stream("POST", url + "/v1/chat/completions", json=long, headers=headers) as r:
                assert r.status_code == 200, await r.aread()
                async for line in r.aiter_lines():
                    if line.startswith("data:"):
                        events.append(line[5:].strip())
                    if len(events) == 3 and not signalled:  # once: a second signal stops at once
                        server["proc"].send_signal(signal.SIGTERM)
                        signalled.append(time.monotonic())
                        for _ in range(100):  # the driver broadcasts the drain within a moment
                            if (await http.get(url + "/health")).status_code == 503:
                                break
                            await asyncio.sleep(0.1)
                        refused = await http.post(url + "/v1/chat/completions", json=body,
                                                  headers={"authorization": headers["authorization"]})
                        assert refused.status_code == 503 and refused.json()["error"]["code"] == "server_shutting_down"

    asyncio.run(stream_then_signal())
    assert json.loads(events[-1])["error"]["code"] == "server_shutting_down" and "[DONE]" not in events
    assert GRACE_S - 0.5 < time.monotonic() - signalled[0] < GRACE_S + 10  # cut at the deadline, not before
    assert server["proc"].wait(timeout=60) == 0
    assert "swiftserve stopped" in server["log"].read_text()
    # the cut turn was never committed: the record still holds the first turn only
    record = asyncio.run(RedisSessionStore(server["redis"].url, prefix="swiftserve").get("ops/drain"))
    assert record.turns == 1 and record.messages_consumed == 2


def dashboard_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("dashboard", ROOT / "k8s" / "grafana" / "dashboard.py")
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look it up there
    spec.loader.exec_module(module)
    return module


def test_dashboard_json_and_configmap_are_generated_from_the_panels():
    dash = dashboard_module()
    text = dash.JSON_PATH.read_text()
    assert json.loads(text) == dash.dashboard()
    assert yaml.safe_load(dash.CONFIGMAP_PATH.read_text()) == dash.configmap(text)
    assert dash.PNG_PATH.is_file()
