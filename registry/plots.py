"""Plots logged with every run: learning curve, model comparison, popularity of recommendations.

Uses matplotlib's object API (``matplotlib.figure.Figure`` renders with Agg, no pyplot state, no
display needed). Each function writes one PNG and returns its path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

DPI = 110


def learning_curve(history: Sequence[Mapping[str, float]], path: Path, best_epoch: int | None = None) -> Path:
    """Training loss and validation NDCG@K / HR@K per epoch.

    Args:
        history: one dict per epoch (``models.trainer`` history) with ``epoch`` and any of ``loss``,
            ``val_ndcg@K``, ``val_hr@K`` (K found from the keys, 10 by default).
        path: PNG to write.
        best_epoch: marked with a vertical line when given.
    Raises:
        ValueError: ``history`` is empty.
    """
    if not history:
        raise ValueError("history is empty; expected one dict per epoch")
    epochs = [int(h.get("epoch", i + 1)) for i, h in enumerate(history)]
    fig = Figure(figsize=(8, 3.2), dpi=DPI)
    ax_loss, ax_val = fig.subplots(1, 2)
    ax_loss.plot(epochs, [h.get("loss", np.nan) for h in history], marker="o", color="tab:red")
    ax_loss.set(title="training loss", xlabel="epoch", ylabel="cross-entropy")
    k = next((key.split("@", 1)[1] for key in history[0] if key.startswith("val_ndcg@")), "10")
    for key, label, colour in ((f"val_ndcg@{k}", f"NDCG@{k}", "tab:blue"), (f"val_hr@{k}", f"HR@{k}", "tab:green")):
        values = np.array([h.get(key, np.nan) for h in history], dtype=np.float64)
        if not np.isnan(values).all():
            ok = ~np.isnan(values)
            ax_val.plot(np.asarray(epochs)[ok], values[ok], marker="o", color=colour, label=label)
    ax_val.set(title="validation", xlabel="epoch")
    if best_epoch is not None:
        for ax in (ax_loss, ax_val):
            ax.axvline(best_epoch, color="grey", linestyle="--", linewidth=1)
    ax_val.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    return path


def model_comparison(metrics: Mapping[str, Mapping[str, float]], path: Path,
                     keys: Sequence[str] = ("ndcg@10", "hr@10", "coverage@10")) -> Path:
    """Grouped bars: one group per metric, one bar per model (candidate, champion, baselines).

    Args:
        metrics: model name -> metric name -> value (missing metrics are drawn as 0).
        path: PNG to write.
        keys: the metrics to show.
    Raises:
        ValueError: ``metrics`` is empty.
    """
    if not metrics:
        raise ValueError("metrics is empty; expected at least the candidate")
    names = list(metrics)
    width = 0.8 / len(names)
    fig = Figure(figsize=(2.2 + 2.2 * len(keys), 3.6), dpi=DPI)
    axes = np.atleast_1d(fig.subplots(1, len(keys)))
    for ax, key in zip(axes, keys, strict=True):
        for i, name in enumerate(names):
            value = float(metrics[name].get(key, 0.0))
            bar = ax.bar(i * width, value, width=width * 0.95, label=name)
            ax.bar_label(bar, fmt="%.3f", fontsize=7)
        ax.set(title=key, xticks=[])
    axes[0].legend(fontsize=7, loc="upper left")
    fig.suptitle("test metrics (full ranking)")
    fig.tight_layout()
    fig.savefig(path)
    return path


def popularity_distribution(item_counts: np.ndarray, recommended_idx: np.ndarray, path: Path) -> Path:
    """How popular are recommended items compared with the catalogue?

    Items are ranked by training popularity and grouped into 10 deciles (decile 1 = most popular
    10 % of items). Bars: share of catalogue items (10 % each by construction) and share of all
    recommendation slots falling in each decile. A popularity-biased model piles into decile 1.

    Args:
        item_counts: (n_items + 1,) training interaction counts per item_idx (index 0 = padding, ignored).
        recommended_idx: (n_users, k) or flat int item_idx of recommended items (0 entries ignored).
        path: PNG to write.
    Raises:
        ValueError: fewer than 10 items.
    """
    counts = np.asarray(item_counts, dtype=np.float64)[1:]
    n_items = len(counts)
    if n_items < 10:
        raise ValueError(f"n_items={n_items}; need >= 10 items for deciles")
    order = np.argsort(-counts, kind="stable")  # most popular first
    decile_of = np.empty(n_items, dtype=np.int64)
    decile_of[order] = np.arange(n_items) * 10 // n_items
    rec = np.asarray(recommended_idx, dtype=np.int64).ravel()
    rec = rec[(rec > 0) & (rec <= n_items)]
    rec_share = np.bincount(decile_of[rec - 1], minlength=10) / max(len(rec), 1)
    event_share = np.bincount(decile_of, weights=counts, minlength=10) / max(counts.sum(), 1.0)
    x = np.arange(1, 11)
    fig = Figure(figsize=(7, 3.6), dpi=DPI)
    ax = fig.subplots()
    ax.bar(x - 0.27, np.full(10, 0.1), width=0.27, label="catalogue items", color="lightgrey")
    ax.bar(x, event_share, width=0.27, label="training interactions", color="tab:orange")
    ax.bar(x + 0.27, rec_share, width=0.27, label="recommendations", color="tab:blue")
    ax.set(xlabel="item popularity decile (1 = most popular)", ylabel="share", xticks=x,
           title="popularity of recommended items vs catalogue")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path


def ctr_over_rounds(rounds: Sequence[Mapping[str, object]], path: Path, k: int = 10) -> Path:
    """CTR@k (left axis) and skip rate (right axis) per round of a user simulation (``flows/simulate.py``),
    each round's served model version annotated.

    Args:
        rounds: one dict per round with ``round``, ``ctr_at_k``, ``skip_rate`` and ``model_version``.
        path: PNG to write.
        k: the slate length (axis label).
    Raises:
        ValueError: ``rounds`` is empty.
    """
    if not rounds:
        raise ValueError("rounds is empty; expected one dict per round")
    x = [int(r.get("round", i)) for i, r in enumerate(rounds)]
    ctr = [float(r.get("ctr_at_k") or 0.0) for r in rounds]  # type: ignore[arg-type]
    skip = [float(r.get("skip_rate") or 0.0) for r in rounds]  # type: ignore[arg-type]
    fig = Figure(figsize=(6.4, 3.4), dpi=DPI)
    ax = fig.subplots()
    ax.plot(x, ctr, marker="o", color="tab:blue", label=f"CTR@{k}")
    ax.set(xlabel="round", ylabel=f"CTR@{k} (clicks / slots)", xticks=x, ylim=(0, max(max(ctr) * 1.3, 1e-3)),
           title="simulated users: CTR over rounds")
    ax.yaxis.label.set_color("tab:blue")
    for xi, yi, r in zip(x, ctr, rounds, strict=True):
        ax.annotate(f"v{r.get('model_version')}", (xi, yi), textcoords="offset points", xytext=(0, 6), ha="center",
                    fontsize=7)
    ax_skip = ax.twinx()
    ax_skip.plot(x, skip, marker="s", linestyle="--", color="tab:red", label="skip rate")
    ax_skip.set(ylabel="skip rate (skips / slots)", ylim=(0, max(max(skip) * 1.3, 1e-3)))
    ax_skip.yaxis.label.set_color("tab:red")
    lines = ax.get_lines()[:1] + ax_skip.get_lines()[:1]
    ax.legend(lines, [line.get_label() for line in lines], fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path)
    return path


def rerank_tradeoff(valid_curves: Mapping[str, Sequence[Mapping[str, float | None]]], path: Path,
                    defaults: Mapping[str, float] | None = None) -> Path:
    """The accuracy/diversity trade-off of each re-ranker (``models.tradeoff``): ILD@10 by genres and by
    embeddings, and coverage@10, against NDCG@10 on validation, one curve per re-ranker (points = diversity).

    Args:
        valid_curves: re-ranker → points with ``diversity``, ``ndcg@10``, ``ild_genre@10`` (may be None),
            ``ild_emb@10``, ``coverage@10``.
        path: PNG to write.
        defaults: re-ranker → the diversity chosen on validation (ringed on each curve).
    Raises:
        ValueError: ``valid_curves`` is empty.
    """
    if not valid_curves:
        raise ValueError("valid_curves is empty; expected at least one re-ranker's curve")
    keys = [k for k in ("ild_genre@10", "ild_emb@10", "coverage@10")
            if all(p.get(k) is not None for c in valid_curves.values() for p in c)]
    fig = Figure(figsize=(3.6 * max(len(keys), 1), 3.4), dpi=DPI)
    axes = np.atleast_1d(fig.subplots(1, max(len(keys), 1)))
    for ax, key in zip(axes, keys, strict=False):
        for name, curve in valid_curves.items():
            x = [float(p["ndcg@10"]) for p in curve]
            y = [float(p[key]) for p in curve]
            line = ax.plot(x, y, marker="o", label=name)[0]
            for p, xi, yi in zip(curve, x, y, strict=True):
                ax.annotate(f"{float(p['diversity']):g}", (xi, yi), fontsize=6, textcoords="offset points",
                            xytext=(3, 3))
                if defaults is not None and defaults.get(name) == p["diversity"]:
                    ax.plot([xi], [yi], marker="o", markersize=11, fillstyle="none", color=line.get_color())
        ax.set(title=key, xlabel="NDCG@10 (validation)")
        ax.legend(fontsize=7)
    fig.suptitle("diversity re-ranking: accuracy vs diversity (labels: diversity; ringed: the default)")
    fig.tight_layout()
    fig.savefig(path)
    return path
