"""``lightning-quant``: run, validate and report YAML recipes.

Examples:
    lightning-quant run recipes/bert_accuracy_recovery.yaml --quick
    lightning-quant run recipes/bert_accuracy_recovery.yaml --backend lightning --set seeds=[0]
    lightning-quant validate recipes/bert_nf4_ptq.yaml
    lightning-quant report outputs/bert_accuracy_recovery
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

__all__ = ["main", "build_parser"]


def build_parser():
    """The jsonargparse parser with the ``run``, ``validate`` and ``report`` subcommands."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="lightning-quant", description="Quantization recipes for bitsandbytes models.")
    commands = parser.add_subcommands(dest="command")

    run = ArgumentParser(description="Run every stage of a recipe (cached; re-running resumes).")
    run.add_argument("recipe", type=str, help="path of a run recipe (YAML)")
    run.add_argument("--backend", type=str, default="hf", help="training backend: lightning or hf")
    run.add_argument("--set", action="append", type=str, default=[], help="override key.path=value; repeatable")
    run.add_argument("--output-dir", type=str | None, default=None, help="default: outputs/<recipe name>[-quick]")
    run.add_argument("--quick", action="store_true", help="the same stages on a small subset")
    run.add_argument("--overwrite", action="store_true", help="reuse an output dir of another recipe")
    commands.add_subcommand("run", run)

    validate = ArgumentParser(description="Check a recipe (run recipe or quantization recipe) without running it.")
    validate.add_argument("recipe", type=str)
    validate.add_argument("--set", action="append", type=str, default=[], help="override key.path=value; repeatable")
    commands.add_subcommand("validate", validate)

    report = ArgumentParser(description="Re-render results.md / results.png of a finished run.")
    report.add_argument("output_dir", type=str)
    commands.add_subcommand("report", report)
    return parser


def _load(recipe: str, overrides: list[str]):
    """A run recipe if the file has ``model``/``data``, otherwise a plain quantization recipe."""
    import yaml

    from lightning_quant.config import QuantRecipe
    from lightning_quant.runner.spec import RunRecipe, apply_override

    path = Path(recipe)
    if not path.is_file():
        raise FileNotFoundError(f"recipe file {recipe!r} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if isinstance(data, dict) and "model" in data:
        return RunRecipe.from_yaml(path, overrides)
    for override in overrides:
        data = apply_override(data, override)
    return QuantRecipe.from_dict(data)


class _OncePerMessage:
    """bitsandbytes logs the same float16-cast notice on every int8 forward; show it once."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def filter(self, record) -> bool:  # type: ignore[no-untyped-def]
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lightning-quant`` console script."""
    import logging

    logging.getLogger("bitsandbytes.autograd._functions").addFilter(_OncePerMessage())
    parser = build_parser()
    args = parser.parse_args(argv)
    command = args.command
    options = args[command]
    try:
        if command == "validate":
            recipe = _load(options.recipe, options.set)
            print(f"{options.recipe}: valid {type(recipe).__name__}")
            return 0
        if command == "report":
            from lightning_quant.runner.results import write_results

            run_dir = Path(options.output_dir)
            results = json.loads((run_dir / "results.json").read_text())
            results.pop("summary", None)
            write_results(results, run_dir)
            return 0
        from lightning_quant.runner.pipeline import RunOptions, run_recipe
        from lightning_quant.runner.spec import RunRecipe

        recipe = _load(options.recipe, options.set)
        if not isinstance(recipe, RunRecipe):
            raise ValueError(f"{options.recipe} is a quantization recipe; `run` needs a run recipe with model and data")
        suffix = "-quick" if options.quick else ""
        output_dir = options.output_dir or f"outputs/{recipe.name}{suffix}-{options.backend}"
        run_recipe(recipe, RunOptions(output_dir, options.backend, options.quick, options.overwrite))
        return 0
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"lightning-quant {command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
