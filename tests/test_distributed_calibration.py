"""Two gloo processes on CPU calibrate on different data and end with identical ranges (issue 3, point 4)."""

from __future__ import annotations

import datetime
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

METHODS = ("minmax", "moving_average", "percentile", "mse", "entropy", "auto")
RECIPE = {"weight": {"format": "nf4"}, "activation": {"mode": "static"}}


def _model() -> nn.Module:
    torch.manual_seed(0)  # the same weights on every rank, as DDP guarantees
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))


def _batches(rank: int) -> list[torch.Tensor]:
    """Different data per rank: other scales, and outliers on rank 1 only."""
    generator = torch.Generator().manual_seed(100 + rank)
    batches = [torch.randn(32, 64, generator=generator) * (1 + 2 * rank) for _ in range(3)]
    if rank == 1:
        batches[0][0, 5] = 40.0
    return batches


def _calibrated_state(method: str, rank: int) -> dict[str, dict[str, object]]:
    from lightning_quant import calibrate, prepare

    model = _model()
    prepare(model, RECIPE)
    calibrate(model, _batches(rank), config={"method": method, "weight_clipping": True})
    state: dict[str, dict[str, object]] = {}
    for name in ("0", "2"):
        layer = model.get_submodule(name)
        lo, hi = layer.input_observer.range()
        state[name] = {
            "range": (float(lo), float(hi)),
            "observer": type(layer.input_observer).__name__,
            "multiplier": None if layer.weight_multiplier is None else layer.weight_multiplier.clone(),
        }
    return state


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    os.environ["TQDM_DISABLE"] = "1"
    torch.set_num_threads(1)
    # A short timeout: a rank that fails must not leave the other waiting for half an hour.
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=120))
    try:
        results = {method: _calibrated_state(method, rank) for method in METHODS}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_two_gloo_ranks_end_with_identical_ranges_and_clipping(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    print("\nfirst layer's input range after calibration on 2 ranks (rank 0 | rank 1):")
    for method in METHODS:
        for name in ("0", "2"):
            a, b = rank0[method][name], rank1[method][name]
            assert a["range"] == b["range"], (method, name)
            assert a["observer"] == b["observer"], (method, name)
            if method in ("minmax", "moving_average"):
                assert a["multiplier"] is None and b["multiplier"] is None  # these never clip weights
            else:
                assert torch.equal(a["multiplier"], b["multiplier"]), (method, name)
        r0, r1 = rank0[method]["0"]["range"], rank1[method]["0"]["range"]
        kind = rank0[method]["0"]["observer"]
        print(f"  {method:15s} [{r0[0]:8.3f}, {r0[1]:8.3f}] | [{r1[0]:8.3f}, {r1[1]:8.3f}]  ({kind})")
    assert bool((rank0["mse"]["0"]["multiplier"] < 1).any())  # the output-error clipping search ran
    # Known answer for minmax: the extremes of both ranks' data together.
    union = torch.cat(_batches(0) + _batches(1))
    assert rank0["minmax"]["0"]["range"] == (float(union.min()), float(union.max()))
    # Each rank alone would have ended elsewhere: the statistics really were reduced.
    alone = torch.cat(_batches(0))
    assert rank0["minmax"]["0"]["range"] != (float(alone.min()), float(alone.max()))
