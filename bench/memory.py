"""Memory search speed (issue 3): top-10 over one agent's memories, beside a NumPy brute-force scan of
the same vectors in the same run, at 10,000, 100,000 and 1,000,000 memories.

The vectors imitate the built-in hashing embedder on text about a few hundred topics: sparse, signed,
unit length, clustered by topic. Recall@10 against the exact scan is printed too: the IVF index trades
a little recall for speed past 20,000 memories.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from bench import best
from runner.agent.memory import HashingEmbedder, MemoryStore

SIZES = [int(x) for x in os.environ.get("BENCH_MEMORY_SIZES", "10000,100000,1000000").split(",")]
DIMS = 256
QUERIES = 20


def vectors(n: int, rng: np.random.Generator) -> np.ndarray:
    topics = rng.integers(0, DIMS, (300, 12))
    signs = rng.choice([-1.0, 1.0], (300, 12))
    out = np.zeros((n, DIMS), np.float32)
    which = rng.integers(0, 300, n)
    rows = np.arange(n)
    for j in range(12):  # the topic's words
        np.add.at(out, (rows, topics[which, j]), signs[which, j] * (rng.random(n) < 0.7))
    for _ in range(10):  # words of the text's own
        np.add.at(out, (rows, rng.integers(0, DIMS, n)), rng.choice([-1.0, 1.0], n))
    out /= np.linalg.norm(out, axis=1, keepdims=True) + 1e-9
    return out



def main() -> None:
    rng = np.random.default_rng(1)
    for n in SIZES:
        root = Path(tempfile.mkdtemp(prefix="bench-memory-"))
        try:
            matrix = vectors(n, rng)
            store = MemoryStore(root / "m.sqlite", HashingEmbedder(DIMS))
            t = time.perf_counter()
            for start in range(0, n, 50_000):
                chunk = matrix[start:start + 50_000]
                store.add_vectors([f"memory {i}" for i in range(start, start + len(chunk))], chunk)
            build = time.perf_counter() - t
            queries = [matrix[rng.integers(0, n)] + 0.05 * rng.standard_normal(DIMS).astype(np.float32)
                       for _ in range(QUERIES)]

            def exact(q: np.ndarray, matrix: np.ndarray = matrix) -> set[int]:
                scores = matrix @ (q / np.linalg.norm(q))
                top = np.argpartition(-scores, 10)[:10]
                return set((top + 1).tolist())  # rowids start at 1

            recall = float(np.mean([len({m.id for m in store.search_vector(q, 10)} & exact(q)) / 10
                                    for q in queries]))
            ours = min(best(lambda q=q, store=store: store.search_vector(q, 10)) for q in queries[:5])
            numpy_scan = min(best(lambda q=q: exact(q), 3) for q in queries[:5])
            print(f"memory: {n:>9,} memories  sqlite-vec top-10 {ours * 1000:8.2f} ms   numpy scan "
                  f"{numpy_scan * 1000:8.2f} ms   ratio {ours / numpy_scan:5.2f}x (goal <= 1)   "
                  f"recall@10 {recall:.2f}   build {build:.1f} s")
            store.close()
        finally:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
