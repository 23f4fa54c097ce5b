"""Recipe configuration: one dataclass per concern, gathered in :class:`QuantRecipe`.

Every config validates in ``__post_init__`` and names the key, the bad value and the allowed
ones. Recipes round-trip through dicts, YAML and JSON and carry a ``version``.

Example:
    >>> recipe = QuantRecipe.from_dict({"weight": {"format": "nf4", "double_quant": True}})
    >>> recipe.weight.block_size
    64
    >>> QuantRecipe.from_dict(recipe.to_dict()) == recipe
    True
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_quant._schema import RecipeError, build_dataclass, check_choice, to_plain

__all__ = [
    "RECIPE_VERSION",
    "WEIGHT_FORMATS",
    "DEFAULT_KEEP_PATTERNS",
    "RecipeError",
    "WeightConfig",
    "ActivationConfig",
    "EstimatorConfig",
    "CalibrationConfig",
    "ScheduleConfig",
    "RuleConfig",
    "OptimizerStateConfig",
    "ExportConfig",
    "QuantRecipe",
]

RECIPE_VERSION = 1
WEIGHT_FORMATS = ("int8", "llm_int8", "nf4", "fp4")
FOUR_BIT_FORMATS = ("nf4", "fp4")
EIGHT_BIT_FORMATS = ("int8", "llm_int8")
# bitsandbytes' quantize_4bit accepts exactly these block sizes.
BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
# Task heads are small and sensitive: full precision unless a rule says otherwise.
DEFAULT_KEEP_PATTERNS = ("classifier", "classifier.*", "*.classifier", "lm_head", "*.lm_head", "score")


@dataclass
class WeightConfig:
    """How weights are stored by the deployed bitsandbytes layer.

    Args:
        format: ``int8`` (row-wise absmax, ``Linear8bitLt`` without outliers), ``llm_int8`` (the same
            plus the LLM.int8 outlier split), ``nf4`` or ``fp4`` (``Linear4bit``).
        block_size: 4-bit block size (bitsandbytes allows 32..4096, powers of two).
        double_quant: quantize the 4-bit absmax again (bitsandbytes ``compress_statistics``).
        compute_dtype: dtype the 4-bit layer computes in.
        threshold: LLM.int8 outlier threshold on activations (``llm_int8`` only).
    """

    format: str = "nf4"
    block_size: int = 64
    double_quant: bool = False
    compute_dtype: str = "float32"
    threshold: float = 6.0

    def __post_init__(self) -> None:
        check_choice("weight.format", self.format, WEIGHT_FORMATS)
        check_choice("weight.block_size", self.block_size, BLOCK_SIZES)
        check_choice("weight.compute_dtype", self.compute_dtype, COMPUTE_DTYPES)
        if not self.threshold > 0:
            raise RecipeError(f"`weight.threshold` must be > 0 (LLM.int8 outlier threshold); got {self.threshold!r}")

    @property
    def is_4bit(self) -> bool:
        return self.format in FOUR_BIT_FORMATS

    @property
    def outlier_threshold(self) -> float:
        """Threshold bitsandbytes applies: 0 disables the outlier split (plain ``int8``)."""
        return self.threshold if self.format == "llm_int8" else 0.0


@dataclass
class ActivationConfig:
    """Activation quantization simulated during training.

    Args:
        mode: ``auto`` (what the deployed kernel does: ``per_token`` for int8 formats, ``none`` for
            4-bit), ``none``, ``per_token`` (dynamic int8 absmax per token, as bitsandbytes' int8
            kernel) or ``static`` (per-tensor affine int8 with a range from an observer).
        signed: static mode: signed int8 ([-128, 127]) or unsigned ([0, 255]).
        symmetric: static mode: zero point fixed at 0 (signed) / 128 (unsigned).
        observer: static mode: range observer used during calibration.
    """

    mode: str = "auto"
    signed: bool = True
    symmetric: bool = False
    observer: str = "minmax"

    def __post_init__(self) -> None:
        check_choice("activation.mode", self.mode, ("auto", "none", "per_token", "static"))
        check_choice("activation.observer", self.observer, ("minmax", "moving_average", "percentile", "mse", "entropy"))

    def resolve(self, weight_format: str) -> str:
        """The concrete mode for a layer stored as ``weight_format``."""
        if self.mode != "auto":
            return self.mode
        return "per_token" if weight_format in EIGHT_BIT_FORMATS else "none"


@dataclass
class EstimatorConfig:
    """Gradient estimator through the rounding.

    Args:
        name: ``ste`` (straight-through), ``clipped_ste`` (zero gradient outside the representable
            range) or ``lsq`` (learned step size, Esser et al. 2019).
        lsq_granularity: ``block`` (one learned scale multiplier per 4-bit block) or ``row`` (per
            output row; the only choice for int8 weights, whose scale is per row).
        lsq_init: initial multiplier; multipliers are clamped to ``[lsq_min, 1]`` so that conversion
            folds them into the stored weights exactly.
        lsq_min: lower bound of the multiplier.
    """

    name: str = "ste"
    lsq_granularity: str = "block"
    lsq_init: float = 1.0
    lsq_min: float = 0.25

    def __post_init__(self) -> None:
        check_choice("estimator.name", self.name, ("ste", "clipped_ste", "lsq"))
        check_choice("estimator.lsq_granularity", self.lsq_granularity, ("block", "row"))
        if not 0 < self.lsq_min <= self.lsq_init <= 1:
            raise RecipeError(
                "`estimator.lsq_min` and `estimator.lsq_init` must satisfy 0 < lsq_min <= lsq_init <= 1; "
                f"got lsq_min={self.lsq_min!r}, lsq_init={self.lsq_init!r}"
            )


@dataclass
class CalibrationConfig:
    """How ranges are calibrated (PTQ, and before QAT starts).

    Args:
        method: range observer for activations and weight clipping, or ``auto`` (per layer, keep
            the method with the lowest output error).
        num_batches: batches used by ``calibrate``.
        percentile: for ``percentile``.
        momentum: for ``moving_average``.
        weight_clipping: search a weight clipping ratio per layer (real for bnb formats: clamped
            weights are what the layer stores).
        weight_clipping_objective: what the ``mse`` weight clipping search minimises: ``output``
            (the layer's output error on the calibration inputs) or ``weight`` (the weight error).
    """

    method: str = "minmax"
    num_batches: int = 16
    percentile: float = 99.99
    momentum: float = 0.9
    weight_clipping: bool = False
    weight_clipping_objective: str = "output"

    def __post_init__(self) -> None:
        check_choice("calibration.weight_clipping_objective", self.weight_clipping_objective, ("output", "weight"))
        check_choice(
            "calibration.method",
            self.method,
            ("minmax", "moving_average", "percentile", "mse", "entropy", "auto"),
        )
        if self.num_batches < 1:
            raise RecipeError(f"`calibration.num_batches` must be >= 1; got {self.num_batches!r}")
        if not 50.0 < self.percentile <= 100.0:
            raise RecipeError(f"`calibration.percentile` must be in (50, 100]; got {self.percentile!r}")
        if not 0.0 <= self.momentum < 1.0:
            raise RecipeError(f"`calibration.momentum` must be in [0, 1); got {self.momentum!r}")


@dataclass
class ScheduleConfig:
    """When fake quantization and observers switch on and freeze (in optimizer steps).

    Args:
        fake_quant_start_step: steps trained in full precision before fake quantization starts.
        observer_freeze_step: step after which activation observers stop updating (None: never).
    """

    fake_quant_start_step: int = 0
    observer_freeze_step: int | None = None

    def __post_init__(self) -> None:
        if self.fake_quant_start_step < 0:
            raise RecipeError(f"`schedule.fake_quant_start_step` must be >= 0; got {self.fake_quant_start_step!r}")
        if self.observer_freeze_step is not None and self.observer_freeze_step < 0:
            raise RecipeError(f"`schedule.observer_freeze_step` must be >= 0; got {self.observer_freeze_step!r}")

    def fake_quant_active(self, step: int) -> bool:
        """Whether fake quantization is on for the optimizer step that follows ``step`` completed steps."""
        return step >= self.fake_quant_start_step

    def observers_active(self, step: int) -> bool:
        """Whether activation observers update during the step that follows ``step`` completed steps."""
        return self.observer_freeze_step is None or step < self.observer_freeze_step


@dataclass
class RuleConfig:
    """One rule: modules whose name matches ``pattern`` (fnmatch) get ``format``; ``keep`` = full precision.

    Optional ``block_size`` / ``double_quant`` override the recipe's weight settings for those modules.
    """

    pattern: str
    format: str
    block_size: int | None = None
    double_quant: bool | None = None

    def __post_init__(self) -> None:
        if not self.pattern:
            raise RecipeError("`rules[].pattern` must be a non-empty fnmatch pattern such as 'classifier*'")
        check_choice("rules[].format", self.format, (*WEIGHT_FORMATS, "keep"))
        if self.block_size is not None:
            check_choice("rules[].block_size", self.block_size, BLOCK_SIZES)


@dataclass
class OptimizerStateConfig:
    """Optimizer state quantization (bitsandbytes 8-bit optimizers).

    Args:
        bits: 8 (bitsandbytes' block-wise 8-bit state) or 32 (leave the optimizer alone).
        paged: use the paged variant (CUDA unified memory; plain on CPU).
        embeddings: ``32bit`` keeps embedding state in full precision (bitsandbytes' advice), ``8bit``.
        min_8bit_size: tensors smaller than this keep 32-bit state.
    """

    bits: int = 8
    paged: bool = False
    embeddings: str = "32bit"
    min_8bit_size: int = 4096

    def __post_init__(self) -> None:
        check_choice("optimizer_state.bits", self.bits, (8, 32))
        check_choice("optimizer_state.embeddings", self.embeddings, ("32bit", "8bit"))
        if self.min_8bit_size < 0:
            raise RecipeError(f"`optimizer_state.min_8bit_size` must be >= 0; got {self.min_8bit_size!r}")


@dataclass
class ExportConfig:
    """Where and how a converted model is exported.

    Args:
        output_dir: folder for ``save_pretrained`` output (None: do not export).
        push_to_hub: upload after export.
        repo_id: hub repository for the upload.
        private: create the hub repository as private.
    """

    output_dir: str | None = None
    push_to_hub: bool = False
    repo_id: str | None = None
    private: bool = False

    def __post_init__(self) -> None:
        if self.push_to_hub and not self.repo_id:
            raise RecipeError("`export.repo_id` is required when `export.push_to_hub` is true; got None")


@dataclass
class QuantRecipe:
    """Everything that says what to quantize and how.

    The smallest valid recipe is ``{"weight": {"format": "nf4"}}``. ``rules`` are tried in order
    (first match wins) before the default keep patterns for task heads (``keep_heads``).

    Args:
        weight: storage format of quantized layers.
        activation: activation quantization simulated during training / calibration.
        estimator: gradient estimator through the rounding.
        calibration: range calibration.
        schedule: when fake quantization and observers switch on / freeze.
        rules: ordered fnmatch rules on module names.
        keep_heads: keep classifier / lm_head layers in full precision unless a rule matches them.
        strict: a rule pattern that matches no module is an error instead of a warning.
        deploy_device: where the converted model will run. ``any`` (default) keeps to what every
            bitsandbytes backend computes correctly; ``cuda`` also allows 4-bit block sizes that do
            not divide a layer's in_features (bitsandbytes' CPU kernel dequantizes those wrongly).
        optimizer_state: 8-bit optimizer state settings (None: untouched).
        export: export settings.
        version: recipe format version.

    Example:
        >>> recipe = QuantRecipe.from_dict({
        ...     "weight": {"format": "nf4"},
        ...     "rules": [{"pattern": "*attention*", "format": "int8"}],
        ... })
        >>> recipe.rules[0].format
        'int8'
    """

    weight: WeightConfig = field(default_factory=WeightConfig)
    activation: ActivationConfig = field(default_factory=ActivationConfig)
    estimator: EstimatorConfig = field(default_factory=EstimatorConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    rules: list[RuleConfig] = field(default_factory=list)
    keep_heads: bool = True
    strict: bool = False
    deploy_device: str = "any"
    optimizer_state: OptimizerStateConfig | None = None
    export: ExportConfig = field(default_factory=ExportConfig)
    version: int = RECIPE_VERSION

    def __post_init__(self) -> None:
        if self.version != RECIPE_VERSION:
            raise RecipeError(
                f"`version` must be {RECIPE_VERSION} (this lightning-quant reads recipe format {RECIPE_VERSION}); "
                f"got {self.version!r}"
            )
        check_choice("deploy_device", self.deploy_device, ("any", "cuda"))
        if self.estimator.name == "lsq" and self.weight.format in EIGHT_BIT_FORMATS:
            # int8 scales are per row in bitsandbytes, so a per-block multiplier cannot be folded.
            self.estimator.lsq_granularity = "row"

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantRecipe:
        """Build and validate a recipe from a plain dict (unknown keys are errors)."""
        if not isinstance(data, dict):
            raise RecipeError(f"a recipe must be a mapping such as {{'weight': {{'format': 'nf4'}}}}; got {data!r}")
        return build_dataclass(cls, data, "")

    @classmethod
    def from_yaml(cls, path: str | Path) -> QuantRecipe:
        """Read a recipe file; a run recipe's ``quantization:`` section is used when present."""
        import yaml

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"recipe file {str(path)!r} does not exist; pass the path of a YAML recipe")
        data = yaml.safe_load(path.read_text()) or {}
        if isinstance(data, dict) and "quantization" in data:
            data = data["quantization"]
        return cls.from_dict(data)

    @classmethod
    def from_json(cls, text: str) -> QuantRecipe:
        """Parse a recipe from a JSON string."""
        return cls.from_dict(json.loads(text))

    @classmethod
    def coerce(cls, recipe: QuantRecipe | dict[str, Any] | str | Path) -> QuantRecipe:
        """Accept a recipe, a dict, or a YAML path (what every public entry point takes)."""
        if isinstance(recipe, QuantRecipe):
            return recipe
        if isinstance(recipe, dict):
            return cls.from_dict(recipe)
        if isinstance(recipe, (str, Path)):
            return cls.from_yaml(recipe)
        raise RecipeError(f"recipe must be a QuantRecipe, a dict or a YAML path; got {type(recipe).__name__}")

    # ---- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-able dict that ``from_dict`` reads back."""
        return to_plain(self)

    def to_yaml(self, path: str | Path | None = None) -> str:
        """YAML text of the recipe; also written to ``path`` when given."""
        import yaml

        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    def to_json(self) -> str:
        """JSON text of the recipe."""
        return json.dumps(self.to_dict(), indent=2)

    def replace(self, **changes: Any) -> QuantRecipe:
        """A copy with top-level fields replaced (validated again)."""
        return dataclasses.replace(self, **changes)


def warn_or_raise(message: str, strict: bool) -> None:
    """Problems that may be intentional: an error in strict recipes, else a warning."""
    if strict:
        raise RecipeError(message)
    warnings.warn(message, UserWarning, stacklevel=3)
