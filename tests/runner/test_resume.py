"""Killing a run mid-QAT and running it again resumes from the last checkpoint; nothing retrains."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lightning_quant.cli import main


def _wait_for_checkpoint(output_dir: Path, process: subprocess.Popen, timeout: float = 300) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        # Complete checkpoints only: the HF Trainer writes trainer_state.json last.
        found = [p.parent for p in output_dir.glob("stages/qat_int8-*/checkpoints/checkpoint-*/trainer_state.json")]
        found += list(output_dir.glob("stages/qat_int8-*/checkpoints/last.ckpt"))
        if found:
            time.sleep(1.0)  # let Lightning finish writing last.ckpt (one buffered write)
            return found[0]
        if process.poll() is not None:
            raise AssertionError("the run ended before writing a QAT checkpoint")
        time.sleep(0.2)
    raise AssertionError("no QAT checkpoint appeared in time")


@pytest.mark.parametrize("backend", ["hf", "lightning"])
def test_killed_run_resumes_mid_qat(backend, tiny_overrides, tmp_path, capsys):
    output_dir = tmp_path / "out"
    args = [
        "run", "recipes/bert_int8_qat.yaml", "--quick", "--backend", backend, "--output-dir", str(output_dir),
        *tiny_overrides,
        "--set", "quick.epochs=12",
        "--set", "variants.qat_int8.train.epochs=12",
        "--set", "variants.qat_int8.train.checkpoint_every=2",
    ]  # fmt: skip
    # stderr goes to a file: a pipe nobody reads would fill up and stall the run.
    log_file = (tmp_path / "killed-run.log").open("w")
    process = subprocess.Popen([sys.executable, "-m", "lightning_quant.cli", *args], stderr=log_file, stdout=log_file)
    try:
        _wait_for_checkpoint(output_dir, process)
    finally:
        process.send_signal(signal.SIGKILL)  # a crash: no cleanup, no final result
        process.wait()
        log_file.close()
    assert not list(output_dir.glob("stages/qat_int8-*/result.json"))
    assert main(args) == 0
    log = capsys.readouterr().err
    assert "FP32 stage cached, no training" in log
    assert "lightning-quant resuming from" in log
    result = json.loads(next(output_dir.glob("stages/qat_int8-*/result.json")).read_text())
    assert result["train_steps"] == 24
