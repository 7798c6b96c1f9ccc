"""Agent memory: one sqlite-vec file per client, agent and collection.

The file lives at ``MEMORY_DIR/CLIENT/AGENT/COLLECTION.sqlite``: the agent and the client are part
of the path, so two agents (or two clients) that pick the same collection name still never share a
store. Each store records the embedder that made its vectors and refuses another (mixing vector
spaces silently would make search return nonsense).

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
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import sqlite_vec

from runner.errors import OrchestratorError


class MemoryError_(OrchestratorError):
    code = "memory"


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


def store_path(memory_dir: Path, client_id: str, agent: str, collection: str | None) -> Path:
    return memory_dir / client_id / agent / f"{collection or agent}.sqlite"


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
                              f"embedding float[{dims}] distance_metric=cosine)")
            self.conn.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                                  [("embedder", self.embedder.name), ("dims", str(dims))])
        self._dims = dims

    def add(self, text: str, *, kind: str = "note", run_id: str | None = None) -> int:
        return self.add_many([text], kind=kind, run_id=run_id)[0]

    def add_many(self, texts: list[str], *, kind: str = "note", run_id: str | None = None) -> list[int]:
        vectors = self.embedder.embed(texts)
        if not vectors:
            return []
        self._ensure_table(len(vectors[0]))
        stamp = datetime.now(UTC).isoformat(timespec="seconds")
        ids = []
        with self.conn:
            for text, vec in zip(texts, vectors, strict=True):
                cur = self.conn.execute("INSERT INTO memories (created_at, kind, run_id, text) VALUES (?, ?, ?, ?)",
                                        (stamp, kind, run_id, text))
                rowid = int(cur.lastrowid or 0)
                self.conn.execute("INSERT INTO vectors (rowid, embedding) VALUES (?, ?)",
                                  (rowid, sqlite_vec.serialize_float32(vec)))
                ids.append(rowid)
        return ids

    def search(self, query: str, k: int = 5) -> list[Memory]:
        if not self._dims or k <= 0:
            return []
        vec = self.embedder.embed([query])[0]
        rows = self.conn.execute(
            """SELECT m.id, m.text, m.kind, m.run_id, m.created_at, v.distance
               FROM vectors v JOIN memories m ON m.id = v.rowid
               WHERE v.embedding MATCH ? AND k = ? ORDER BY v.distance""",
            (sqlite_vec.serialize_float32(vec), min(int(k), 100))).fetchall()
        return [Memory(*r) for r in rows]

    def count(self) -> int:
        return int(self.conn.execute("SELECT count(*) FROM memories").fetchone()[0])

    def close(self) -> None:
        self.conn.close()
