"""Train on a bare machine: ``python -m models.cli_train --data events.parquet --out model.pt``.

Needs only torch, numpy and pandas (pyarrow for Parquet) plus the pure-Python pydantic and rich: no
Prefect, MLflow, Feast or database import, so a lent GPU machine with the wheels of ``requirements.lock``
runs recloop's own trainer. The checkpoint it writes is the platform's (``models.checkpoint``), so
``recloop`` can register or evaluate it later.

Data: a Parquet (or CSV) file of events with ``user_id``, ``item_id``, ``timestamp`` (``received_at``
orders the history when present); ``--positive-types`` keeps only those ``event_type`` values (the
platform's event policy lives in the kernel, which models/ does not import: state it here). Split:
leave-one-out (last item test, the one before validation), validation NDCG@10 for early stopping.

Resumable: every epoch is checkpointed to ``--checkpoint-dir`` (default ``<out>.resume/``); rerun the
same command after a kill and it continues from the last finished epoch; the folder is removed after a
successful run. Several processes: ``torchrun --standalone --nproc_per_node N -m models.cli_train ...``
(DDP; gloo on CPU, NCCL on GPU; ``--batch-size`` is the global batch). Progress (epoch, loss, validation
NDCG, sequences/s, ETA) goes to stderr; with ``--json`` stdout holds exactly one JSON document.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.distributed as dist

from models.checkpoint import save_checkpoint, save_train_state
from models.factory import MODELS, build_config, config_fields
from models.sequences import build_sequences, leave_one_out
from models.trainer import TrainConfig, train_model
from models.vocab import ItemVocabulary

logger = logging.getLogger("models.cli_train")

#: Command-line options that are model-config fields (None = the model's default).
MODEL_OPTIONS = ("max_seq_len", "d_model", "n_heads", "n_layers", "dropout")
#: Command-line options that are ``TrainConfig`` fields.
TRAIN_OPTIONS = ("epochs", "batch_size", "lr", "weight_decay", "patience", "seed", "device", "num_threads", "loss",
                 "n_negatives", "n_in_batch", "lr_schedule", "warmup", "max_train_seconds")


def read_events(path: str | Path, positive_types: list[str] | None = None) -> pd.DataFrame:
    """The events of a Parquet or CSV file, optionally only the rows whose ``event_type`` is listed.

    Raises:
        FileNotFoundError: no such file. ValueError: a required column is missing, or no rows are left.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--data {path}: no such file")
    frame = pd.read_csv(path) if path.suffix == ".csv" else pd.read_parquet(path)
    missing = {"user_id", "item_id", "timestamp"} - set(frame.columns)
    if missing:
        raise ValueError(f"--data {path}: missing columns {sorted(missing)}; need user_id, item_id, timestamp")
    if positive_types:
        if "event_type" not in frame.columns:
            raise ValueError(f"--positive-types given but {path} has no event_type column")
        frame = frame[frame["event_type"].astype(str).isin(positive_types)]
    if frame.empty:
        raise ValueError(f"--data {path}: no events left")
    frame = frame.assign(user_id=frame["user_id"].astype(str), item_id=frame["item_id"].astype(str))
    return frame


def init_distributed() -> tuple[int, int, str | None]:
    """Join the ``torchrun`` process group when ``WORLD_SIZE`` > 1: ``(rank, world, device or None)``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, None
    cuda = torch.cuda.is_available()
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    return dist.get_rank(), world, (f"cuda:{local}" if cuda else "cpu")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train as the options say and write the checkpoint (rank 0). Returns the JSON report."""
    rank, world, ddp_device = init_distributed()
    try:
        events = read_events(args.data, args.positive_types.split(",") if args.positive_types else None)
        vocab = ItemVocabulary.from_ids(sorted(events["item_id"].unique()))
        split = leave_one_out(build_sequences(events, vocab))
        model_params = {k: getattr(args, k) for k in MODEL_OPTIONS
                        if getattr(args, k) is not None and k in config_fields(args.model)}
        model_params.setdefault("max_seq_len", 50)
        model_config = build_config(args.model, n_items=len(vocab), **model_params)
        train_params = {**MODELS[args.model].train_defaults,
                        **{k: getattr(args, k) for k in TRAIN_OPTIONS if getattr(args, k) is not None}}
        if ddp_device is not None:
            train_params["device"] = ddp_device
        out = Path(args.out)
        resume_dir = Path(args.checkpoint_dir) if args.checkpoint_dir else out.with_name(out.name + ".resume")
        t0 = time.perf_counter()
        result = train_model(split, vocab, model_config, TrainConfig(**train_params),
                             progress=sys.stderr.isatty() and not args.json, checkpoint_dir=resume_dir)
        report = {
            "checkpoint": str(out), "model": args.model, "device": result.device, "world_size": world,
            "loss": result.loss, "best_epoch": result.best_epoch, "best_val_ndcg@10": result.best_val_ndcg,
            "epochs_run": len(result.history), "resumed_from_epoch": result.resumed_from_epoch,
            "seqs_per_s": result.seqs_per_s, "seconds_to_best": result.seconds_to_best,
            "wall_s": time.perf_counter() - t0, "history": result.history,
            "model_config": model_config.__dict__, "train_config": result.train_config,
            "protocol": {**split.protocol, "data": str(args.data), "positive_types": args.positive_types or "all",
                         "validation": "leave-one-out, full ranking, seen items excluded"},
        }
        if rank == 0:
            save_checkpoint(out, result.model, vocab, {"best_epoch": result.best_epoch, "seed": result.seed,
                                                       "history": result.history})
            save_train_state(out.with_name(out.name + ".train_state"), result.train_state)
            shutil.rmtree(resume_dir, ignore_errors=True)  # finished: a rerun trains afresh
        return report
    finally:
        if world > 1:
            dist.destroy_process_group()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m models.cli_train", description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="Parquet or CSV events file (user_id, item_id, timestamp)")
    p.add_argument("--out", required=True, help="Checkpoint file to write")
    p.add_argument("--checkpoint-dir", help="Resume folder (default <out>.resume)")
    p.add_argument("--model", default="sasrec", choices=sorted(MODELS))
    p.add_argument("--positive-types", help="Comma-separated event_type values to train on (default: all rows)")
    p.add_argument("--json", action="store_true", help="One JSON document on stdout")
    for name in ("max_seq_len", "d_model", "n_heads", "n_layers"):
        p.add_argument("--" + name.replace("_", "-"), type=int, dest=name)
    p.add_argument("--dropout", type=float)
    for name in ("epochs", "batch_size", "patience", "seed", "num_threads", "n_negatives", "n_in_batch"):
        p.add_argument("--" + name.replace("_", "-"), type=int, dest=name)
    for name in ("lr", "weight_decay", "warmup", "max_train_seconds"):
        p.add_argument("--" + name.replace("_", "-"), type=float, dest=name)
    p.add_argument("--device", help="auto | cpu | cuda[:n]")
    p.add_argument("--loss", choices=["auto", "full", "sampled"])
    p.add_argument("--lr-schedule", choices=["constant", "cosine"], dest="lr_schedule")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point: 0 on success, 2 on bad input (one line on stderr)."""
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    try:
        report = run(args)
    except (FileNotFoundError, ValueError) as err:
        print(f"cli_train: {err}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        if args.json:
            print(json.dumps(report, default=str))
        else:
            print(f"wrote {report['checkpoint']}: best epoch {report['best_epoch']} val NDCG@10 "
                  f"{report['best_val_ndcg@10']:.4f} ({report['seqs_per_s']:.0f} seq/s, {report['device']}, "
                  f"{report['world_size']} process(es))")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
