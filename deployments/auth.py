"""API keys: bearer tokens mapped to tenants, kept and compared only as SHA-256 digests.

Key list format (the value of `api_keys_env`, or the file `api_keys_file`):
entries `tenant:key` separated by whitespace, newlines or commas; lines that
start with `#` are comments. `tenant` is 1-32 of `A-Z a-z 0-9 . _ -` (starting
with a letter or digit); several keys may share a tenant (rotation). `key` is
either the key itself (at least 16 printable ASCII characters, no commas) or
`sha256:<64 hex digits>`, its digest, so the list need not hold the key.

    python -m deployments.auth TENANT     # a new random key and its hashed entry
"""
from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import sys
from pathlib import Path

TENANT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,31}")
MIN_KEY_CHARS = 16
HASHED = "sha256:"
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")


class KeyListError(ValueError):
    """A malformed or missing API key list; the message never holds a key."""


def digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "replace")).digest()


def parse_keys(text: str, source: str) -> list[tuple[bytes, str]]:
    """(key digest, tenant) for each entry of a key list; `source` names it in errors."""
    words = [w for line in text.splitlines() if not line.lstrip().startswith("#")
             for w in re.split(r"[\s,]+", line) if w]
    entries: list[tuple[bytes, str]] = []
    for n, word in enumerate(words, 1):
        tenant, sep, key = word.partition(":")
        if not sep or not TENANT_RE.fullmatch(tenant):
            raise KeyListError(f"{source}: entry {n} is not `tenant:key` with a tenant name of 1-32 "
                               "characters A-Z a-z 0-9 . _ -")
        if key.startswith(HASHED):
            if not _HEX64.fullmatch(key[len(HASHED):]):
                raise KeyListError(f"{source}: entry {n} ({tenant}): sha256: needs 64 hex digits")
            entries.append((bytes.fromhex(key[len(HASHED):]), tenant))
        elif len(key) < MIN_KEY_CHARS or not (key.isascii() and key.isprintable()):
            raise KeyListError(f"{source}: entry {n} ({tenant}): keys are at least {MIN_KEY_CHARS} "
                               "printable ASCII characters")
        else:
            entries.append((digest(key), tenant))
    if len({d for d, _ in entries}) != len(entries):
        raise KeyListError(f"{source}: the same key is listed twice")
    return entries


def bearer_token(authorization: str | None) -> str | None:
    scheme, _, token = (authorization or "").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


class KeyRing:
    """The accepted API keys (as digests) and the tenant each belongs to."""

    def __init__(self, entries: list[tuple[bytes, str]]):
        if not entries:
            raise KeyListError("API keys are configured but the key list is empty")
        self._entries = entries

    @classmethod
    def from_args(cls, env: str | None, file: str | None) -> KeyRing | None:
        """The keys named by `api_keys_env` / `api_keys_file`; None when neither is set (no auth)."""
        if env is None and file is None:
            return None
        entries = []
        if env is not None:
            if not os.environ.get(env):
                raise KeyListError(f"api_keys_env: environment variable {env} is not set or empty")
            entries += parse_keys(os.environ[env], f"${env}")
        if file is not None:
            try:
                text = Path(file).read_text()
            except OSError as exc:
                raise KeyListError(f"api_keys_file: cannot read {file}: {exc.strerror}") from None
            entries += parse_keys(text, file)
        return cls(entries)

    def tenant(self, authorization: str | None) -> str | None:
        """The tenant of the bearer token in an Authorization header, None if it is no valid key.

        Every stored digest is compared (hmac.compare_digest), so the time taken
        does not depend on which key matched or on how much of a key was right.
        """
        token = bearer_token(authorization)
        if token is None:
            return None
        presented, found = digest(token), None
        for stored, tenant in self._entries:
            if hmac.compare_digest(presented, stored) and found is None:
                found = tenant
        return found


def scoped_session_id(tenant: str, session_id: str) -> str:
    """The session id the servers and the store use: `tenant/id`; the id itself without auth (tenant "").

    Tenant names contain no `/`, so the first `/` splits the two unambiguously.
    """
    return f"{tenant}/{session_id}" if tenant else session_id


def _new_key(tenant: str) -> None:
    if not TENANT_RE.fullmatch(tenant):
        sys.exit("tenant names are 1-32 characters A-Z a-z 0-9 . _ - (starting with a letter or digit)")
    key = "sk-" + secrets.token_urlsafe(32)
    print(f"key (give it to the client):   {key}")
    print(f"entry (put it in the key list): {tenant}:{HASHED}{hashlib.sha256(key.encode()).hexdigest()}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m deployments.auth TENANT")
    _new_key(sys.argv[1])
