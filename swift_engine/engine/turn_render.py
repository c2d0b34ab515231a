"""A chat turn's prompt: the new messages checked against the session's history and rendered to ids.

Rendering (the history check hashes every consumed message; the chat template; tokenization) costs
what the conversation's history does, and the engine process is where every session's step waits.
So StreamingEngine renders a turn in the front end, against the session's state as the engine last
reported it (`TurnState`, from the snapshot sent when the session's last request ended); the engine
only checks that state is still the session's and renders again itself in the rare case it is not.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import HistoryMismatchError
from ..outputs import SessionSnapshot
from ..tokenizer import ChatTokenizer
from .session import Session, chain_digest


@dataclass(frozen=True)
class TurnState:
    """What rendering a turn depends on: the messages the session consumed, and how its last turn ended."""
    consumed: int
    digest: str
    first_turn: bool
    open_turn: bool

    @classmethod
    def of(cls, session: Session | None) -> "TurnState":
        if session is None:  # a new session
            return cls(0, "", True, False)
        return cls(session.messages_consumed, session.messages_digest, session.tokens_seen == 0, session.open_turn)

    @classmethod
    def of_snapshot(cls, snap: SessionSnapshot | None) -> "TurnState":
        """The same, read from a session's snapshot (the front end's copy of an idle session)."""
        if snap is None:
            return cls.of(None)
        return cls(snap.messages_consumed, snap.messages_digest, snap.tokens_seen == 0, snap.open_turn)


@dataclass(frozen=True)
class RenderedTurn:
    state: TurnState
    ids: list[int]
    new_messages: list[dict]
    pinned: int | None  # a first turn's pinned prefix (ChatTokenizer.pinned_prefix), when pin="system"


def render_turn(tokenizer: ChatTokenizer, state: TurnState, session_id: str, messages: list[dict],
                pin: str) -> RenderedTurn:
    """Raises HistoryMismatchError if `messages` do not extend the consumed ones, InvalidRequestError if the
    template rejects them."""
    n = state.consumed
    if len(messages) <= n or chain_digest("", messages[:n]) != state.digest:
        raise HistoryMismatchError(
            f"session {session_id!r} has consumed {n} messages; the request's {len(messages)} "
            "messages do not extend them (send the full history, unchanged, plus new messages)")
    new = messages[n:]
    ids = tokenizer.render_messages(new, first_turn=state.first_turn)
    if state.open_turn:
        ids = [tokenizer.end_of_turn_id] + ids
    pinned = tokenizer.pinned_prefix(messages, ids) if pin == "system" and state.first_turn else None
    return RenderedTurn(state, ids, new, pinned)
