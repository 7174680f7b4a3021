"""Forget a user in the Feast online store (``recloop.forget.STORES["online_store"]``).

Feast has no per-entity delete, so the handler removes the rows where Feast writes them, keyed the way
Feast keys them (``feast.infra.key_encoding_utils.serialize_entity_key`` of the ``user`` entity, the
``RepoConfig``'s serialization version):

- SQLite (``home/feast_online.db``): every table with an ``entity_key`` column (one per feature view of
  the user entity), deleted with ``PRAGMA secure_delete=ON`` so freed cells are zeroed.
- Redis: the user's hash (``serialize_entity_key`` + project name), which holds every view's features.

The offline source tables (``home/features/*.parquet``) are plain Parquet and handled by the kernel
(``recloop.forget_handlers``).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from featurestore.online import feature_store_config, online_store_kind

USER_JOIN_KEY = "user_id"  # feature_repo/entities.py: user


class OnlineStoreHandler:
    """Deletes the user entity's online rows (SQLite tables or the Redis hash) of ``settings``' store.

    Args:
        settings: ``recloop.settings.Settings`` (home, online store kind, Redis URL, Feast project).
    """

    name = "online_store"
    repeat = True  # a feedback push in flight may land after the first pass

    def __init__(self, settings: Any) -> None:
        self.config = feature_store_config(settings)
        self.kind = online_store_kind(settings)
        self.project = self.config.project
        self.sqlite_path = Path(settings.home) / "feast_online.db"
        self._redis: Any = None

    def _key(self, user_id: str) -> bytes:
        from feast.infra.key_encoding_utils import serialize_entity_key
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey
        from feast.protos.feast.types.Value_pb2 import Value

        entity = EntityKey(join_keys=[USER_JOIN_KEY], entity_values=[Value(string_val=user_id)])
        version = self.config.entity_key_serialization_version
        return serialize_entity_key(entity, entity_key_serialization_version=version)

    # ---- SQLite ------------------------------------------------------------------------------------
    def _sqlite(self) -> sqlite3.Connection | None:
        if not self.sqlite_path.exists():
            return None
        return sqlite3.connect(self.sqlite_path, isolation_level=None, timeout=30.0)

    @staticmethod
    def _tables(conn: sqlite3.Connection) -> list[str]:
        names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return [n for n in names if "entity_key" in {c[1] for c in conn.execute(f'PRAGMA table_info("{n}")')}]

    # ---- Redis -------------------------------------------------------------------------------------
    def _client(self) -> Any:
        if self._redis is None:
            import redis
            from feast.infra.online_stores.redis import RedisOnlineStore

            nodes, params = RedisOnlineStore._parse_connection_string(self.config.online_store.connection_string)
            self._redis = redis.Redis(host=nodes[0]["host"], port=int(nodes[0]["port"]), **params)
        return self._redis

    def _redis_key(self, user_id: str) -> bytes:
        return self._key(user_id) + self.project.encode()

    # ---- the handler -------------------------------------------------------------------------------
    def delete(self, user_id: str) -> int:
        """Delete the user's rows; returns SQLite rows (feature values) or Redis keys removed."""
        if self.kind == "redis":
            return int(self._client().delete(self._redis_key(user_id)))
        conn = self._sqlite()
        if conn is None:
            return 0
        key, n = self._key(user_id), 0
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("PRAGMA secure_delete=ON")
            for table in self._tables(conn):
                n += conn.execute(f'DELETE FROM "{table}" WHERE entity_key = ?', (key,)).rowcount
            conn.execute("COMMIT")
        finally:
            conn.close()
        return n

    def remaining(self, user_id: str) -> int:
        if self.kind == "redis":
            return int(self._client().exists(self._redis_key(user_id)))
        conn = self._sqlite()
        if conn is None:
            return 0
        try:
            key = self._key(user_id)
            return sum(conn.execute(f'SELECT count(*) FROM "{t}" WHERE entity_key = ?', (key,)).fetchone()[0]
                       for t in self._tables(conn))
        finally:
            conn.close()

    def durable(self) -> None:
        """SQLite: checkpoint and truncate a WAL if the store uses one (freed cells are already zeroed)."""
        if self.kind == "redis":
            return
        conn = self._sqlite()
        if conn is not None:
            try:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                conn.close()

    def close(self) -> None:
        if self._redis is not None:
            self._redis.close()
            self._redis = None
