"""Run a recipe: fine-tune FP32 once per seed, then build, convert and evaluate every variant.

Stages are cached by content hash under ``<output_dir>/stages/``: a finished stage is read back
instead of run again, and an interrupted training stage resumes from its last checkpoint.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from lightning_quant.runner.data import load_splits, resolve_path, tokenize_splits
from lightning_quant.runner.evaluate import batches, evaluate_classifier, linear_bytes, model_bytes
from lightning_quant.runner.spec import RunRecipe, VariantSpec, content_hash

__all__ = ["run_recipe", "RunOptions", "BACKENDS"]

BACKENDS = ("lightning", "hf")
# Bump when a change here alters what a cached stage would contain.
_STAGE_FORMAT = 1


class RunOptions:
    """How to run a recipe: backend, output dir, quick mode, whether to use a foreign output dir."""

    def __init__(self, output_dir: str | Path, backend: str = "hf", quick: bool = False, overwrite: bool = False):
        if backend not in BACKENDS:
            raise ValueError(f"`--backend` must be one of {', '.join(BACKENDS)}; got {backend!r}")
        self.output_dir = Path(output_dir)
        self.backend, self.quick, self.overwrite = backend, quick, overwrite


def _log(message: str) -> None:
    from rich.console import Console

    Console(stderr=True).print(f"[bold cyan]lightning-quant[/] {message}")


def _claim_output_dir(options: RunOptions, recipe_key: str) -> None:
    """An existing output dir is reused only for the same recipe (resume); never silently overwritten."""
    marker = options.output_dir / "run.json"
    if marker.is_file():
        previous = json.loads(marker.read_text()).get("recipe_key")
        if previous != recipe_key and not options.overwrite:
            raise FileExistsError(
                f"{options.output_dir} holds a run of a different recipe (or options); pass another "
                "--output-dir, or --overwrite to reuse its cached stages where they still match"
            )
    elif options.output_dir.exists() and any(options.output_dir.iterdir()) and not options.overwrite:
        raise FileExistsError(
            f"{options.output_dir} exists and is not a lightning-quant run; pass another --output-dir or --overwrite"
        )
    options.output_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"recipe_key": recipe_key}))


class _Stage:
    """A cached unit of work: ``done`` once ``result.json`` exists."""

    def __init__(self, root: Path, name: str, key: str) -> None:
        self.dir = root / "stages" / f"{name}-{key}"
        self.name = name

    @property
    def done(self) -> bool:
        return (self.dir / "result.json").is_file()

    def result(self) -> dict[str, Any]:
        return json.loads((self.dir / "result.json").read_text())

    def finish(self, result: dict[str, Any]) -> dict[str, Any]:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / "result.json.tmp"
        tmp.write_text(json.dumps(result, indent=2))
        tmp.replace(self.dir / "result.json")  # atomic: a killed run never leaves half a result
        return result


def _train(backend: str, **kwargs: Any):
    if backend == "hf":
        from lightning_quant.runner.backend_hf import train_hf

        return train_hf(**kwargs)
    from lightning_quant.runner.backend_lightning import train_lightning

    return train_lightning(**kwargs)


def _load_model(path: str | Path, num_labels: int):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=num_labels)


def run_recipe(recipe: RunRecipe, options: RunOptions) -> dict[str, Any]:
    """Run every stage the recipe names; returns (and writes) the results.

    Raises:
        RecipeError / FileExistsError: before any training starts.
    """
    from transformers import AutoTokenizer

    quick = recipe.quick if options.quick else None
    seeds = recipe.seeds[: quick.seeds] if quick else recipe.seeds
    base_key = content_hash(_STAGE_FORMAT, options.backend, recipe.model, recipe.data, asdict(quick) if quick else None)
    _claim_output_dir(options, content_hash(base_key, recipe.to_dict()))
    (options.output_dir / "recipe.yaml").write_text(_yaml(recipe.to_dict()))

    model_path = resolve_path(recipe.model.path)
    _check_variants_fit_model(recipe, model_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    splits = load_splits(recipe.data, quick.train_size if quick else None, quick.eval_size if quick else None)
    _log(f"data: {splits.sizes()} (split by `{recipe.data.group_column}`), labels {splits.label_names}")
    data = tokenize_splits(splits, tokenizer, recipe.model)
    num_labels = recipe.model.num_labels

    results: dict[str, Any] = {"seeds": {}, "sizes": splits.sizes(), "backend": options.backend}
    for seed in seeds:
        finetune = recipe.finetune if not quick else _shrink(recipe.finetune, quick.epochs)
        fp32 = _Stage(options.output_dir, f"fp32-seed{seed}", content_hash(base_key, finetune, seed))
        per_seed: dict[str, Any] = {}
        if not fp32.done:
            _log(f"seed {seed}: fine-tuning FP32 ({options.backend})")
            torch.manual_seed(seed)
            model = _load_model(model_path, num_labels)
            outcome = _train(
                options.backend,
                model=model,
                tokenizer=tokenizer,
                train_dataset=data.train,
                spec=finetune,
                workdir=fp32.dir / "checkpoints",
                seed=seed,
            )
            model.save_pretrained(fp32.dir / "model")
            evaluation = evaluate_classifier(model, data.test, tokenizer, finetune.eval_batch_size)
            validation = evaluate_classifier(model, data.validation, tokenizer, finetune.eval_batch_size)
            fp32.finish(
                {
                    "accuracy": evaluation.accuracy,
                    "validation_accuracy": validation.accuracy,
                    "predictions": evaluation.predictions,
                    "seconds_per_1k": evaluation.seconds_per_1k,
                    "model_bytes": model_bytes(model),
                    "linear_bytes": linear_bytes(model),
                    **_training_metrics(outcome),
                }
            )
            shutil.rmtree(fp32.dir / "checkpoints", ignore_errors=True)
        else:
            _log(f"seed {seed}: FP32 stage cached, no training")
        reference = fp32.result()
        per_seed["fp32"] = {k: v for k, v in reference.items() if k != "predictions"} | {"agreement": 1.0}
        for variant in recipe.variants:
            per_seed[variant.name] = _run_variant(
                recipe, options, variant, fp32, reference, data, tokenizer, seed, quick, model_path
            )
        results["seeds"][str(seed)] = per_seed
    from lightning_quant.runner.results import write_results

    summary = write_results(results, options.output_dir)
    if recipe.export is not None:
        _export(recipe, options, summary, results, tokenizer)
    return results


def _export(
    recipe: RunRecipe, options: RunOptions, summary: dict[str, Any], results: dict[str, Any], tokenizer: Any
) -> None:
    """Write the chosen variant (first seed's model) with a card carrying every variant's accuracy."""
    from hf_integration.export import refresh_model_card

    quantized = [v.name for v in recipe.variants if v.kind != "optimizer_state"]
    name = recipe.export
    assert name is not None
    if name == "best":
        name = max(quantized, key=lambda n: summary[n]["accuracy"]["median"])
    # This run's own stage (by key), not any older stage of the same name left in the folder.
    source = options.output_dir / "stages" / results["seeds"][str(recipe.seeds[0])][name]["stage"] / "export"
    target = options.output_dir / "export"
    staging = options.output_dir / ".export-tmp"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source, staging)
    metrics = {n: {"accuracy": s["accuracy"]["median"]} for n, s in summary.items() if "accuracy" in s}
    refresh_model_card(staging, metrics, exported_variant=name, datasets=[recipe.data.data_files])
    shutil.rmtree(target, ignore_errors=True)
    staging.replace(target)
    _log(f"exported {name} to {target}")


def _check_variants_fit_model(recipe: RunRecipe, model_path: str) -> None:
    """Plan every variant on a weightless copy of the model, so layer-level errors (a block size
    that splits rows, a rule that matches nothing in a strict recipe) stop the run before training."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from lightning_quant.rules import plan_layers

    config = AutoConfig.from_pretrained(model_path, num_labels=recipe.model.num_labels)
    with torch.device("meta"):
        skeleton = AutoModelForSequenceClassification.from_config(config)
    for variant in recipe.variants:
        if variant.kind == "optimizer_state":
            continue
        try:
            plan_layers(skeleton, variant.recipe(recipe.quantization), check_weights=False)
        except ValueError as err:
            raise type(err)(f"variant `{variant.name}`: {err}") from err


def _training_metrics(outcome: Any) -> dict[str, Any]:
    return {
        "train_seconds": outcome.seconds,
        "train_steps": outcome.steps,
        "seconds_per_step": outcome.seconds_per_step,
        "peak_rss_bytes": outcome.peak_rss_bytes,
        "rss_growth_bytes": outcome.rss_growth_bytes,
        "optimizer_state_bytes": outcome.optimizer_state_bytes.get("total"),
        "final_loss": outcome.losses[-1] if outcome.losses else None,
    }


def _shrink(spec: Any, epochs: float) -> Any:
    from dataclasses import replace

    return replace(spec, epochs=min(spec.epochs, epochs))


def _yaml(data: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)


# Recipe fields added after stages were first cached, with the value that means "as before": left
# out of the stage key at that value, so adding a field does not throw finished stages away.
_NEWER_FIELDS_AT_DEFAULT = {"deploy_device": "any"}


def _stage_key_recipe(quant: Any) -> dict[str, Any]:
    data = quant.to_dict()
    for name, default in _NEWER_FIELDS_AT_DEFAULT.items():
        if data.get(name) == default:
            del data[name]
    return data


def _evaluated_as(kind: str, simulated: bool) -> str:
    if kind == "optimizer_state":
        return "fine-tuned model"
    return "simulation (CUDA-only bitsandbytes layout)" if simulated else "converted bitsandbytes model"


def _run_variant(
    recipe: RunRecipe,
    options: RunOptions,
    variant: VariantSpec,
    fp32: _Stage,
    reference: dict[str, Any],
    data: Any,
    tokenizer: Any,
    seed: int,
    quick: Any,
    model_path: str,
) -> dict[str, Any]:
    from lightning_quant.api import calibrate, convert, prepare

    quant = variant.recipe(recipe.quantization)
    train = variant.train if not quick or variant.train is None else _shrink(variant.train, quick.epochs)
    key = content_hash(fp32.dir.name, variant.kind, _stage_key_recipe(quant), train)
    stage = _Stage(options.output_dir, f"{variant.name}-seed{seed}", key)
    if stage.done:
        _log(f"seed {seed}: {variant.name} cached, no training")
        return stage.result() | {"stage": stage.dir.name}
    _log(f"seed {seed}: {variant.name} ({variant.kind}, {options.backend})")
    stage.dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    outcome = None
    training = dict(tokenizer=tokenizer, train_dataset=data.train, spec=train, workdir=stage.dir / "checkpoints",
                    seed=seed, recipe=quant)  # fmt: skip
    report = None
    if variant.kind == "ptq":
        model = _load_model(fp32.dir / "model", recipe.model.num_labels)
        calibration = batches(data.train, tokenizer, 32, shuffle=True, seed=seed)
        report = prepare(model, quant)
        report = report.merge(calibrate(model, calibration, quant.calibration.num_batches, config=quant.calibration))
    elif variant.kind == "qat":
        model = _load_model(fp32.dir / "model", recipe.model.num_labels)
        teacher = _load_model(fp32.dir / "model", recipe.model.num_labels).eval().requires_grad_(False)
        outcome = _train(options.backend, model=model, teacher=teacher, **training)
    else:  # optimizer_state: fine-tune the pretrained model with quantized optimizer state
        model = _load_model(model_path, recipe.model.num_labels)
        outcome = _train(options.backend, model=model, **training)
    # A CUDA-only layout (4-bit blocks crossing rows) is computed wrongly by bitsandbytes' CPU
    # kernel: evaluate the simulation instead, which equals the converted weights bit for bit.
    simulated = variant.kind != "optimizer_state" and quant.deploy_device == "cuda" and not torch.cuda.is_available()
    if simulated:
        evaluation = evaluate_classifier(model, data.test, tokenizer, recipe.finetune.eval_batch_size)
    if variant.kind != "optimizer_state":
        converted = convert(model)
        report = converted if report is None else report.merge(converted, stage="quantize")
    if not simulated:
        evaluation = evaluate_classifier(model, data.test, tokenizer, recipe.finetune.eval_batch_size)
    agreement = sum(a == b for a, b in zip(evaluation.predictions, reference["predictions"])) / len(
        evaluation.predictions
    )
    result: dict[str, Any] = {
        "kind": variant.kind,
        "accuracy": evaluation.accuracy,
        "agreement": agreement,
        "seconds_per_1k": evaluation.seconds_per_1k,
        "model_bytes": model_bytes(model),
        "linear_bytes": linear_bytes(model),
        "evaluated": _evaluated_as(variant.kind, simulated),
    }
    if outcome is not None:
        result.update(_training_metrics(outcome))
    if report is not None:
        report.to_json(stage.dir / "quantization_report.json")
    if report is not None and recipe.export in (variant.name, "best") and seed == recipe.seeds[0]:
        from hf_integration import save_quantized

        save_quantized(
            model,
            stage.dir / "export",
            tokenizer=tokenizer,
            recipe=quant,
            method=variant.kind,
            report=report,
            exported_variant=variant.name,
            base_model=recipe.model.path,
        )
    shutil.rmtree(stage.dir / "checkpoints", ignore_errors=True)
    result["finished_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
    return stage.finish(result) | {"stage": stage.dir.name}
