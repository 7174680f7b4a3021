"""Non-neural baselines with SASRec's scoring contract ``score(item_idx, candidate_idx=None)``.

- MostPop: training interaction counts.
- ItemKNN: item-item cosine similarity on the binary user-item matrix, top-``k_neighbours`` kept
  (Sarwar et al., WWW 2001; Deshpande & Karypis, TOIS 2004).
- EASE: closed-form shallow autoencoder B = I - P / diag(P), P = (X^T X + lambda I)^-1, diag(B) = 0
  (Steck, "Embarrassingly Shallow Autoencoders", WWW 2019).
- Markov1: first-order transition counts from the last item; ties broken by popularity.

All take (batch, seq_len) int64 left-padded histories (tensor or array) and return float32
torch tensors of shape (batch, n_items + 1) with column 0 = -inf, or (batch, n_candidates).
ItemKNN and EASE are dense in n_items^2 memory (fine up to ~30k items).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

from models.contract import select_candidates
from models.vocab import PAD_IDX

SeqInput = dict[str, np.ndarray] | list[np.ndarray]


def _seq_list(train_seqs: SeqInput) -> list[np.ndarray]:
    return list(train_seqs.values()) if isinstance(train_seqs, dict) else list(train_seqs)


def _check_n_items(seqs: list[np.ndarray], n_items: int) -> None:
    top = max((int(s.max()) for s in seqs if len(s)), default=0)
    if n_items < 1 or top > n_items:
        raise ValueError(f"n_items={n_items} but training sequences hold item_idx up to {top}")


def user_item_matrix(train_seqs: SeqInput, n_items: int) -> sp.csr_matrix:
    """Binary (n_users, n_items + 1) CSR matrix of who interacted with what (column 0 empty)."""
    seqs = _seq_list(train_seqs)
    rows = np.concatenate([np.full(len(s), u) for u, s in enumerate(seqs)]) if seqs else np.zeros(0, int)
    cols = np.concatenate(seqs) if seqs else np.zeros(0, int)
    mat = sp.csr_matrix((np.ones(len(cols), np.float32), (rows, cols)), shape=(len(seqs), n_items + 1))
    mat.data[:] = 1.0  # duplicates were summed; binarise
    return mat


def _history_matrix(item_idx: Tensor | np.ndarray, n_items: int) -> np.ndarray:
    """(batch, seq_len) histories -> (batch, n_items + 1) binary float32 rows (padding column zero)."""
    idx = np.asarray(item_idx.cpu() if isinstance(item_idx, Tensor) else item_idx, dtype=np.int64)
    out = np.zeros((idx.shape[0], n_items + 1), dtype=np.float32)
    rows = np.repeat(np.arange(idx.shape[0]), idx.shape[1])
    out[rows, idx.ravel()] = 1.0
    out[:, PAD_IDX] = 0.0
    return out


class _Baseline:
    n_items: int = 0

    def _finish(self, scores: np.ndarray, candidate_idx: Tensor | None) -> Tensor:
        out = torch.from_numpy(np.ascontiguousarray(scores, dtype=np.float32))
        out[:, PAD_IDX] = float("-inf")
        return select_candidates(out, candidate_idx)

    def _require_fit(self) -> None:
        if not self.n_items:
            raise ValueError(f"{type(self).__name__} is not fitted; call fit(train_seqs, n_items) first")


class MostPop(_Baseline):
    """Scores every item by its number of training interactions (same list for every user)."""

    def fit(self, train_seqs: SeqInput, n_items: int) -> MostPop:
        seqs = _seq_list(train_seqs)
        _check_n_items(seqs, n_items)
        self.n_items = n_items
        all_items = np.concatenate(seqs) if seqs else np.zeros(0, np.int64)
        self.counts = np.bincount(all_items, minlength=n_items + 1).astype(np.float32)  # (n_items + 1,)
        return self

    def score(self, item_idx: Tensor | np.ndarray, candidate_idx: Tensor | None = None) -> Tensor:
        self._require_fit()
        batch = item_idx.shape[0]
        return self._finish(np.tile(self.counts, (batch, 1)), candidate_idx)


class ItemKNN(_Baseline):
    """Item-based cosine kNN: score(i) = sum over history items h of sim(h, i), top-k neighbours per item."""

    def __init__(self, k_neighbours: int = 100, shrink: float = 0.0) -> None:
        self.k_neighbours, self.shrink = k_neighbours, shrink

    def fit(self, train_seqs: SeqInput, n_items: int) -> ItemKNN:
        seqs = _seq_list(train_seqs)
        _check_n_items(seqs, n_items)
        self.n_items = n_items
        x = user_item_matrix(seqs, n_items)
        co = (x.T @ x).toarray().astype(np.float32)  # (n_items + 1, n_items + 1)
        norms = np.sqrt(np.diag(co))
        sim = co / (np.outer(norms, norms) + self.shrink + 1e-12)
        np.fill_diagonal(sim, 0.0)
        if 0 < self.k_neighbours < n_items:
            # Keep each item's k most similar items (rows = source item).
            cut = np.partition(sim, -self.k_neighbours, axis=1)[:, -self.k_neighbours][:, None]
            sim = np.where(sim >= cut, sim, 0.0)
        self.sim = sim.astype(np.float32)
        return self

    def score(self, item_idx: Tensor | np.ndarray, candidate_idx: Tensor | None = None) -> Tensor:
        self._require_fit()
        return self._finish(_history_matrix(item_idx, self.n_items) @ self.sim, candidate_idx)


class EASE(_Baseline):
    """Steck's EASE^R with L2 weight ``l2`` (lambda)."""

    def __init__(self, l2: float = 500.0) -> None:
        self.l2 = l2

    def fit(self, train_seqs: SeqInput, n_items: int) -> EASE:
        seqs = _seq_list(train_seqs)
        _check_n_items(seqs, n_items)
        self.n_items = n_items
        x = user_item_matrix(seqs, n_items)[:, 1:]  # drop the padding column
        gram = (x.T @ x).toarray().astype(np.float64)  # (n_items, n_items)
        gram[np.diag_indices_from(gram)] += self.l2
        p = np.linalg.inv(gram)
        b = -p / np.diag(p)[None, :]
        np.fill_diagonal(b, 0.0)
        self.weights = np.zeros((n_items + 1, n_items + 1), dtype=np.float32)
        self.weights[1:, 1:] = b
        return self

    def score(self, item_idx: Tensor | np.ndarray, candidate_idx: Tensor | None = None) -> Tensor:
        self._require_fit()
        return self._finish(_history_matrix(item_idx, self.n_items) @ self.weights, candidate_idx)


class Markov1(_Baseline):
    """First-order Markov chain: score(i) = count(last -> i) + 1e-6 * popularity(i) (tie-break)."""

    def fit(self, train_seqs: SeqInput, n_items: int) -> Markov1:
        seqs = _seq_list(train_seqs)
        _check_n_items(seqs, n_items)
        self.n_items = n_items
        src = np.concatenate([s[:-1] for s in seqs]) if seqs else np.zeros(0, np.int64)
        dst = np.concatenate([s[1:] for s in seqs]) if seqs else np.zeros(0, np.int64)
        self.transitions = sp.csr_matrix(
            (np.ones(len(src), np.float32), (src, dst)), shape=(n_items + 1, n_items + 1)
        )  # duplicates summed into counts
        pop = MostPop().fit(seqs, n_items).counts
        self.prior = (1e-6 * pop / max(pop.max(), 1.0)).astype(np.float32)  # (n_items + 1,)
        return self

    def score(self, item_idx: Tensor | np.ndarray, candidate_idx: Tensor | None = None) -> Tensor:
        self._require_fit()
        idx = np.asarray(item_idx.cpu() if isinstance(item_idx, Tensor) else item_idx, dtype=np.int64)
        last = idx[:, -1]  # left padding: the last column is the most recent item (0 if empty)
        rows = self.transitions[last].toarray()  # (batch, n_items + 1)
        return self._finish(rows + self.prior[None, :], candidate_idx)


#: The baselines every evaluation and benchmark runs beside the candidate, with their default settings
#: (ItemKNN k_neighbours=100, EASE l2=500; MostPop and Markov1 have none). The one table of them.
BASELINES: dict[str, type[_Baseline]] = {"MostPop": MostPop, "ItemKNN": ItemKNN, "EASE": EASE, "Markov1": Markov1}

#: Baselines whose fit holds a dense (n_items + 1)^2 float32 matrix (ItemKNN's similarities, EASE's B and
#: the inverse behind it): 30,000 items is 3.6 GB each, so above this size they are skipped, and the
#: evaluation report says so (``baselines_for``).
DENSE_BASELINES: tuple[str, ...] = ("ItemKNN", "EASE")
DENSE_BASELINE_MAX_ITEMS = 30_000


def baselines_for(n_items: int, names: list[str] | tuple[str, ...]) -> tuple[list[str], dict[str, str]]:
    """Which of ``names`` can run on a catalogue of ``n_items``: ``(kept, {skipped name: reason})``.

    The dense ones (``DENSE_BASELINES``) are skipped above ``DENSE_BASELINE_MAX_ITEMS`` items.
    """
    kept, skipped = [], {}
    for name in names:
        if name in DENSE_BASELINES and n_items > DENSE_BASELINE_MAX_ITEMS:
            skipped[name] = (f"skipped: {n_items} items > {DENSE_BASELINE_MAX_ITEMS} "
                             f"(dense n_items^2 matrix, {4 * (n_items + 1) ** 2 / 2**30:.1f} GiB)")
        else:
            kept.append(name)
    return kept, skipped
