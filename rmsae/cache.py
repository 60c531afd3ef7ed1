"""On-disk cache of per-text reward-model outputs.

One SQLite database per (model identity, input format, max length, numeric settings) namespace holds,
per text key, the reward, the token count and truncation, pooled hidden states per
(layer, pooling), and pooled SAE codes per (SAE fingerprint, pooling). SAE codes are stored sparse
(indices and values) when that is smaller than the dense vector. Each :meth:`ActivationCache.put` is one transaction, so another process reading the
database reads whole entries only, and a run interrupted between batches resumes from the last
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
CREATE TABLE IF NOT EXISTS sae_codes (
    text_key TEXT NOT NULL,
    sae TEXT NOT NULL,
    pooling TEXT NOT NULL,
    width INTEGER NOT NULL,
    sparse INTEGER NOT NULL,
    indices BLOB,
    vector BLOB NOT NULL,
    PRIMARY KEY (text_key, sae, pooling)
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
    sae_codes: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)


def encode_codes(vector: np.ndarray) -> tuple[int, bytes | None, bytes]:
    """Return (sparse flag, indices, values) for storing a pooled code vector in its smaller form."""
    vector = np.ascontiguousarray(vector, dtype=np.float32)
    nonzero = np.flatnonzero(vector)
    # Sparse costs 8 bytes per nonzero (int32 index + float32 value), dense 4 bytes per latent.
    if 8 * len(nonzero) < 4 * len(vector):
        return 1, nonzero.astype(np.int32).tobytes(), vector[nonzero].tobytes()
    return 0, None, vector.tobytes()


def decode_codes(width: int, sparse: int, indices: bytes | None, values: bytes) -> np.ndarray:
    if not sparse:
        return np.frombuffer(values, dtype=np.float32).copy()
    vector = np.zeros(width, dtype=np.float32)
    vector[np.frombuffer(indices, dtype=np.int32)] = np.frombuffer(values, dtype=np.float32)
    return vector


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
        self,
        text_keys: Sequence[str],
        layers: Iterable[int] = (),
        poolings: Iterable[str] = (),
        sae_keys: Iterable[str] = (),
    ) -> dict[str, CachedText]:
        """Return the entries that hold every requested vector; others count as misses.

        Requested are the hidden states at each of ``layers`` and the codes of each SAE fingerprint
        in ``sae_keys``, each with every one of ``poolings``.
        """
        poolings = tuple(poolings)
        wanted = {(int(layer), pooling) for layer in layers for pooling in poolings}
        wanted_codes = {(sae, pooling) for sae in sae_keys for pooling in poolings}
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
            if wanted_codes and found:
                for key, sae, pooling, width, sparse, indices, blob in self._connection.execute(
                    f"SELECT text_key, sae, pooling, width, sparse, indices, vector FROM sae_codes WHERE text_key IN ({marks})",
                    chunk,
                ):
                    if key in found and (sae, pooling) in wanted_codes:
                        found[key].sae_codes[(sae, pooling)] = decode_codes(width, sparse, indices, blob)
        complete = {
            key: entry
            for key, entry in found.items()
            if wanted <= entry.pooled.keys() and wanted_codes <= entry.sae_codes.keys()
        }
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
            rows = []
            for key, entry in entries.items():
                for (sae, pooling), vector in entry.sae_codes.items():
                    sparse, indices, values = encode_codes(vector)
                    rows.append((key, sae, pooling, int(len(vector)), sparse, indices, values))
            self._connection.executemany("INSERT OR REPLACE INTO sae_codes VALUES (?, ?, ?, ?, ?, ?, ?)", rows)

    def size_report(self) -> dict[str, int]:
        """Return the bytes of stored SAE codes, and what they would take stored dense."""
        stored, dense = self._connection.execute(
            "SELECT COALESCE(SUM(LENGTH(vector) + COALESCE(LENGTH(indices), 0)), 0), COALESCE(SUM(4 * width), 0) FROM sae_codes"
        ).fetchone()
        return {"sae_code_bytes": int(stored), "sae_code_bytes_dense": int(dense)}
