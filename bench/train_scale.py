"""Training at catalogue scale: full vs sampled softmax on synthetic sequences (issue 19's must-show).

For each catalogue size (default 10,000 and 50,000 items; about 1,000,000 events over 10,000 users):

1. Throughput over a fixed step budget: sequences/s of the full softmax and of the sampled softmax
   (256 in-batch targets + ``n_negatives`` uniform negatives, logQ-corrected, ``models.losses``), after
   two warm-up steps, with the peak memory of each phase (resident set growth sampled every 10 ms on CPU;
   ``torch.cuda.max_memory_allocated`` on CUDA).
2. The sampled softmax trained to its best epoch (early stopping on validation NDCG@10): time to the
   best epoch, best epoch, validation and test NDCG@10 (full ranking, seen items excluded, leave-one-out).
3. At the smallest size (default 10,000 items) the full softmax trained for the same number of epochs:
   its NDCG@10, the relative gap, and the per-epoch speed-up of the sampled loss.

Data: each user starts at a Zipf-popular item and walks: with probability 0.75 to one of the current
item's 4 fixed successors, else to a Zipf-popular item (exponent 0.8); lengths are geometric around
events/users (at least 5). Learnable, popularity-skewed (so the logQ correction matters), seeded.

Usage::

    python -m bench.train_scale --json                                  # the full size (hours on 2 CPU cores)
    python -m bench.train_scale --items 10000 --users 2000 --events 200000 --epochs 6 --json   # reduced

Prints exactly one JSON document on stdout with ``--json``; progress (epochs, loss, NDCG, seq/s, ETA) on stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time
from typing import Any

import numpy as np
import psutil
import torch

from models.contract import Batch
from models.losses import SAMPLED_SOFTMAX_MIN_ITEMS, item_target_prob
from models.metrics import evaluate
from models.sasrec import SASRecConfig
from models.sequences import SequenceDataset, leave_one_out
from models.trainer import TrainConfig, make_optimizer, resolve_device, set_seed, train_model
from models.vocab import ItemVocabulary

logger = logging.getLogger("bench.train_scale")


def synthetic_sequences(n_items: int, n_users: int, n_events: int, seed: int = 0) -> dict[str, np.ndarray]:
    """``n_users`` item_idx sequences (1..n_items) totalling about ``n_events`` (see the module docstring)."""
    rng = np.random.default_rng(seed)
    mean_len = max(n_events / n_users, 6.0)
    lengths = np.maximum(rng.geometric(1.0 / (mean_len - 4.0), n_users) + 4, 5)
    lengths = np.minimum(lengths, int(mean_len * 8))
    pop = 1.0 / (np.arange(n_items) + 10.0) ** 0.8
    pop /= pop.sum()
    perm = rng.permutation(n_items) + 1  # popularity rank -> item_idx
    successors = rng.integers(1, n_items + 1, size=(n_items + 1, 4))
    steps = int(lengths.max())
    walks = np.zeros((n_users, steps), dtype=np.int64)
    walks[:, 0] = perm[rng.choice(n_items, n_users, p=pop)]
    for t in range(1, steps):
        follow = rng.random(n_users) < 0.75
        nxt = successors[walks[:, t - 1], rng.integers(0, 4, n_users)]
        jump = perm[rng.choice(n_items, n_users, p=pop)]
        walks[:, t] = np.where(follow, nxt, jump)
    return {f"u{u}": walks[u, : lengths[u]] for u in range(n_users)}


class PeakMemory:
    """Peak memory growth of a phase, in MiB: CUDA allocator peak, or the process RSS sampled every 10 ms."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak, self._stop = device, 0, threading.Event()

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return self
        self.proc = psutil.Process()
        self.base = self.peak = self.proc.memory_info().rss
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self.thread.join()
            self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def mib(self) -> float:
        return (self.peak - self.base) / 2**20


def throughput(seqs: dict[str, np.ndarray], n_items: int, cfg: SASRecConfig, tcfg: TrainConfig, loss: str,
               steps: int) -> dict[str, Any]:
    """Sequences/s of ``steps`` training steps (after 2 warm-up steps) and the phase's peak memory."""
    set_seed(tcfg.seed)
    device = resolve_device(tcfg.device, tcfg.num_threads)
    from models.factory import build_model

    model = build_model(cfg).to(device).train()
    optimiser = make_optimizer(model, tcfg.lr, tcfg.weight_decay)
    data = SequenceDataset(list(seqs.values()), cfg.max_seq_len)
    gen = torch.Generator().manual_seed(tcfg.seed)
    prob = item_target_prob(data.targets, n_items).to(device) if loss == "sampled" else None
    negatives = tcfg.n_negatives if loss == "sampled" else None
    inputs, targets = data.inputs.to(device), data.targets.to(device)
    order = torch.randperm(len(data), generator=gen)

    def step(i: int) -> None:
        idx = order[(i * tcfg.batch_size) % len(data):][: tcfg.batch_size].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            value = model.loss(Batch(inputs[idx], targets[idx], negatives, gen, prob, tcfg.n_in_batch))
        optimiser.zero_grad(set_to_none=True)
        value.backward()
        optimiser.step()

    with PeakMemory(device) as mem:
        for i in range(2):
            step(i)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(2, steps + 2):
            step(i)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    rate = steps * tcfg.batch_size / seconds
    logger.info("throughput n_items=%d loss=%s seqs_per_s=%.0f peak_mem_mib=%.0f", n_items, loss, rate, mem.mib)
    return {"seqs_per_s": rate, "seconds": seconds, "steps": steps, "peak_mem_mib": mem.mib}


def fit(split: Any, vocab: ItemVocabulary, cfg: SASRecConfig, tcfg: TrainConfig) -> dict[str, Any]:
    """Train to the best validation epoch; test NDCG@10 once; time to best; seconds per epoch."""
    device = resolve_device(tcfg.device, tcfg.num_threads)
    with PeakMemory(device) as mem:
        result = train_model(split, vocab, cfg, tcfg, progress=False)
    test = evaluate(result.model, split.test, n_items=len(vocab), k=10)["metrics"]
    return {"loss": result.loss, "best_epoch": result.best_epoch, "epochs_run": len(result.history),
            "val_ndcg@10": result.best_val_ndcg, "test_ndcg@10": test["ndcg@10"], "test_hr@10": test["hr@10"],
            "seconds_to_best": result.seconds_to_best, "train_seconds": result.train_seconds,
            "epoch_seconds_mean": float(np.mean([h["seconds"] for h in result.history])),
            "seqs_per_s": result.seqs_per_s, "peak_mem_mib": mem.mib}


def run(items: list[int], users: int, events: int, *, steps: int = 30, epochs: int = 20, patience: int = 3,
        n_negatives: int = 256, d_model: int = 64, max_seq_len: int = 50, batch_size: int = 128, seed: int = 0,
        device: str = "auto", threads: int | None = None, lr: float = 3e-3) -> dict[str, Any]:
    """The benchmark (see the module docstring); returns the JSON report."""
    base = TrainConfig(batch_size=batch_size, epochs=epochs, patience=patience, seed=seed, device=device,
                       num_threads=threads, n_negatives=n_negatives, lr=lr)
    results = []
    for n_items in items:
        t0 = time.perf_counter()
        seqs = synthetic_sequences(n_items, users, events, seed)
        vocab = ItemVocabulary([f"i{k}" for k in range(1, n_items + 1)])
        split = leave_one_out(seqs)
        cfg = SASRecConfig(n_items=n_items, max_seq_len=max_seq_len, d_model=d_model, n_heads=2, n_layers=2,
                           dropout=0.2)
        row: dict[str, Any] = {"n_items": n_items, "n_users": users, "n_events": int(sum(map(len, seqs.values()))),
                               "throughput": {}}
        for loss in ("full", "sampled"):
            row["throughput"][loss] = throughput(seqs, n_items, cfg, base, loss, steps)
        row["throughput"]["sampled_speedup"] = (row["throughput"]["sampled"]["seqs_per_s"]
                                                / row["throughput"]["full"]["seqs_per_s"])
        row["sampled"] = fit(split, vocab, cfg, base.model_copy(update={"loss": "sampled"}))
        if n_items == min(items):
            same = base.model_copy(update={"loss": "full", "epochs": max(row["sampled"]["best_epoch"], 1),
                                           "patience": 10**6})
            row["full_same_epochs"] = full = fit(split, vocab, cfg, same)
            row["sampled_vs_full"] = {
                "test_ndcg_rel_diff": (row["sampled"]["test_ndcg@10"] - full["test_ndcg@10"])
                / max(full["test_ndcg@10"], 1e-12),
                "val_ndcg_rel_diff": (row["sampled"]["val_ndcg@10"] - full["val_ndcg@10"])
                / max(full["val_ndcg@10"], 1e-12),
                "epoch_speedup": full["epoch_seconds_mean"] / row["sampled"]["epoch_seconds_mean"],
            }
        row["wall_s"] = time.perf_counter() - t0
        results.append(row)
    dev = resolve_device(device, threads)
    return {
        "benchmark": "train_scale",
        "protocol": {
            "data": "synthetic Zipf(0.8) popularity + 4 fixed successors per item (p=0.75), geometric lengths",
            "seed": seed, "users": users, "events_target": events, "items": items,
            "model": {"class": "sasrec", "d_model": d_model, "n_layers": 2, "n_heads": 2, "max_seq_len": max_seq_len,
                      "dropout": 0.2},
            "train": {"batch_size": batch_size, "lr": lr, "epochs_max": epochs, "patience": patience,
                      "n_negatives": n_negatives, "n_in_batch": base.n_in_batch,
                      "sampled": "n_in_batch in-batch targets + n_negatives uniform, logQ-corrected"},
            "throughput_steps": steps, "split": "leave-one-out; full ranking, seen excluded; NDCG@10",
            "device": str(dev), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "auto_sampled_above_items": SAMPLED_SOFTMAX_MIN_ITEMS,
            "memory": "peak growth over the phase: CUDA allocator, else RSS sampled every 10 ms",
        },
        "results": results,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--items", type=int, nargs="+", default=[10_000, 50_000])
    p.add_argument("--users", type=int, default=10_000)
    p.add_argument("--events", type=int, default=1_000_000)
    p.add_argument("--steps", type=int, default=30, help="Throughput step budget per loss")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--patience", type=int, default=3)
    p.add_argument("--negatives", type=int, default=256)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--max-seq-len", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int)
    p.add_argument("--json", action="store_true", help="Exactly one JSON document on stdout")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    report = run(args.items, args.users, args.events, steps=args.steps, epochs=args.epochs, patience=args.patience,
                 n_negatives=args.negatives, d_model=args.d_model, max_seq_len=args.max_seq_len,
                 batch_size=args.batch_size, seed=args.seed, device=args.device, threads=args.threads, lr=args.lr)
    report["command"] = "python -m bench.train_scale " + " ".join(argv if argv is not None else sys.argv[1:])
    report["command_full_size"] = "python -m bench.train_scale --json"
    if args.json:
        print(json.dumps(report, default=float))
    else:
        for row in report["results"]:
            t = row["throughput"]
            print(f"{row['n_items']} items: full {t['full']['seqs_per_s']:.0f} seq/s, sampled "
                  f"{t['sampled']['seqs_per_s']:.0f} seq/s; sampled best epoch {row['sampled']['best_epoch']} "
                  f"in {row['sampled']['seconds_to_best']:.0f} s, test NDCG@10 {row['sampled']['test_ndcg@10']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
