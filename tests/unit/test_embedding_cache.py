from __future__ import annotations

import numpy as np

from featurestore.embedding_cache import CachedEncoder


class CountingEncoder:
    def __init__(self) -> None:
        self.seen: list[str] = []

    def encode(self, sentences: list[str], **kwargs: object) -> np.ndarray:
        self.seen += sentences
        return np.array([[len(s), s.count("a")] for s in sentences], dtype=np.float32)


def test_each_text_is_encoded_once_and_the_model_loads_only_on_a_miss(tmp_path) -> None:
    inner = CountingEncoder()
    loads: list[int] = []

    def load() -> CountingEncoder:
        loads.append(1)
        return inner

    path = tmp_path / "cache.parquet"
    first = CachedEncoder(load, path, "m").encode(["banana", "kiwi"], normalize_embeddings=True)
    assert first.tolist() == [[6.0, 3.0], [4.0, 0.0]]
    again = CachedEncoder(load, path, "m")  # a new process: reads the file, loads no model
    out = again.encode(["kiwi", "banana", "kiwi"], normalize_embeddings=True)
    assert out.tolist() == [[4.0, 0.0], [6.0, 3.0], [4.0, 0.0]]
    assert len(loads) == 1 and again.hits == 2 and again.misses == 0
    CachedEncoder(load, path, "m").encode(["kiwi", "mango"], normalize_embeddings=True)
    assert inner.seen == ["banana", "kiwi", "mango"]  # only the new text went through the encoder
    CachedEncoder(load, path, "other-model").encode(["kiwi"], normalize_embeddings=True)
    assert inner.seen[-1] == "kiwi"  # another model never reads these vectors
