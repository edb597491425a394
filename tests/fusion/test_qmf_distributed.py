"""QMF's loss history under torch.distributed: every rank ends with the history of ALL ranks' samples."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from medfusion.fusion.qmf import QMFHead


def _worker(rank: int, init_file: str, out_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        head = QMFHead(["a", "b"], {"a": 3, "b": 3}, num_classes=2, num_samples=4)
        idx = torch.tensor([rank * 2, rank * 2 + 1])  # rank 0: samples 0, 1; rank 1: samples 2, 3
        losses = torch.tensor([[1.0, 2.0], [3.0, 4.0]]) + 10 * rank
        mask = torch.tensor([[True, False], [True, True]])
        head.update_history(idx, losses, mask)
        if rank == 1:
            torch.save({"history": head.history, "count": head.history_count}, out_file)
    finally:
        dist.destroy_process_group()


def test_history_is_all_gathered(tmp_path):
    out = tmp_path / "rank1.pt"
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    got = torch.load(out)
    expected = torch.tensor([[1.0, 0.0], [3.0, 4.0], [11.0, 0.0], [13.0, 14.0]])
    torch.testing.assert_close(got["history"], expected.to(got["history"].dtype))
    assert got["count"].tolist() == [[1, 0], [1, 1], [1, 0], [1, 1]]
