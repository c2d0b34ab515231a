"""The perplexity harness (`swiftserve eval ppl`), checked mode by mode against direct computations
on tiny random models, plus the corpus helpers and the training recipe (CPU, seconds)."""
import json
import math

import pytest
import torch

from swift_engine.eval import ppl
from swift_engine.eval.ppl import Run
from swift_engine.layers.reference import reference_logits
from swift_engine.models.loader import load_model
from tests.model_configs import save_hf_checkpoint

VOCAB = 97


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    hf = save_hf_checkpoint("llama", path, seed=3)
    return hf, load_model(path, progress=False)


def random_ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def gather(logits: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """log p(ids[t] | row t - 1) for t = 1..n-1 from logits rows 0..n-2."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    return lp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].double()


def hf_dense(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_dense_mode_equals_hf_forward(pair, chunk):
    hf, ours = pair
    ids = random_ids(45, 1)
    want = gather(hf_dense(hf, ids), ids)
    got = ppl.score_dense(ours, ids, max_tokens=len(ids), chunk=chunk)
    assert (got - want).abs().max() <= 1e-4
    cut = ppl.score_dense(ours, ids, max_tokens=20, chunk=chunk)  # stops at max_tokens: NaN past it
    assert (cut[:19] - want[:19]).abs().max() <= 1e-4 and torch.isnan(cut[19:]).all()


@pytest.mark.parametrize("stride", [1, 3])
def test_recompute_mode_equals_dense_forward_over_the_window(pair, stride):
    hf, ours = pair
    ids, C = random_ids(40, 2), 9
    got = ppl.score_recompute(ours, ids, C, stride=stride, batch=4)
    for t in range(1, len(ids)):
        ctx = ids[max(0, t - C):t]
        if t > C and t % stride:
            assert math.isnan(got[t - 1])
            continue
        want = torch.log_softmax(hf_dense(hf, ctx + [ids[t]])[len(ctx) - 1], -1)[ids[t]].item()
        assert abs(got[t - 1].item() - want) <= 1e-4, t


@pytest.mark.parametrize("chunk", [1, 5, 16])
def test_streaming_mode_equals_reference(pair, chunk):
    _, ours = pair
    ids, S, W = random_ids(60, 3), 2, 10
    want = gather(reference_logits(ours, ids, S, W), ids)
    [res] = ppl.evaluate(ours, ids, [Run("streaming", S + W, S)], chunk=chunk, progress=False)
    assert (res.logprobs - want).abs().max() <= 1e-4
    assert not torch.isnan(res.logprobs).any()


def test_window_mode_equals_streaming_without_sinks(pair):
    _, ours = pair
    ids, C = random_ids(50, 4), 12
    window, recompute = ppl.evaluate(ours, ids, [Run("window", C), Run("recompute", C)], chunk=7, progress=False)
    assert (window.logprobs - ppl.score_streaming(ours, ids, 0, C, chunk=3)).abs().max() <= 1e-5
    assert (window.logprobs - gather(reference_logits(ours, ids, 0, C), ids)).abs().max() <= 1e-4
    # before any eviction every mode is the dense forward; after it, window and recompute differ
    assert (window.logprobs[:C] - recompute.logprobs[:C]).abs().max() <= 1e-4
    assert (window.logprobs[C + 2:] - recompute.logprobs[C + 2:]).abs().max() > 1e-3


def test_run_specs_and_defaults():
    assert Run.parse("streaming:4+252") == Run("streaming", 256, 4)
    assert Run.parse("streaming:0+256") == Run("window", 256)
    assert Run.parse("recompute:128").label == "recompute 128"
    with pytest.raises(ValueError):
        Run.parse("sinks:4")
    runs = ppl.build_runs(list(ppl.MODES), [64, 128], 4, [0, 1, 4], 512, ["dense:1024"])
    labels = [r.label for r in runs]
    assert labels[:2] == ["dense <= 1024", "dense <= 512"]
    assert labels.count("streaming 4+60") == 1 and labels.count("window 0+64") == 1
    assert "streaming 1+127" in labels and len(labels) == len(set(labels)) == 2 + 2 * 4


def test_cli_writes_table_json_and_plot(tmp_path, capsys):
    from deployments.cli import main as cli_main
    from swift_engine.models.tiny import write_tiny_checkpoint

    model = write_tiny_checkpoint(tmp_path / "tiny")
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 4)
    cli_main(["eval", "ppl", "--model", str(model), "--text", str(text), "--max-tokens", "150", "--cache", "24",
              "--sinks", "2", "--sink-sweep", "1", "--pinned", "8", "--dense-tokens", "100", "--recompute-stride", "5", "--chunk", "16",
              "--bucket", "50", "--out", str(tmp_path / "out"), "--name", "t", "--quiet", "--probe-sinks"])
    report = json.loads((tmp_path / "out" / "t.json").read_text())
    assert (tmp_path / "out" / "t.png").stat().st_size > 1000
    rows = {r["label"]: r for r in report["runs"]}
    assert set(rows) == {"dense <= 100", "window 0+24", "recompute 24", "streaming 2+22", "streaming 1+23",
                         "pinned 8+16"}
    assert report["tokens"] == 150 and rows["streaming 2+22"]["scored_tokens"] == 149
    assert rows["dense <= 100"]["scored_tokens"] == 99
    assert rows["recompute 24"]["scored_tokens"] == 24 + len(range(25, 150, 5))
    assert all(math.isfinite(r["ppl"]) and r["ppl"] > 1 for r in rows.values())
    assert rows["streaming 2+22"]["curve"]["tokens_seen"] == [50, 100, 149]
    assert rows["dense <= 100"]["curve"]["tokens_seen"] == [50, 99]
    vr = rows["streaming 2+22"]["vs_recompute"]
    assert vr["recompute"] == "recompute 24" and vr["bucket"] == 100 and vr["tokens_seen"] == [100, 145]
    assert rows["dense <= 100"]["vs_recompute"] is None and rows["recompute 24"]["vs_recompute"] is None
    out = capsys.readouterr().out
    assert "PPL@recompute_24" in out and "streaming 2+22" in out
    probe = report["first_token_attention"]
    assert len(probe["per_head"]) == 2 and len(probe["per_head"][0]) == 4 and probe["length"] == 150


def test_first_token_probe_is_the_dense_forward(pair):
    _, ours = pair
    ids = random_ids(64, 5)
    attn = ppl._ProbeAttention(ours, 32, 16)
    x = torch.tensor(ids[:32])
    with torch.no_grad():
        got, want = ours(x, attn), ours(x, ppl.DenseAttention(ours, 32))
    assert (got - want).abs().max() <= 1e-4 and len(attn.on_first) == 2
    probe = ppl.first_token_attention(ours, ids, 32, segments=3)
    assert probe["segments"] == 2 and all(0 < v < 1 for v in probe["per_layer_mean"])
    assert abs(probe["uniform"] - sum(1 / (q + 1) for q in range(16, 32)) / 16) < 1e-4


def test_corpus_helpers(tmp_path):
    from benchmarks import corpus

    raw = "Ge1:1 In the beginning.\nGe1:2 And the earth.\nGe2:1 Thus the heavens.\n1Tim1:1 Paul, an apostle.\n"
    books = corpus.format_bible(raw)
    assert set(books) == {"bible/Genesis", "bible/1 Timothy"}
    assert books["bible/Genesis"].startswith("GENESIS\n\nGenesis 1\n\n1 In the beginning.\n2 And the earth.")
    assert "Genesis 2\n\n1 Thus the heavens." in books["bible/Genesis"]
    assert corpus.clean("a  \r\n\n\n\n\n\nb\x07\tc") == "a\n\n\nb    c\n"
    held = [n for n in (f"doc{i}" for i in range(1000)) if corpus.is_heldout(n, 3)]
    assert 10 < len(held) < 60 and held == [n for n in (f"doc{i}" for i in range(1000)) if corpus.is_heldout(n, 3)]
    tok = corpus.train_tokenizer(["hello world, the quick brown fox " * 20] * 5, vocab_size=300)
    assert tok.bos_token == "<|bos|>" and tok.convert_tokens_to_ids("<|bos|>") == 0
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert rendered == "<|bos|><|user|>hi<|end|><|assistant|>"
    assert tok.decode(tok.encode("hello world", add_special_tokens=False)) == "hello world"


def test_training_recipe_writes_a_checkpoint_the_engine_and_hf_load(tmp_path):
    import numpy as np
    from transformers import LlamaForCausalLM

    from benchmarks import corpus
    from benchmarks import train_reference as train
    from swift_engine.tokenizer import ChatTokenizer

    data = tmp_path / "corpus"
    texts = ["In the beginning God created the heaven and the earth. " * 30,
             "def main(argv): return parse(argv) if argv else None\n" * 30]
    tok = corpus.train_tokenizer(texts, vocab_size=320)
    tok.save_pretrained(str(data / "tokenizer"))
    corpus.encode_all(tok, texts * 3).tofile(data / "train.bin")
    corpus.encode_all(tok, texts[:1]).tofile(data / "heldout.bin")
    out = tmp_path / "model"
    log = train.main(["--data", str(data), "--out", str(out), "--preset", "test", "--context", "32", "--batch", "4",
                      "--micro-batch", "2", "--steps", "4", "--warmup", "2", "--eval-every", "4", "--eval-batch", "2",
                      "--device", "cpu", "--amp", "off"])
    assert log["steps"] == 4 and len(log["eval"]) == 1 and math.isfinite(log["eval"][0]["heldout_loss"])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["max_position_embeddings"] == 32 and cfg["bos_token_id"] == 0 and cfg["tie_word_embeddings"]
    ours = load_model(out, progress=False)
    hf = LlamaForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ids = [0] + ChatTokenizer(out).encode("In the beginning God created")
    want = gather(hf_dense(hf, ids), ids)
    assert (ppl.score_dense(ours, ids, len(ids)) - want).abs().max() <= 1e-4
    assert (ppl.score_streaming(ours, ids, 1, 4, chunk=3)[:4] - want[:4]).abs().max() <= 1e-4
    assert np.fromfile(data / "train.bin", dtype=np.uint16).max() < cfg["vocab_size"]


def test_pinned_mode_equals_the_reference_with_N_sinks(pair):
    """Pinning the stream's first N tokens (the served path: pinned_tokens) is N sinks, exactly."""
    _, ours = pair
    ids = random_ids(70, 4)
    [res] = ppl.evaluate(ours, ids, [Run.parse("pinned:20+12")], chunk=16, progress=False)
    assert res.run.label == "pinned 20+12"
    assert (res.logprobs - gather(reference_logits(ours, ids, 20, 12), ids)).abs().max() <= 1e-4
