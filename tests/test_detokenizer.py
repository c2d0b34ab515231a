"""DecodeStream detokenization gives exactly the text deltas of the re-decoding detokenizer it replaced,
on byte-level, merged byte-level BPE and byte-fallback tokenizers, multi-byte characters and stop strings."""
import json
from types import SimpleNamespace

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from swift_engine.models.tiny import build_byte_tokenizer
from swift_engine.tokenizer import IncrementalDetokenizer, StopStringMatcher

CORPUS = ["héllo wörld, 世界 🙂 🙂🙂 naïve café — 日本語のテキスト", "streaming chat: 你好, 👋🏽 emoji 🚀 and ascii text",
          "the quick brown fox jumps over the lazy dog. 世界 again, and 🙂!"] * 20
TEXTS = ["héllo 世界 🙂!", "👋🏽 family 👨‍👩‍👧 flags 🇯🇵 and 日本語のテキスト", "plain ascii, then 你好",
         "ends on an emoji 🚀"]


class ReDecoding:
    """The detokenizer this project had before DecodeStream (the reference): re-decodes a window."""

    def __init__(self, hf):
        self.hf, self.ids, self.prefix_offset, self.read_offset = hf, [], 0, 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self.hf.decode(self.ids[self.prefix_offset:self.read_offset], skip_special_tokens=True)
        now = self.hf.decode(self.ids[self.prefix_offset:], skip_special_tokens=True)
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return now[len(before):]
        return ""


def merged_byte_level() -> PreTrainedTokenizerFast:
    """GPT-2 style: byte-level BPE whose merges cover some multi-byte characters and not others."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel
                                                        .alphabet(), special_tokens=["<|end|>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|end|>", clean_up_tokenization_spaces=False)


def byte_fallback() -> PreTrainedTokenizerFast:
    """Llama-2 / SentencePiece style: metaspace pieces, rare characters as <0xNN> byte tokens."""
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.pre_tokenizer = pre_tokenizers.Metaspace()
    trained.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "</s>"],
                                                            limit_alphabet=40))
    spec = json.loads(trained.model.__getstate__())  # vocab and merges, to add the byte tokens to the model
    vocab = spec["vocab"] | {f"<0x{b:02X}>": len(spec["vocab"]) + b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab, [tuple(m) for m in spec["merges"]], unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(["<unk>", "</s>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>",
                                   clean_up_tokenization_spaces=False)


TOKENIZERS = {"byte": build_byte_tokenizer, "bpe": merged_byte_level, "byte-fallback": byte_fallback}


@pytest.fixture(scope="module", params=list(TOKENIZERS))
def hf(request):
    return TOKENIZERS[request.param]()


def deltas(detok, ids):
    return [detok.push(t) for t in ids]


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_equal_the_re_decoding_detokenizer_and_the_full_text(hf, text):
    ids = hf.encode(text, add_special_tokens=False)
    ours = deltas(IncrementalDetokenizer(SimpleNamespace(hf=hf)), ids)
    assert ours == deltas(ReDecoding(hf), ids)
    assert "".join(ours) == hf.decode(ids, skip_special_tokens=True)
    assert not any("\ufffd" in d for d in ours)


def test_characters_split_across_tokens_are_held_back_until_complete(hf):
    ids = hf.encode("👨‍👩‍👧", add_special_tokens=False)  # 18 bytes, rare in the corpus: several tokens a character
    out = deltas(IncrementalDetokenizer(SimpleNamespace(hf=hf)), ids)
    assert "".join(out).strip() == "👨‍👩‍👧" and out.count("") >= 3


@pytest.mark.parametrize("stop", ["世界", "🙂", "ll", "界 🙂!", "no such stop"])
def test_stop_strings_cut_the_same_text(hf, stop):
    text = TEXTS[0] + " " + TEXTS[1]
    ids = hf.encode(text, add_special_tokens=False)

    def run(detok):
        matcher, out = StopStringMatcher([stop]), []
        for t in ids:
            piece, stopped = matcher.feed(detok.push(t))
            out.append(piece)
            if stopped:
                return out, True
        return out + [matcher.flush()], False
    ours = run(IncrementalDetokenizer(SimpleNamespace(hf=hf)))
    assert ours == run(ReDecoding(hf))
    full = hf.decode(ids, skip_special_tokens=True)
    assert "".join(ours[0]) == (full[:full.index(stop)] if stop in full else full)


def test_special_tokens_are_skipped(hf):
    eos = hf.convert_tokens_to_ids(hf.eos_token)
    ids = hf.encode("ab", add_special_tokens=False) + [eos] + hf.encode("c", add_special_tokens=False)
    text = "".join(deltas(IncrementalDetokenizer(SimpleNamespace(hf=hf)), ids))
    assert text == hf.decode(ids, skip_special_tokens=True) and text.replace(" ", "") == "abc"
