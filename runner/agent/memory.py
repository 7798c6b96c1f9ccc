"""Agent memory: one sqlite-vec file per client, agent and collection.

The file lives at ``MEMORY_DIR/CLIENT/AGENT/COLLECTION.sqlite``: the agent and the client are part
of the path, so two agents (or two clients) that pick the same collection name still never share a
store. Each store records the embedder that made its vectors and refuses another (mixing vector
spaces silently would make search return nonsense).

Search is exact (a sqlite-vec scan) up to ``IVF_MIN`` memories. Past that the store becomes an IVF
index, as FAISS's IVF-Flat: k-means centroids split the vectors into about sqrt(N)/2 cells, each cell a
sqlite-vec partition, and a search scans only the ``nprobe`` cells nearest the query, merging their
top k. A full scan costs time in proportion to N; this costs about sqrt(N). The cells are retrained
whenever the store has doubled since the last training, so the cost is amortized over inserts.
Cells are small, so vec0 chunks are 64 vectors (its default of 1,024 wastes space and time per cell).
Vectors are unit length, so L2 order is cosine order; distances are reported as cosine distances.

sqlite-vec is a loadable extension. Python's ``sqlite3`` can load it when it was built with extension
loading (many distributions); pyenv and some others are not, so we fall back to ``sqlean``, a
``sqlite3``-compatible module that can.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import sqlite3
import urllib.request
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import sqlite_vec

from runner import times
from runner.errors import MemoryError_
from runner.plan import RunPlan, store_path

__all__ = ["Embedder", "HashingEmbedder", "MemoryError_", "MemoryStore", "OllamaEmbedder", "store_path"]


class Embedder(Protocol):
    name: str
    dims: int

    def embed(self, texts: list[str]) -> list[list[float]]: ...


class HashingEmbedder:
    """Feature hashing of word unigrams and bigrams: no model, no download, stable across processes."""

    def __init__(self, dims: int = 256) -> None:
        self.dims = dims
        self.name = f"hashing-v1-{dims}"

    def embed(self, texts: list[str]) -> list[list[float]]:
        return [self._one(t) for t in texts]

    def _one(self, text: str) -> list[float]:
        vec = [0.0] * self.dims
        words = re.findall(r"\w+", text.lower())
        for feature in [*words, *(f"{a} {b}" for a, b in itertools.pairwise(words))]:
            h = zlib.crc32(feature.encode())
            vec[h % self.dims] += 1.0 if (h >> 16) & 1 else -1.0
        norm = math.sqrt(sum(v * v for v in vec)) or 1.0
        return [v / norm for v in vec]


class OllamaEmbedder:
    """Embeddings from an Ollama embedding model (``AGENT_ORCH_EMBED_MODEL``)."""

    def __init__(self, host: str, model: str, timeout: float = 30) -> None:
        self.host, self.model, self.timeout = host.rstrip("/"), model, timeout
        self.name = f"ollama:{model}"
        self.dims = 0

    def embed(self, texts: list[str]) -> list[list[float]]:
        body = json.dumps({"model": self.model, "input": texts}).encode()
        req = urllib.request.Request(f"{self.host}/api/embed", body, {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                vectors: list[list[float]] = json.load(resp)["embeddings"]
        except OSError as exc:
            raise MemoryError_(f"cannot embed with {self.model} at {self.host}: {exc}") from None
        self.dims = len(vectors[0]) if vectors else self.dims
        return vectors


def connect_vec(path: Path | str) -> sqlite3.Connection:
    """A SQLite connection with sqlite-vec loaded, from whichever module can load extensions."""
    conn = sqlite3.connect(str(path), timeout=30, check_same_thread=False)
    if hasattr(conn, "enable_load_extension"):
        try:
            conn.enable_load_extension(True)
            sqlite_vec.load(conn)
            conn.enable_load_extension(False)
            return conn
        except sqlite3.OperationalError:
            pass
    conn.close()
    import sqlean

    alt: sqlite3.Connection = sqlean.connect(str(path), timeout=30, check_same_thread=False)
    alt.enable_load_extension(True)
    sqlite_vec.load(alt)
    alt.enable_load_extension(False)
    return alt


def _unit(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.ascontiguousarray(vectors / np.where(norms == 0, 1, norms), dtype=np.float32)


def _nprobe(nlist: int) -> int:
    """Cells scanned per search: one in sixteen, at least 8. Measured on 100,000 clustered vectors
    (bench/memory.py): recall@10 0.98-0.99 at about half the time of a NumPy scan of all of them."""
    return min(nlist, max(8, nlist // 16))


def _nearest(centroids: np.ndarray, query: np.ndarray, n: int) -> list[int]:
    scores = centroids @ query
    n = min(n, len(scores))
    return [int(i) for i in np.argpartition(-scores, n - 1)[:n]]


def _kmeans(matrix: np.ndarray, k: int) -> np.ndarray:
    """Spherical k-means (Lloyd) on a sample; deterministic for a given store."""
    rng = np.random.default_rng(0)
    sample = matrix[rng.choice(len(matrix), min(len(matrix), KMEANS_SAMPLE), replace=False)]
    centroids = sample[rng.choice(len(sample), k, replace=False)].copy()
    for _ in range(KMEANS_ITERATIONS):
        assign = np.argmax(sample @ centroids.T, axis=1)
        sums = np.zeros_like(centroids)
        np.add.at(sums, assign, sample)
        empty = np.bincount(assign, minlength=k) == 0
        sums[empty] = sample[rng.choice(len(sample), int(empty.sum()))]
        centroids = _unit(sums)
    return centroids


@dataclass(frozen=True)
class Memory:
    id: int
    text: str
    kind: str
    run_id: str | None
    created_at: str
    distance: float

    def as_json(self) -> dict[str, Any]:
        return self.__dict__.copy()


class Remembers(Protocol):
    """What a run uses of its memory: the store itself (on the control plane) or ``ChannelMemory``."""

    def add(self, text: str, *, kind: str = "note", run_id: str | None = None) -> int: ...

    def search(self, query: str, k: int = 5) -> list[Memory]: ...

    def close(self) -> None: ...


class ChannelMemory:
    """A run's memory, asked of the control plane over the run's channel: the store stays with the
    daemon (one store an agent, whichever node runs it), and the run never opens its file."""

    def __init__(self, ask: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
        self.ask = ask

    def add(self, text: str, *, kind: str = "note", run_id: str | None = None) -> int:
        answer = self.ask({"op": "memory.save", "text": text, "k": 1, "kind": kind})
        return int(answer.get("memory_id") or 0)

    def search(self, query: str, k: int = 5) -> list[Memory]:
        answer = self.ask({"op": "memory.search", "text": query, "k": k})
        return [Memory(int(m["id"]), str(m["text"]), str(m["kind"]), m.get("run_id"), str(m["created_at"]),
                       float(m["distance"])) for m in answer.get("found", [])]

    def close(self) -> None:
        pass


IVF_MIN = 20_000  # below this a search scans every vector (a few milliseconds)
KMEANS_SAMPLE = 50_000
KMEANS_ITERATIONS = 8


class MemoryStore:
    def __init__(self, path: Path, embedder: Embedder) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.embedder = path, embedder
        self.conn = connect_vec(path)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
        self.conn.execute("""CREATE TABLE IF NOT EXISTS memories (
            id INTEGER PRIMARY KEY, created_at TEXT NOT NULL, kind TEXT NOT NULL, run_id TEXT, text TEXT NOT NULL)""")
        self._dims = self._check_embedder()
        if self._dims:
            self._index_cells()

    def _check_embedder(self) -> int:
        row = self.conn.execute("SELECT value FROM meta WHERE key = 'embedder'").fetchone()
        if row is not None:
            if row[0] != self.embedder.name:
                raise MemoryError_(f"memory {self.path} was made by embedder '{row[0]}', not "
                                   f"'{self.embedder.name}'; use that embedder or a new collection")
            dims = self.conn.execute("SELECT value FROM meta WHERE key = 'dims'").fetchone()
            return int(dims[0])
        return 0

    def _ensure_table(self, dims: int) -> None:
        if self._dims:
            if dims != self._dims:
                raise MemoryError_(f"memory {self.path} holds {self._dims}-dimensional vectors, not {dims}")
            return
        with self.conn:
            self.conn.execute(f"CREATE VIRTUAL TABLE IF NOT EXISTS vectors USING vec0("
                              f"cell INTEGER PARTITION KEY, embedding float[{dims}] distance_metric=l2, chunk_size=64)")
            self.conn.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                                  [("embedder", self.embedder.name), ("dims", str(dims))])
        self._dims = dims
        self._index_cells()

    def _index_cells(self) -> None:
        """sqlite-vec finds a partition's chunks by scanning its chunk table; an index on the partition
        column makes that lookup logarithmic (at a million memories: 736 ms a search without it)."""
        with self.conn:
            self.conn.execute("CREATE INDEX IF NOT EXISTS vectors_chunks_cell ON vectors_chunks (partition00)")

    def add(self, text: str, *, kind: str = "note", run_id: str | None = None) -> int:
        return self.add_many([text], kind=kind, run_id=run_id)[0]

    def add_many(self, texts: list[str], *, kind: str = "note", run_id: str | None = None) -> list[int]:
        vectors = self.embedder.embed(texts)
        if not vectors:
            return []
        return self.add_vectors(texts, np.asarray(vectors, dtype=np.float32), kind=kind, run_id=run_id)

    def add_vectors(self, texts: list[str], vectors: np.ndarray, *, kind: str = "note",
                    run_id: str | None = None) -> list[int]:
        """Store texts with their (already computed) vectors; the benchmark uses this directly."""
        self._ensure_table(int(vectors.shape[1]))
        vectors = _unit(vectors)
        cells = self._cells_of(vectors)
        stamp = times.stamp(datetime.now(UTC), "seconds")
        with self.conn:
            first = int(self.conn.execute("SELECT coalesce(max(id), 0) + 1 FROM memories").fetchone()[0])
            ids = list(range(first, first + len(texts)))
            self.conn.executemany("INSERT INTO memories (id, created_at, kind, run_id, text) VALUES (?, ?, ?, ?, ?)",
                                  [(i, stamp, kind, run_id, t) for i, t in zip(ids, texts, strict=True)])
            self.conn.executemany("INSERT INTO vectors (rowid, cell, embedding) VALUES (?, ?, ?)",
                                  [(i, int(c), v.tobytes()) for i, c, v in zip(ids, cells, vectors, strict=True)])
        self._maybe_train()
        return ids

    def search(self, query: str, k: int = 5) -> list[Memory]:
        if not self._dims or k <= 0:
            return []
        return self.search_vector(np.asarray(self.embedder.embed([query])[0], dtype=np.float32), k)

    def search_vector(self, vector: np.ndarray, k: int = 5, nprobe: int | None = None) -> list[Memory]:
        if not self._dims or k <= 0:
            return []
        k = min(int(k), 100)
        query = _unit(vector.reshape(1, -1))[0]
        centroids = self._centroids()
        cells = [0] if centroids is None else _nearest(centroids, query, nprobe or _nprobe(len(centroids)))
        hits: list[tuple[float, int]] = []
        for cell in cells:
            rows = self.conn.execute("SELECT rowid, distance FROM vectors WHERE embedding MATCH ? AND k = ? "
                                     "AND cell = ?", (query.tobytes(), k, int(cell))).fetchall()
            hits.extend((float(d), int(r)) for r, d in rows)
        hits.sort()
        best = hits[:k]
        if not best:
            return []
        marks = ",".join("?" for _ in best)
        texts = {r[0]: r[1:] for r in self.conn.execute(
            f"SELECT id, text, kind, run_id, created_at FROM memories WHERE id IN ({marks})", [i for _, i in best])}
        return [Memory(i, str(texts[i][0]), str(texts[i][1]), texts[i][2], str(texts[i][3]), d * d / 2)
                for d, i in best if i in texts]

    # -- the IVF index ----------------------------------------------------------------------------

    def _centroids(self) -> np.ndarray | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key = 'centroids'").fetchone()
        if row is None:
            return None
        return np.frombuffer(bytes.fromhex(row[0]), dtype=np.float32).reshape(-1, self._dims)

    def _cells_of(self, vectors: np.ndarray) -> list[int]:
        centroids = self._centroids()
        if centroids is None:
            return [0] * len(vectors)
        return [int(c) for c in np.argmax(vectors @ centroids.T, axis=1)]

    def _maybe_train(self) -> None:
        count = self.count()
        row = self.conn.execute("SELECT value FROM meta WHERE key = 'trained_at_count'").fetchone()
        trained = int(row[0]) if row else 0
        if count >= IVF_MIN and count >= 2 * trained:
            self.train()

    def train(self) -> None:
        """(Re)build the cells: k-means on a sample, then every vector moved to its nearest cell."""
        rows = self.conn.execute("SELECT rowid, embedding FROM vectors").fetchall()
        if not rows:
            return
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        matrix = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), self._dims)
        nlist = max(1, int(math.sqrt(len(rows)) / 2))
        centroids = _kmeans(matrix, nlist)
        cells = np.concatenate([np.argmax(chunk @ centroids.T, axis=1)
                                for chunk in np.array_split(matrix, max(1, len(matrix) // 20_000))])
        with self.conn:
            self.conn.execute("DELETE FROM vectors")
            self.conn.executemany("INSERT INTO vectors (rowid, cell, embedding) VALUES (?, ?, ?)",
                                  ((int(i), int(c), v.tobytes()) for i, c, v in zip(ids, cells, matrix, strict=True)))
            self.conn.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                                  [("centroids", centroids.astype(np.float32).tobytes().hex()),
                                   ("trained_at_count", str(len(rows)))])

    def count(self) -> int:
        return int(self.conn.execute("SELECT count(*) FROM memories").fetchone()[0])

    def close(self) -> None:
        self.conn.close()


def open_memory(plan: RunPlan) -> MemoryStore | None:
    """The memory store of a plan's agent (None when it has none), with the embedder the settings name."""
    mem = plan.spec.memory
    if mem is None or mem.type == "none":
        return None
    s = plan.settings
    embedder: Embedder = OllamaEmbedder(s.ollama_host, s.embed_model) if s.embed_model else HashingEmbedder()
    return MemoryStore(store_path(s.memory_dir, plan.client_id, plan.agent, mem.collection), embedder)
