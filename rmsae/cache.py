"""On-disk cache of per-text reward-model outputs.

One SQLite database per (model identity, input format, max length, numeric settings) namespace holds,
per text key, the reward, the token count and truncation, and pooled hidden states per
(layer, pooling). Each :meth:`ActivationCache.put` is one transaction, so another process reading the
database sees whole entries only, and a run interrupted between batches resumes from the last
committed batch.
"""

from __future__ import annotations

import logging
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from .paths import resolve_cache_dir
from .storage import atomic_write_json, sha256_json

logger = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS texts (
    text_key TEXT PRIMARY KEY,
    reward REAL NOT NULL,
    n_tokens INTEGER NOT NULL,
    n_truncated INTEGER NOT NULL,
    response_truncated INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS pooled (
    text_key TEXT NOT NULL,
    layer INTEGER NOT NULL,
    pooling TEXT NOT NULL,
    vector BLOB NOT NULL,
    PRIMARY KEY (text_key, layer, pooling)
);
"""

# SQLite limits the number of host parameters in one statement; look keys up in chunks.
_LOOKUP_CHUNK = 500


@dataclass
class CachedText:
    """Stored values for one text."""

    reward: float
    n_tokens: int
    n_truncated: int
    response_truncated: bool
    pooled: dict[tuple[int, str], np.ndarray] = field(default_factory=dict)


class ActivationCache:
    """Reward, token counts and pooled hidden states per text, for one model namespace."""

    def __init__(self, namespace: Mapping[str, Any], cache_dir: str | Path | None = None) -> None:
        self.namespace = dict(namespace)
        self.key = sha256_json(self.namespace)[:24]
        self.directory = resolve_cache_dir(cache_dir) / "activations" / self.key
        self.directory.mkdir(parents=True, exist_ok=True)
        namespace_file = self.directory / "namespace.json"
        if not namespace_file.exists():
            atomic_write_json(namespace_file, self.namespace)
        self.path = self.directory / "cache.sqlite"
        self._connection = sqlite3.connect(self.path, timeout=60.0)
        self._connection.execute("PRAGMA journal_mode=WAL")
        self._connection.executescript(_SCHEMA)
        self._connection.commit()
        self.hits = 0
        self.misses = 0

    def close(self) -> None:
        self._connection.close()

    def __enter__(self) -> "ActivationCache":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __len__(self) -> int:
        return int(self._connection.execute("SELECT COUNT(*) FROM texts").fetchone()[0])

    def get(
        self, text_keys: Sequence[str], layers: Iterable[int] = (), poolings: Iterable[str] = ()
    ) -> dict[str, CachedText]:
        """Return the entries that hold every requested (layer, pooling) vector; others count as misses."""
        wanted = {(int(layer), pooling) for layer in layers for pooling in poolings}
        unique_keys = list(dict.fromkeys(text_keys))
        found: dict[str, CachedText] = {}
        for start in range(0, len(unique_keys), _LOOKUP_CHUNK):
            chunk = unique_keys[start : start + _LOOKUP_CHUNK]
            marks = ",".join("?" * len(chunk))
            for key, reward, n_tokens, n_truncated, response_truncated in self._connection.execute(
                f"SELECT text_key, reward, n_tokens, n_truncated, response_truncated FROM texts WHERE text_key IN ({marks})",
                chunk,
            ):
                found[key] = CachedText(float(reward), int(n_tokens), int(n_truncated), bool(response_truncated))
            if wanted and found:
                for key, layer, pooling, blob in self._connection.execute(
                    f"SELECT text_key, layer, pooling, vector FROM pooled WHERE text_key IN ({marks})", chunk
                ):
                    if key in found and (layer, pooling) in wanted:
                        found[key].pooled[(layer, pooling)] = np.frombuffer(blob, dtype=np.float32).copy()
        complete = {key: entry for key, entry in found.items() if wanted <= entry.pooled.keys()}
        self.hits += len(complete)
        self.misses += len(unique_keys) - len(complete)
        return complete

    def put(self, entries: Mapping[str, CachedText]) -> None:
        """Store entries in one transaction: all of them become visible together, or none."""
        with self._connection:
            self._connection.executemany(
                "INSERT OR REPLACE INTO texts VALUES (?, ?, ?, ?, ?)",
                [
                    (key, float(e.reward), int(e.n_tokens), int(e.n_truncated), int(e.response_truncated))
                    for key, e in entries.items()
                ],
            )
            self._connection.executemany(
                "INSERT OR REPLACE INTO pooled VALUES (?, ?, ?, ?)",
                [
                    (key, int(layer), pooling, np.ascontiguousarray(vector, dtype=np.float32).tobytes())
                    for key, e in entries.items()
                    for (layer, pooling), vector in e.pooled.items()
                ],
            )
