"""How a store URL names a Redis: one server (redis://, rediss://) or a primary found through Sentinel.

``redis+sentinel://[user:password@]host1:26379,host2:26379/<service>/<db>`` (``rediss+sentinel://`` for
TLS) asks the Sentinels for the current primary of ``<service>`` on every new connection, so a client
follows a failover: connections to a demoted or dead primary fail (StoreUnavailableError for the caller's
backoff) and the next one goes to the promoted replica. The password authenticates to the Sentinels too
(give them the same ``requirepass``, as k8s/redis-sentinel does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.sentinel import Sentinel

PLAIN_SCHEMES = ("redis", "rediss")
SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
DEFAULT_SENTINEL_PORT = 26379


@dataclass(frozen=True)
class SentinelTarget:
    """A parsed ``redis+sentinel://`` URL."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int
    tls: bool
    username: str | None
    password: str | None


def is_sentinel_url(url: str) -> bool:
    return urlsplit(url).scheme in SENTINEL_SCHEMES


def parse_sentinel_url(url: str) -> SentinelTarget:
    """Parse ``redis+sentinel://[user:password@]h1:p1,h2:p2/<service>[/<db>]``; ValueError names what is wrong
    (never the password)."""
    parts = urlsplit(url)
    if parts.scheme not in SENTINEL_SCHEMES:
        raise ValueError(f"a Sentinel URL starts with redis+sentinel:// or rediss+sentinel://, "
                         f"not {parts.scheme!r}://")
    userinfo, _, hosts = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    sentinels = tuple(_host_port(h) for h in hosts.split(","))
    path = [p for p in parts.path.split("/") if p]
    if not 1 <= len(path) <= 2:
        raise ValueError("a Sentinel URL's path is /<service name>[/<db>], e.g. /mymaster/0")
    db = path[1] if len(path) == 2 else "0"
    if not db.isdigit():
        raise ValueError(f"the database in a Sentinel URL is a number, not {db!r}")
    return SentinelTarget(sentinels, unquote(path[0]), int(db), parts.scheme.startswith("rediss"),
                          unquote(user) or None, unquote(password) or None)


def _host_port(text: str) -> tuple[str, int]:
    try:
        parts = urlsplit(f"//{text}")
        host, port = parts.hostname, parts.port or DEFAULT_SENTINEL_PORT
    except ValueError:  # a port that is not a number, or out of range
        host = None
    if not host or parts.path or parts.username is not None:
        raise ValueError(f"a Sentinel address is host[:port], got {text!r}")
    return host, port


def connect(url: str, password: str | None, **options: Any) -> tuple[aioredis.Redis, Sentinel | None]:
    """An asyncio client for ``url`` (``password`` overrides the URL's), and the Sentinel behind it, if any
    (the caller closes both). ``options`` are redis-py connection options (timeouts, retry)."""
    if not is_sentinel_url(url):
        return aioredis.Redis.from_url(url, password=password, **options), None
    target = parse_sentinel_url(url)
    auth = {"username": target.username, "password": password or target.password}
    tls = {"ssl": True} if target.tls else {}
    sentinel_options = {k: v for k, v in options.items() if k.startswith("socket_")}
    sentinel = Sentinel(list(target.sentinels), sentinel_kwargs={**sentinel_options, **auth, **tls})
    client = sentinel.master_for(target.service, db=target.db, **auth, **tls, **options)
    return client, sentinel


def describe(url: str) -> str:
    """The URL without credentials, for messages."""
    parts = urlsplit(url)
    hostport = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, hostport, parts.path, "", ""))


def without_password(url: str) -> str:
    parts = urlsplit(url)
    userinfo, at, hostport = parts.netloc.rpartition("@")
    if not at:
        return url
    username = userinfo.partition(":")[0]
    netloc = f"{username}@{hostport}" if username else hostport
    return urlunsplit(parts._replace(netloc=netloc))
