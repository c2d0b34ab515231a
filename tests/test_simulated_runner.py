"""load_format: simulated (engine/simulated_runner.py): the measured step times, the typed config, and a
real engine (scheduler, pages, sampler, detokenizer) over the stand-in runner."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from swift_engine import EngineConfig, SamplingParams, StreamingEngine
from swift_engine.engine.core import EngineCore
from swift_engine.engine.request import Request
from swift_engine.models.loader import load_engine_model, resolve_model_dir
from swift_engine.models.step_table import Curve, load_step_table, table_path
from swift_engine.tokenizer import ChatTokenizer

ROOT = Path(__file__).resolve().parents[1]


def sim_config(**kw) -> EngineConfig:
    return EngineConfig(**{"model": "tiny", "load_format": "simulated", "window_tokens": 124, "num_pages": 64,
                           "dtype": "bfloat16", **kw})


def test_curve_is_linear_between_points_and_extends_past_them():
    c = Curve(x=[1, 2, 4], ms=[5.0, 6.0, 10.0])
    assert c.at(1) == 5.0 and c.at(3) == 8.0 and c.at(4) == 10.0
    assert c.at(8) == 18.0 and c.at(0) == 4.0  # the nearest segment, extended


def test_the_8b_table_steps():
    t = load_step_table("llama3-8b-h200")
    assert t.hf_config["vocab_size"] == 128256 and t.cache_tokens == 2048 and "H200" in t.gpu
    assert t.step_ms(1, 0) == t.decode.ms[0] and t.step_ms(0, 0) == t.decode.ms[0]
    assert t.step_ms(32, 0) == t.decode.ms[t.decode.x.index(32)]
    assert t.decode.at(16) < t.step_ms(24, 0) < t.decode.at(32)
    assert t.step_ms(32, 512) == pytest.approx(t.decode.at(32) + t.prefill.at(512) - t.prefill.at(1))


def test_the_table_is_what_the_build_script_makes_of_the_h200_results(tmp_path):
    out = tmp_path / "t.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "build_step_table.py"), "--out", str(out)],
                   check=True, capture_output=True)
    assert json.loads(out.read_text()) == json.loads(table_path("llama3-8b-h200").read_text())


@pytest.mark.parametrize("bad, field", [({"simulated": {"step_table": "llama3-8b-tpu"}}, "simulated.step_table"),
                                        ({"simulated": {"vocab": 4096}}, "simulated.vocab"),
                                        ({"tensor_parallel_size": 2}, "load_format"),
                                        ({"host_cache_bytes": "1GiB"}, "load_format")])
def test_bad_simulated_configs_name_the_field(bad, field):
    with pytest.raises(ValidationError, match=field.replace(".", r"\.")):
        sim_config(**bad)


def core_of(config: EngineConfig) -> EngineCore:
    return EngineCore(config, load_engine_model(config), ChatTokenizer(resolve_model_dir(config.model)))


def run_turn(core: EngineCore, sid: str, prompt: list[int], **sampling) -> list:
    events = []
    core.submit(Request(f"r-{sid}-{len(prompt)}", sid, "generate", prompt, emit=events.append,
                        sampling=SamplingParams(**sampling)))
    while core.has_work():
        core.step()
    return events


def test_the_core_over_the_simulator_has_the_real_vocab_no_kv_bytes_and_sleeps_the_table():
    core = core_of(sim_config())
    runner = core.runner.sim
    assert core.cache.k.device.type == "meta"  # pages counted, never allocated
    assert core.vocab_size == 128256 and runner.rows.shape == (32, 128256)
    events = run_turn(core, "s", [1, 2, 3], max_tokens=12, temperature=1.0, top_p=0.9, seed=1)
    assert events[-1].usage.completion_tokens == 12
    assert all(ev.token_id < 264 for ev in events if ev.token_id is not None)  # the tokenizer's ids only
    steps = runner.stats["steps"]
    assert steps >= 12 and runner.stats["slept_s"] >= steps * runner.table.decode.ms[0] / 1e3 * 0.99


def test_the_sampler_never_writes_the_shared_logit_rows():
    core = core_of(sim_config(simulated={"vocab_size": 4096}))
    before = core.runner.sim.rows.clone()
    run_turn(core, "s", [1, 2, 3], max_tokens=4, temperature=0.7, top_k=5, repetition_penalty=1.3)
    assert torch.equal(before, core.runner.sim.rows)


def test_a_narrower_vocab_than_the_tokenizer_is_refused():
    with pytest.raises(ValueError, match=r"simulated\.vocab_size"):
        core_of(sim_config(simulated={"vocab_size": 100}))


def test_a_streaming_engine_chats_over_the_simulator():
    engine = StreamingEngine(sim_config(), progress=False)
    try:
        history = [{"role": "user", "content": "hello"}]
        for turn in range(2):
            events = engine.generate_sync("s", messages=history, sampling={"max_tokens": 8, "ignore_eos": True})
            assert events[-1].usage.completion_tokens == 8
            history += [{"role": "assistant", "content": "".join(e.text for e in events)},
                        {"role": "user", "content": f"turn {turn + 1}"}]
    finally:
        engine.shutdown()
