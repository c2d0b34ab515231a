"""Build the conversation store named by AppArgs.store_url."""
from __future__ import annotations

import os

from routing.embedded_store import EmbeddedSessionStore
from routing.redis_store import RedisSessionStore
from routing.store import SessionStore

from .config import AppArgs


def make_store(args: AppArgs) -> SessionStore:
    if args.store_url.startswith("embedded://"):
        return EmbeddedSessionStore(prefix=args.store_key_prefix, ttl_s=args.session_ttl_s)
    password = os.environ.get(args.store_password_env) if args.store_password_env else None
    return RedisSessionStore(args.store_url, password=password, prefix=args.store_key_prefix,
                             ttl_s=args.session_ttl_s, min_replicas_acked=args.min_replicas_acked,
                             replica_ack_timeout_s=args.replica_ack_timeout_s)
