"""Training loop for any registered sequential model. It uses only the model contract (``models.contract``).

- AdamW, fused where the device supports it (else foreach), with nanoGPT's weight-decay groups (no decay
  on biases, LayerNorm or embeddings), linear warm-up then cosine decay to ``min_lr_ratio`` (``lr_factor``).
- Loss: the full softmax over the catalogue (SASRec+), or, above ``models.losses.SAMPLED_SOFTMAX_MIN_ITEMS``
  items (``loss='auto'``), the in-batch + uniform sampled softmax with the logQ correction.
- Early stopping on validation NDCG@K, scored in chunks of users (bounded memory).
- Resumable: with ``checkpoint_dir`` every epoch writes ``last.pt`` (weights, optimiser, scheduler,
  generator and RNG states, epoch, best-so-far, history); a rerun with the same data and config continues
  from the epoch after it. A warm start continues the previous model's optimiser moments, item rows
  remapped by id (``models.checkpoint.remap_optimizer_state``).
- Data-parallel: when ``torch.distributed`` is initialised (``torchrun``; gloo on CPU, NCCL on GPU) each
  process takes its share of every global batch and DDP averages the gradients.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from pydantic import BaseModel, Field
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import Tensor, nn

from models.checkpoint import (
    load_named_optimizer_state,
    load_train_state,
    named_optimizer_state,
    remap_optimizer_state,
    save_train_state,
    warm_start_state,
)
from models.contract import Batch, ItemSequenceModel
from models.factory import build_model
from models.losses import choose_loss, item_target_prob
from models.metrics import evaluate
from models.sequences import SequenceDataset, Split
from models.vocab import ItemVocabulary

logger = logging.getLogger(__name__)

#: The file a resumable run keeps in its ``checkpoint_dir``.
RESUME_FILE = "last.pt"
RESUME_FORMAT = 1


class TrainConfig(BaseModel):
    """Training knobs (not architecture): passed as a flow parameter and recorded with each run."""

    lr: float = Field(default=3e-3, gt=0, description="AdamW peak learning rate (tuned on ml-100k validation)")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW decoupled weight decay (matrices only)")
    batch_size: int = Field(default=64, ge=1, description="Training windows per step (global, over all processes)")
    epochs: int = Field(default=100, ge=1, description="Upper bound on epochs (also the cosine schedule's length)")
    patience: int = Field(default=8, ge=1, description="Epochs without val NDCG@K gain before stopping")
    eval_every: int = Field(default=1, ge=1, description="Validate every N epochs")
    seed: int = Field(default=42, description="Seeds torch, numpy and random")
    device: str = Field(default="auto", description="'auto' (CUDA if present), 'cpu' or 'cuda[:n]'")
    num_threads: int | None = Field(default=None, ge=1, description="CPU threads; None = all cores")
    loss: Literal["auto", "full", "sampled"] = Field(
        default="auto", description="Full or sampled softmax CE; 'auto' = sampled above SAMPLED_SOFTMAX_MIN_ITEMS")
    n_negatives: int = Field(default=256, ge=1, description="Uniform negatives of the sampled softmax")
    n_in_batch: int = Field(default=256, ge=0, description="Sampled softmax: how many of the batch's targets are "
                                                           "negatives too (logQ-corrected); 0 = uniform only")
    # Constant by default: the defaults (lr, epochs, patience) were tuned with it, and a cosine horizon of
    # ``epochs`` decays too early for short budgets (an 8-epoch toy fit lost a third of its top-1 accuracy).
    lr_schedule: Literal["cosine", "constant"] = Field(default="constant", description="After the warm-up")
    warmup: float = Field(default=0.0, ge=0, lt=1, description="Share of the step budget spent warming up")
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1, description="Cosine floor as a share of lr")
    grad_clip: float | None = Field(default=1.0, description="Max gradient norm; None disables")
    max_train_seconds: float | None = Field(default=None, gt=0, description="Wall-clock budget")
    all_windows: bool = Field(default=True, description="Cut long sequences into windows (every position)")
    eval_k: int = Field(default=10, ge=1, description="K of the validation metric")
    eval_batch_size: int = Field(default=512, ge=1, description="Users scored per validation chunk (memory bound)")


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
    #: ``{"optimizer": named_optimizer_state at the best epoch, "epoch": best epoch}`` (warm starts continue it)
    train_state: dict[str, Any] = field(default_factory=dict)
    loss: str = "full"
    resumed_from_epoch: int = 0
    world_size: int = 1


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


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.1,
              schedule: str = "cosine") -> float:
    """Multiplier of the peak learning rate for optimiser step ``step`` (0-based), as nanoGPT does.

    Warm-up: ``(step + 1) / (warmup_steps + 1)`` for ``step < warmup_steps``; then ``1`` (constant) or the
    cosine ``min_ratio + (1 - min_ratio) * 0.5 * (1 + cos(pi * t))`` with
    ``t = (step - warmup_steps) / (total_steps - warmup_steps)`` clipped to [0, 1] (Loshchilov & Hutter,
    SGDR, ICLR 2017). Pure.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    t = min(max((step - warmup_steps) / max(total_steps - warmup_steps, 1), 0.0), 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups as in nanoGPT: decay on weight matrices only; biases, LayerNorm and embeddings
    (item and position tables) are not decayed. Empty groups are left out."""
    no_decay_ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.Embedding | nn.LayerNorm):
            no_decay_ids.update(id(p) for p in module.parameters(recurse=False))
    decay, keep = [], []
    for param in model.parameters():
        if param.requires_grad:
            (keep if param.dim() < 2 or id(param) in no_decay_ids else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW over ``param_groups``: the fused kernel where the device supports it, else foreach."""
    groups = param_groups(model, weight_decay)
    try:
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    except (RuntimeError, ValueError, TypeError):  # no fused kernel for this device / dtype
        return torch.optim.AdamW(groups, lr=lr, foreach=True)


def distributed_context() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialised ``torch.distributed`` group, else ``(0, 1)``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _LossStep(nn.Module):
    """``model.loss`` as a module's forward, so DistributedDataParallel can wrap it (it syncs gradients
    only for work done through its own forward)."""

    def __init__(self, model: ItemSequenceModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: Tensor, targets: Tensor, n_negatives: int | None, generator: torch.Generator | None,
                item_prob: Tensor | None, n_in_batch: int | None = None) -> Tensor:
        return self.model.loss(Batch(inputs, targets, n_negatives, generator, item_prob, n_in_batch))


def _fingerprint(model_config: Any, cfg: TrainConfig, data: SequenceDataset, init_state: dict[str, Any] | None) -> str:
    """What a resumed run must share with the one that wrote the checkpoint: data, architecture, knobs."""
    digest = hashlib.sha256()
    knobs = cfg.model_dump(exclude={"device", "num_threads", "max_train_seconds", "eval_batch_size"})
    digest.update(json.dumps({"model": repr(model_config), "train": knobs,
                              "init": (init_state or {}).get("item_vocab_version")}, sort_keys=True).encode())
    digest.update(data.inputs.numpy().tobytes())
    digest.update(data.targets.numpy().tobytes())
    return digest.hexdigest()


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("epoch {task.fields[epoch]}"),
        BarColumn(),
        TextColumn(
            "loss {task.fields[loss]:.4f} | {task.fields[speed]:.0f} seq/s | val ndcg {task.fields[val]:.4f}"
        ),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),  # stdout stays clean for --json
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
    checkpoint_dir: str | Path | None = None,
    item_text: np.ndarray | None = None,
) -> TrainResult:
    """Train the model ``model_config`` describes on ``split.train``; keep the epoch with the best
    validation NDCG@K (K = ``train_config.eval_k``).

    Every position of every training sequence is a next-item target (``SequenceDataset``); the loss
    is the model's own ``loss(Batch)``: the full softmax, or the sampled one (``models.losses.choose_loss``).
    On CUDA the forward pass runs under bf16 autocast; on CPU in fp32 with all cores. Under an initialised
    ``torch.distributed`` group each process takes every ``world_size``-th window of each global batch
    (DDP averages the gradients); every process validates (the same numbers), rank 0 alone writes.

    Args:
        split: from ``leave_one_out`` / ``temporal_split``; indices refer to ``vocab``.
        vocab: the item vocabulary; ``model_config.n_items`` must equal ``len(vocab)``.
        model_config: a registered model's frozen config (``models.factory``), the architecture.
        train_config: training knobs (defaults if None).
        init_state: a checkpoint dict (``{"config", "state_dict", "vocab"}``) to warm-start from;
            items new in ``vocab`` get fresh embedding rows, known items keep theirs. With
            ``init_state["train_state"]["optimizer"]`` (a ``TrainResult.train_state``) the optimiser
            moments continue too (remapped to ``vocab``); without it the optimiser starts fresh.
        progress: show a rich progress bar on stderr (loss, seq/s, val NDCG, ETA).
        on_epoch: called with each epoch's history dict (e.g. to log metrics), after its checkpoint.
        checkpoint_dir: where ``last.pt`` is kept; when it holds a checkpoint of the same data and
            config, training resumes after its epoch (else it is overwritten). None: not resumable.
        item_text: (n_items + 1, d_text) frozen text embeddings of ``vocab``'s items (row 0 padding) for a
            text-aware ``model_config`` (``item_repr`` "id+text" | "text"; ``models.text_items.text_matrix``).
    Returns:
        ``TrainResult`` with the best model (eval mode, on the training device) and per-epoch history
        dicts ``{epoch, loss, val_ndcg@K, val_hr@K, seqs_per_s, seconds, lr, eta_s}``.
    Raises:
        ValueError: vocabulary / config size mismatch or no training windows.
        TypeError: ``model_config`` belongs to no registered model.
    """
    cfg = train_config or TrainConfig()
    if model_config.n_items != len(vocab):
        raise ValueError(f"model_config.n_items={model_config.n_items} but len(vocab)={len(vocab)}")
    set_seed(cfg.seed)
    rank, world = distributed_context()
    device = resolve_device(cfg.device, cfg.num_threads)
    model = build_model(model_config)
    if init_state is not None:
        model.load_state_dict(warm_start_state(init_state, model, vocab))
    if item_text is not None:
        model.set_item_text(item_text)  # after the warm start: this vocabulary's rows, never the old ones
    elif getattr(model, "uses_text", False):
        raise ValueError(f"item_repr={model_config.item_repr!r} needs item_text ((n_items + 1, d_text) array)")
    model.to(device)
    data = SequenceDataset(split.train, model_config.max_seq_len, all_windows=cfg.all_windows)
    if len(data) == 0:
        raise ValueError("no training windows: every training sequence has fewer than 2 items")
    optimiser = make_optimizer(model, cfg.lr, cfg.weight_decay)
    if init_state is not None and (init_state.get("train_state") or {}).get("optimizer"):
        named = remap_optimizer_state(init_state["train_state"]["optimizer"],
                                      ItemVocabulary.from_dict(init_state["vocab"]), model, vocab)
        loaded = load_named_optimizer_state(model, optimiser, named)
        logger.info("warm start continues the optimiser state of %d/%d parameters",
                    len(loaded), len(list(model.parameters())))
    steps_per_epoch = math.ceil(len(data) / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    warmup_steps = int(round(cfg.warmup * total_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda step: lr_factor(step, warmup_steps, total_steps, cfg.min_lr_ratio, cfg.lr_schedule))
    gen = torch.Generator().manual_seed(cfg.seed)
    use_bf16 = device.type == "cuda"
    loss_kind = choose_loss(cfg.loss, len(vocab))
    n_negatives = None if loss_kind == "full" else cfg.n_negatives
    item_prob = item_target_prob(data.targets, len(vocab)).to(device) if n_negatives else None
    ndcg_key, hr_key = val_keys(cfg.eval_k)
    inputs, targets = data.inputs.to(device), data.targets.to(device)
    step_fn: nn.Module = _LossStep(model)
    if world > 1:
        step_fn = nn.parallel.DistributedDataParallel(
            step_fn, device_ids=[device.index] if device.type == "cuda" else None)

    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {"ndcg": -1.0, "epoch": 0, "state": None, "optimizer": {}, "elapsed": 0.0}
    stale, done_before, start_epoch, stopped = 0, 0.0, 1, False
    resume_path = Path(checkpoint_dir) / RESUME_FILE if checkpoint_dir is not None else None
    fingerprint = _fingerprint(model_config, cfg, data, init_state) if resume_path is not None else ""
    saved = load_train_state(resume_path) if resume_path is not None else None
    if saved is not None and saved.get("format") == RESUME_FORMAT and saved.get("fingerprint") == fingerprint:
        model.load_state_dict(saved["model"])
        load_named_optimizer_state(model, optimiser, saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        gen.set_state(saved["generator"])
        torch.set_rng_state(saved["torch_rng"])
        if device.type == "cuda" and saved.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(saved["cuda_rng"], device)
        best, stale, history = saved["best"], int(saved["stale"]), list(saved["history"])
        done_before, start_epoch, stopped = float(saved["elapsed"]), int(saved["epoch"]) + 1, bool(saved["stopped"])
        logger.info("resuming from %s after epoch %d (best epoch %d)", resume_path, start_epoch - 1, best["epoch"])
    elif saved is not None:
        logger.warning("checkpoint %s belongs to other data or settings; starting afresh", resume_path)
    resumed_from = start_epoch - 1

    start = time.perf_counter() - done_before
    bar = _progress(progress and rank == 0)
    with bar:
        task = bar.add_task("train", total=cfg.epochs, completed=start_epoch - 1, epoch=start_epoch - 1,
                            loss=float("nan"), speed=0.0, val=max(best["ndcg"], 0.0))
        for epoch in range(start_epoch, cfg.epochs + 1):
            if stopped:
                break
            t0 = time.perf_counter()
            model.train()
            order = torch.randperm(len(data), generator=gen).to(device)
            total, n_batches = 0.0, 0
            for b in range(0, len(data), cfg.batch_size):
                idx = order[b : b + cfg.batch_size]
                if world > 1:
                    idx = idx[rank::world]  # this process's share of the global batch
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                    loss = step_fn(inputs[idx], targets[idx], n_negatives, gen, item_prob, cfg.n_in_batch)
                if world > 1:  # weight by this share of the batch's targets: the global mean, as one process
                    counts = (targets[idx] != 0).sum().reshape(1).to(torch.float64)
                    n_global = counts.clone()
                    dist.all_reduce(n_global)
                    loss = loss * (world * counts / n_global.clamp(min=1)).to(loss.dtype).squeeze()
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimiser.step()
                scheduler.step()
                total += float(loss.detach())
                n_batches += 1
            if world > 1:
                mean = torch.tensor([total / max(n_batches, 1)], dtype=torch.float64)
                dist.all_reduce(mean)
                epoch_loss = float(mean) / world
            else:
                epoch_loss = total / max(n_batches, 1)
            seconds = time.perf_counter() - t0
            row: dict[str, Any] = {
                "epoch": epoch,
                "loss": epoch_loss,
                "seqs_per_s": len(data) / max(seconds, 1e-9),
                "seconds": seconds,
                "lr": float(scheduler.get_last_lr()[0]),
                ndcg_key: float("nan"),
                hr_key: float("nan"),
            }
            if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
                model.eval()
                val = evaluate(model, split.valid, n_items=len(vocab), k=cfg.eval_k,
                               batch_size=cfg.eval_batch_size)["metrics"]  # fp32: no bf16 ties
                row[ndcg_key], row[hr_key] = val[f"ndcg@{cfg.eval_k}"], val[f"hr@{cfg.eval_k}"]
                if row[ndcg_key] > best["ndcg"]:
                    best.update(ndcg=row[ndcg_key], epoch=epoch, elapsed=time.perf_counter() - start)
                    best["state"] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
                    best["optimizer"] = named_optimizer_state(model, optimiser)
                    stale = 0
                else:
                    stale += cfg.eval_every
            row["eta_s"] = (cfg.epochs - epoch) * (sum(r["seconds"] for r in [*history, row]) / (len(history) + 1))
            history.append(row)
            if stale >= cfg.patience:
                logger.info("early stop epoch=%d best_epoch=%d", epoch, best["epoch"])
                stopped = True
            elif cfg.max_train_seconds and time.perf_counter() - start > cfg.max_train_seconds:
                logger.info("time budget reached epoch=%d seconds=%.1f", epoch, time.perf_counter() - start)
                stopped = True
            if resume_path is not None and rank == 0:
                save_train_state(resume_path, {
                    "format": RESUME_FORMAT, "fingerprint": fingerprint, "epoch": epoch, "stopped": stopped,
                    "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                    "optimizer": named_optimizer_state(model, optimiser), "scheduler": scheduler.state_dict(),
                    "generator": gen.get_state(), "torch_rng": torch.get_rng_state(), "best": best,
                    "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                    "stale": stale, "history": history, "elapsed": time.perf_counter() - start,
                })
            if rank == 0:
                logger.info(
                    "epoch done model=%s epoch=%d/%d loss=%.4f %s=%.4f seqs_per_s=%.0f lr=%.2e eta_s=%.0f",
                    model.name, epoch, cfg.epochs, row["loss"], ndcg_key, row[ndcg_key], row["seqs_per_s"],
                    row["lr"], row["eta_s"],
                )
            if on_epoch is not None:
                on_epoch(row)
            bar.update(task, advance=1, epoch=epoch, loss=row["loss"], speed=row["seqs_per_s"],
                       val=max(best["ndcg"], 0.0))
    if best["state"] is not None:
        model.load_state_dict(best["state"])
    if getattr(model, "cold_id_emb", None) is not None:  # items no training sequence holds: served as new items
        seen = np.zeros(len(vocab) + 1, dtype=bool)
        for seq in split.train.values():
            seen[np.asarray(seq, dtype=np.int64)] = True
        model.adopt_cold_id(torch.from_numpy(np.flatnonzero(~seen[1:]) + 1))
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
        train_state={"optimizer": best["optimizer"], "epoch": int(best["epoch"])},
        loss=loss_kind,
        resumed_from_epoch=resumed_from,
        world_size=world,
    )
