"""Tokenizer, incremental chat-template rendering and incremental detokenisation."""
from __future__ import annotations

import itertools
import json
import re
from functools import cache
from pathlib import Path

from .errors import InvalidRequestError

# Stand-in history used to render only the new messages of a running session.
_PREFIX = [{"role": "user", "content": "swiftserve-prefix-user"},
           {"role": "assistant", "content": "swiftserve-prefix-reply"}]


class ChatTokenizer:
    """Wraps a Hugging Face tokenizer with what a streaming session needs."""

    def __init__(self, model_dir: Path):
        from transformers import AutoTokenizer

        self.hf = AutoTokenizer.from_pretrained(str(model_dir))
        self.eos_token_ids = self._eos_ids(model_dir)
        self.end_of_turn_id = min(self.eos_token_ids)

    def _eos_ids(self, model_dir: Path) -> set[int]:
        ids: set[int] = set()
        gen = model_dir / "generation_config.json"
        if gen.exists():
            eos = json.loads(gen.read_text()).get("eos_token_id")
            ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.hf.eos_token_id is not None:
            ids.add(self.hf.eos_token_id)
        if not ids:
            raise ValueError(f"{model_dir}: no eos_token_id in generation_config.json or tokenizer")
        return ids

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=True)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (OpenAI's logprobs `bytes`; a piece of a multi-byte character
        is its bytes alone): byte-level BPE pieces map back through GPT-2's byte alphabet, byte-fallback
        pieces `<0xNN>` are that byte, other pieces are their text."""
        piece = self.hf.convert_ids_to_tokens(token_id) or ""
        byte = _BYTE_FALLBACK.fullmatch(piece)
        if byte:
            return bytes([int(byte.group(1), 16)])
        alphabet = _byte_alphabet()
        if type(self.hf.backend_tokenizer.decoder).__name__ == "ByteLevel" and all(c in alphabet for c in piece):
            return bytes(alphabet[c] for c in piece)
        return self.hf.convert_tokens_to_string([piece]).encode()

    def render_messages(self, messages: list[dict], first_turn: bool) -> list[int]:
        """Token ids for `messages` plus the generation prompt.

        A session's first turn renders the template from its start (BOS, default
        system prompt). Later turns render only the new messages: the template is
        applied after a stand-in history and cut right after that history's
        end-of-turn token, which is where the session's cache already ends.
        """
        _check_messages(messages)
        try:
            if first_turn:
                return self.encode(self._render(messages))
            full = self._render(_PREFIX + messages)
        except InvalidRequestError:
            raise
        except Exception as exc:  # jinja raise_exception and template errors
            raise InvalidRequestError(f"chat template rejected the messages: {exc}") from exc
        cut = full.index(_PREFIX[-1]["content"]) + len(_PREFIX[-1]["content"])
        eot = self.hf.convert_ids_to_tokens(self.end_of_turn_id)
        at = full.find(eot, cut)
        return self.encode(full[at + len(eot):] if at >= 0 else full[cut:])

    def pinned_prefix(self, messages: list[dict], ids: list[int]) -> int:
        """How many leading ids of a first turn's `ids` render its leading system message(s), BOS
        included: what the template produces before the first user turn. 0 without a system message."""
        system = list(itertools.takewhile(lambda m: m["role"] == "system", messages))
        if not system:
            return 0
        try:
            head = self.encode(self.hf.apply_chat_template(system, add_generation_prompt=False, tokenize=False))
        except Exception:  # a template that insists on a user turn: nothing is pinned beyond the sinks
            return 0
        return next((i for i, (a, b) in enumerate(zip(head, ids)) if a != b), min(len(head), len(ids)))

    def _render(self, messages: list[dict]) -> str:
        return self.hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@cache
def _byte_alphabet() -> dict[str, int]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {c: b for b, c in bytes_to_unicode().items()}


def _check_messages(messages: list[dict]) -> None:
    if not messages:
        raise InvalidRequestError("messages must not be empty")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise InvalidRequestError(f"messages[{i}] must have string 'role' and 'content'")


class IncrementalDetokenizer:
    """Turns a token stream into text deltas with the tokenizers library's DecodeStream, which holds
    back the bytes of a split multi-byte character (about 1 us a token against 50 us for re-decoding
    a window through transformers)."""

    def __init__(self, tokenizer: ChatTokenizer):
        from tokenizers.decoders import DecodeStream

        self.backend = tokenizer.hf.backend_tokenizer
        self.stream = DecodeStream(skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        return self.stream.step(self.backend, token_id) or ""


class StopStringMatcher:
    """Finds stop strings in streamed text; holds back a tail that may start one."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.text = ""
        self.emitted = 0

    def feed(self, delta: str) -> tuple[str, bool]:
        """Returns (text safe to emit now, stopped)."""
        self.text += delta
        for s in self.stops:
            at = self.text.find(s, self.emitted)
            if at >= 0:
                out = self.text[self.emitted:at]
                self.text = self.text[:at]
                self.emitted = at
                return out, True
        hold = max((_overlap(self.text, s) for s in self.stops), default=0)
        out = self.text[self.emitted:len(self.text) - hold]
        self.emitted = len(self.text) - hold
        return out, False

    def flush(self) -> str:
        out, self.emitted = self.text[self.emitted:], len(self.text)
        return out


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of stop."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0
