"""`swiftserve chat --url`: the chat loop's backend for a running server, through the openai client.
Every failure becomes one line (ChatError) that says what to do."""
from __future__ import annotations

import difflib
from collections.abc import Iterator
from contextlib import contextmanager

import openai

from swift_engine import ChatError


def api_base(url: str) -> str:
    """Accept the server's root or its /v1 (what `swiftserve serve` prints)."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


class ServerChat:
    def __init__(self, url: str, api_key: str | None, session: str, model: str | None,
                 max_tokens: int | None, temperature: float | None):
        self.base = api_base(url)
        self.client = openai.OpenAI(base_url=self.base, api_key=api_key or "none", max_retries=0, timeout=600)
        self.session = session
        # what the user set; the rest is the server's default for the model (`sampling_defaults` on /v1/models)
        self.sampling = {k: v for k, v in (("max_tokens", max_tokens), ("temperature", temperature)) if v is not None}
        with self._errors():
            listed = self.client.models.list().data
        served = [m.id for m in listed]
        if model is not None and model not in served:
            near = difflib.get_close_matches(model, served, n=1)
            hint = f"; did you mean {near[0]}?" if near else ""
            raise ChatError(f"model {model!r} is not served at {self.base}{hint} (it serves {', '.join(served)})")
        self.model = model or served[0]
        self.defaults = next((m.model_extra or {} for m in listed if m.id == self.model), {}).get("sampling_defaults")

    def describe(self) -> str:
        sampling = {**(self.defaults or {}), **self.sampling}
        temperature = sampling.get("temperature")
        how = "" if temperature is None else ", greedy" if temperature == 0 else f", temperature {temperature:g}"
        return f"{self.model} at {self.base}{how}"

    def reply(self, history: list[dict]) -> Iterator[str]:
        with self._errors():
            stream = self.client.chat.completions.create(
                model=self.model, messages=history, stream=True, extra_headers={"x-session-id": self.session},
                **self.sampling)
            try:  # closing the stream early (Ctrl-C) cancels the turn on the server: it is not committed
                for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content:
                        yield chunk.choices[0].delta.content
            finally:
                stream.close()

    @contextmanager
    def _errors(self):
        try:
            yield
        except openai.APIConnectionError:
            raise ChatError(f"cannot connect to {self.base}: is `swiftserve serve` running there?") from None
        except openai.AuthenticationError:
            raise ChatError(f"{self.base} refused the API key (401): pass --api-key or set OPENAI_API_KEY") from None
        except openai.NotFoundError as exc:
            raise ChatError(f"not found (404) at {self.base}: {_message(exc)}") from None
        except openai.ConflictError as exc:
            raise ChatError(f"conflict (409): {_message(exc)}; start a new session (no --session)") from None
        except openai.APIStatusError as exc:
            raise ChatError(f"the server answered {exc.status_code}: {_message(exc)}") from None
        except openai.APIError as exc:  # an error event in the middle of a stream
            raise ChatError(f"the turn failed: {exc.message}") from None


def _message(exc: openai.APIStatusError) -> str:
    body = exc.body if isinstance(exc.body, dict) else {}
    return str(body.get("message") or exc.message).splitlines()[0]
