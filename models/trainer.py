"""Training loop for any registered sequential model: AdamW, early stopping on validation NDCG@K,
seeds, device auto, warm start. It uses only the model contract (``models.contract``)."""

from __future__ import annotations

import copy
import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, Field
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from models.checkpoint import warm_start_state
from models.contract import Batch, ItemSequenceModel
from models.factory import build_model
from models.metrics import evaluate
from models.sequences import SequenceDataset, Split
from models.vocab import ItemVocabulary

logger = logging.getLogger(__name__)


class TrainConfig(BaseModel):
    """Training knobs (not architecture): passed as a flow parameter and recorded with each run."""

    lr: float = Field(default=3e-3, gt=0, description="AdamW learning rate (tuned on ml-100k validation)")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW decoupled weight decay")
    batch_size: int = Field(default=64, ge=1, description="Training windows per step")
    epochs: int = Field(default=100, ge=1, description="Upper bound on epochs")
    patience: int = Field(default=8, ge=1, description="Epochs without val NDCG@K gain before stopping")
    eval_every: int = Field(default=1, ge=1, description="Validate every N epochs")
    seed: int = Field(default=42, description="Seeds torch, numpy and random")
    device: str = Field(default="auto", description="'auto' (CUDA if present), 'cpu' or 'cuda[:n]'")
    num_threads: int | None = Field(default=None, ge=1, description="CPU threads; None = all cores")
    loss: Literal["full", "sampled"] = Field(default="full", description="Full or sampled softmax CE")
    n_negatives: int = Field(default=256, ge=1, description="Negatives for the sampled softmax")
    grad_clip: float | None = Field(default=1.0, description="Max gradient norm; None disables")
    max_train_seconds: float | None = Field(default=None, gt=0, description="Wall-clock budget")
    all_windows: bool = Field(default=True, description="Cut long sequences into windows (every position)")
    eval_k: int = Field(default=10, ge=1, description="K of the validation metric")


@dataclass
class TrainResult:
    """The best model (by validation NDCG@K, K = ``eval_k``) and how it got there."""

    model: ItemSequenceModel
    history: list[dict[str, Any]]
    best_epoch: int
    best_val_ndcg: float
    eval_k: int
    seed: int
    device: str
    train_seconds: float
    seconds_to_best: float
    seqs_per_s: float
    config: Any
    train_config: dict[str, Any] = field(default_factory=dict)


def set_seed(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(device: str, num_threads: int | None = None) -> torch.device:
    """'auto' -> CUDA when available, else CPU with ``num_threads`` (default: all cores).

    Raises:
        ValueError: CUDA requested but unavailable.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available; use 'auto' or 'cpu'")
    if dev.type == "cpu":
        torch.set_num_threads(num_threads or os.cpu_count() or 1)
    return dev


def val_keys(k: int) -> tuple[str, str]:
    """The history keys of the validation metrics at cut-off k: (``val_ndcg@k``, ``val_hr@k``)."""
    return f"val_ndcg@{k}", f"val_hr@{k}"


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("epoch {task.fields[epoch]}"),
        BarColumn(),
        TextColumn(
            "loss {task.fields[loss]:.4f} | {task.fields[speed]:.0f} seq/s | val ndcg {task.fields[val]:.4f}"
        ),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=True,
    )


def train_model(
    split: Split,
    vocab: ItemVocabulary,
    model_config: Any,
    train_config: TrainConfig | None = None,
    init_state: dict[str, Any] | None = None,
    progress: bool = True,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train the model ``model_config`` describes on ``split.train``; keep the epoch with the best
    validation NDCG@K (K = ``train_config.eval_k``).

    Every position of every training sequence is a next-item target (``SequenceDataset``); the loss
    is the model's own ``loss(Batch)`` (full softmax, or sampled with ``train_config.loss='sampled'``).
    On CUDA the forward pass runs under bf16 autocast; on CPU in fp32 with all cores.

    Args:
        split: from ``leave_one_out`` / ``temporal_split``; indices refer to ``vocab``.
        vocab: the item vocabulary; ``model_config.n_items`` must equal ``len(vocab)``.
        model_config: a registered model's frozen config (``models.factory``), the architecture.
        train_config: training knobs (defaults if None).
        init_state: a checkpoint dict (``{"config", "state_dict", "vocab"}``) to warm-start from;
            items new in ``vocab`` get fresh embedding rows, known items keep theirs.
        progress: show a rich progress bar (loss, seq/s, ETA).
        on_epoch: called with each epoch's history dict (e.g. to log metrics).
    Returns:
        ``TrainResult`` with the best model (eval mode, on the training device) and per-epoch history
        dicts ``{epoch, loss, val_ndcg@K, val_hr@K, seqs_per_s, seconds}``.
    Raises:
        ValueError: vocabulary / config size mismatch or no training windows.
        TypeError: ``model_config`` belongs to no registered model.
    """
    cfg = train_config or TrainConfig()
    if model_config.n_items != len(vocab):
        raise ValueError(f"model_config.n_items={model_config.n_items} but len(vocab)={len(vocab)}")
    set_seed(cfg.seed)
    device = resolve_device(cfg.device, cfg.num_threads)
    model = build_model(model_config)
    if init_state is not None:
        model.load_state_dict(warm_start_state(init_state, model, vocab))
    model.to(device)
    data = SequenceDataset(split.train, model_config.max_seq_len, all_windows=cfg.all_windows)
    if len(data) == 0:
        raise ValueError("no training windows: every training sequence has fewer than 2 items")
    optimiser = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    use_bf16 = device.type == "cuda"
    n_negatives = None if cfg.loss == "full" else cfg.n_negatives
    ndcg_key, hr_key = val_keys(cfg.eval_k)
    inputs, targets = data.inputs.to(device), data.targets.to(device)
    history: list[dict[str, Any]] = []
    best = {"ndcg": -1.0, "epoch": 0, "state": None, "elapsed": 0.0}
    start, stale = time.perf_counter(), 0
    bar = _progress(progress)
    with bar:
        task = bar.add_task("train", total=cfg.epochs, epoch=0, loss=float("nan"), speed=0.0, val=0.0)
        for epoch in range(1, cfg.epochs + 1):
            t0 = time.perf_counter()
            model.train()
            order = torch.randperm(len(data), generator=gen).to(device)
            total, n_batches = 0.0, 0
            for b in range(0, len(data), cfg.batch_size):
                idx = order[b : b + cfg.batch_size]
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                    loss = model.loss(Batch(inputs[idx], targets[idx], n_negatives, gen))
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimiser.step()
                total += float(loss.detach())
                n_batches += 1
            seconds = time.perf_counter() - t0
            row: dict[str, Any] = {
                "epoch": epoch,
                "loss": total / max(n_batches, 1),
                "seqs_per_s": len(data) / max(seconds, 1e-9),
                "seconds": seconds,
                ndcg_key: float("nan"),
                hr_key: float("nan"),
            }
            if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
                model.eval()
                val = evaluate(model, split.valid, n_items=len(vocab), k=cfg.eval_k)[
                    "metrics"
                ]  # fp32: no bf16 ties
                row[ndcg_key], row[hr_key] = val[f"ndcg@{cfg.eval_k}"], val[f"hr@{cfg.eval_k}"]
                if row[ndcg_key] > best["ndcg"]:
                    best.update(ndcg=row[ndcg_key], epoch=epoch, elapsed=time.perf_counter() - start)
                    best["state"] = copy.deepcopy(model.state_dict())
                    stale = 0
                else:
                    stale += cfg.eval_every
            history.append(row)
            logger.info(
                "epoch done model=%s epoch=%d loss=%.4f %s=%.4f seqs_per_s=%.0f",
                model.name,
                epoch,
                row["loss"],
                ndcg_key,
                row[ndcg_key],
                row["seqs_per_s"],
            )
            if on_epoch is not None:
                on_epoch(row)
            bar.update(
                task, advance=1, epoch=epoch, loss=row["loss"], speed=row["seqs_per_s"], val=best["ndcg"]
            )
            if stale >= cfg.patience:
                logger.info("early stop epoch=%d best_epoch=%d", epoch, best["epoch"])
                break
            if cfg.max_train_seconds and time.perf_counter() - start > cfg.max_train_seconds:
                logger.info("time budget reached epoch=%d seconds=%.1f", epoch, time.perf_counter() - start)
                break
    if best["state"] is not None:
        model.load_state_dict(best["state"])
    model.eval()
    elapsed = time.perf_counter() - start
    train_s = sum(r["seconds"] for r in history)
    return TrainResult(
        model=model,
        history=history,
        best_epoch=int(best["epoch"]),
        best_val_ndcg=float(best["ndcg"]),
        eval_k=cfg.eval_k,
        seed=cfg.seed,
        device=str(device),
        train_seconds=elapsed,
        seconds_to_best=float(best["elapsed"]),
        seqs_per_s=len(data) * len(history) / max(train_s, 1e-9),
        config=model_config,
        train_config=cfg.model_dump(),
    )
