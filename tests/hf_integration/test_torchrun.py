"""Trainer + QuantizationTrainerCallback under ``torchrun --nproc_per_node 2`` (CPU, gloo)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).with_name("torchrun_trainer.py")


def _torchrun() -> list[str]:
    beside = Path(sys.executable).with_name("torchrun")
    return [str(beside)] if beside.is_file() else [sys.executable, "-m", "torch.distributed.run"]


def test_two_ranks_end_with_identical_quantizer_state(tmp_path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [*_torchrun(), "--standalone", "--nproc_per_node", "2", str(SCRIPT), str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=SCRIPT.parent)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]

    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2] and [r["rank"] for r in ranks] == [0, 1]
    first, second = ranks[0]["state"], ranks[1]["state"]
    assert first.keys() == second.keys()
    observers = [k for k in first if "input_observer" in k and k.endswith(("min_val", "max_val"))]
    multipliers = [k for k in first if k.endswith("weight_multiplier")]
    assert len(observers) == 2 * 13 and len(multipliers) == 13
    assert all(torch.isfinite(first[k]).all() for k in observers)  # the observers did record
    assert [k for k in first if not torch.equal(first[k], second[k])] == []
    assert any(not torch.equal(first[k], torch.ones_like(first[k])) for k in multipliers)  # LSQ trained
