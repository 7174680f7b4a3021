"""GPU smoke check: one epoch of a registered model (SASRec+ by default) with bf16 autocast on synthetic
sequences, with throughput. It trains through the model contract (``loss(Batch)``), as the trainer does.

Run on a machine with CUDA: ``python -m bench.gpu_check [--model sasrec|gru4rec] [--users N] [--items N]
[--seq-len N]``.
Prints one JSON object (device, seconds, sequences/s, tokens/s, loss, peak memory). Synthetic data
keeps it independent of datasets; sizes default to an ML-1M-like workload.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np
import torch

from models.contract import Batch
from models.factory import build_config, build_model
from models.sequences import SequenceDataset


def gpu_throughput(
    n_users: int = 6000,
    n_items: int = 3700,
    seq_len: int = 200,
    batch_size: int = 128,
    d_model: int = 64,
    device: str = "cuda",
    seed: int = 0,
    model_name: str = "sasrec",
) -> dict[str, Any]:
    """Train one epoch on ``n_users`` random sequences of length ``seq_len`` and time it.

    Returns:
        ``{"model", "device", "bf16", "seconds", "seqs_per_s", "tokens_per_s", "loss_first", "loss_last",
        "peak_mem_mib"}``; bf16 autocast is on whenever the device is CUDA.
    Raises:
        ValueError: CUDA requested but not available.
    """
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but torch.cuda.is_available() is False")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    seqs = [rng.integers(1, n_items + 1, size=seq_len + 1) for _ in range(n_users)]
    data = SequenceDataset(seqs, seq_len)
    params = {"n_items": n_items, "max_seq_len": seq_len, "d_model": d_model}
    if model_name == "sasrec":
        params["n_heads"] = 2
    model = build_model(build_config(model_name, **params)).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    inputs, targets = data.inputs.to(dev), data.targets.to(dev)
    use_bf16 = dev.type == "cuda"
    losses: list[float] = []

    def step(idx: torch.Tensor) -> float:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss = model.loss(Batch(inputs[idx], targets[idx]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    step(torch.arange(min(batch_size, len(data)), device=dev))  # warm-up (kernels, allocator)
    if use_bf16:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for b in range(0, len(data), batch_size):
        losses.append(step(torch.arange(b, min(b + batch_size, len(data)), device=dev)))
    if use_bf16:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {
        "model": model_name,
        "device": torch.cuda.get_device_name(dev) if use_bf16 else "cpu",
        "bf16": use_bf16,
        "seconds": seconds,
        "seqs_per_s": len(data) / seconds,
        "tokens_per_s": int((targets > 0).sum()) / seconds,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "peak_mem_mib": torch.cuda.max_memory_allocated(dev) / 2**20 if use_bf16 else None,
    }


def main() -> None:
    """Entry point: parse sizes, run one epoch, print the JSON result."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=6000)
    parser.add_argument("--items", type=int, default=3700)
    parser.add_argument("--seq-len", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="sasrec", help="a name in models.factory.MODELS")
    args = parser.parse_args()
    result = gpu_throughput(args.users, args.items, args.seq_len, args.batch_size, device=args.device,
                            model_name=args.model)
    print(json.dumps(result))  # script output, not library logging


if __name__ == "__main__":
    main()
