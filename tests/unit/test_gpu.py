"""GPU check: one bf16 epoch on CUDA (skipped without CUDA); the CPU path of the same code always runs."""

from __future__ import annotations

import pytest
import torch

from bench.gpu_check import gpu_throughput


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_one_bf16_epoch_on_gpu_reports_throughput() -> None:
    result = gpu_throughput(n_users=512, n_items=1000, seq_len=50)
    assert result["bf16"] is True
    assert result["seqs_per_s"] > 0 and result["loss_last"] < result["loss_first"] + 1.0


def test_check_runs_on_cpu_and_rejects_missing_cuda() -> None:
    result = gpu_throughput(n_users=16, n_items=20, seq_len=8, batch_size=8, d_model=16, device="cpu")
    assert result["bf16"] is False and result["seqs_per_s"] > 0
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cuda"):
            gpu_throughput(n_users=4, n_items=5, seq_len=4, device="cuda")
