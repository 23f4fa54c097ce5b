"""What ``prepare`` / ``calibrate`` / ``convert`` / ``quantize`` did, per layer.

A report lists, per layer: name, format, bytes before and after, and metrics: SQNR (dB) of the
weights and of the outputs on calibration data, max abs errors, the calibration method chosen.
It writes JSON, Markdown and a PNG plot (per-layer SQNR bars coloured by format, and sensitivity
per layer when a sensitivity table is given).

Example:
    >>> report = QuantReport("prepare", [LayerReport("fc", "nf4", "fake_quant")])
    >>> report.count("fake_quant")
    1
    >>> round(sqnr_db(100.0, 1.0), 1)
    20.0
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

__all__ = ["LayerReport", "QuantReport", "sqnr_db", "weight_error_metrics", "FORMAT_COLORS"]

# One colour per storage format, shared by every plot.
FORMAT_COLORS = {
    "nf4": "#1f77b4",
    "fp4": "#17becf",
    "int8": "#ff7f0e",
    "llm_int8": "#d62728",
    "keep": "#7f7f7f",
}
# Columns shown first in Markdown, with their headers.
_PRIMARY_METRICS = {
    "weight_sqnr_db": "weight SQNR dB",
    "output_sqnr_db": "output SQNR dB",
    "weight_max_abs_error": "max abs err (weight)",
    "output_max_abs_error": "max abs err (output)",
    "calibration_method": "calibration",
}


def sqnr_db(signal_power: float, noise_power: float) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(signal / noise)`` in dB (inf for zero noise)."""
    if noise_power <= 0:
        return math.inf
    if signal_power <= 0:
        return -math.inf
    return 10.0 * math.log10(signal_power / noise_power)


def weight_error_metrics(weight: Any, dequantized: Any) -> dict[str, float]:
    """``weight_sqnr_db`` and ``weight_max_abs_error`` of a quantized weight against the original."""
    original = weight.detach().double()
    noise = original - dequantized.detach().double()
    return {
        "weight_sqnr_db": sqnr_db(float(original.pow(2).sum()), float(noise.pow(2).sum())),
        "weight_max_abs_error": float(noise.abs().max()),
    }


class _SensitivityLike(Protocol):
    def as_dict(self) -> dict[str, dict[str, float]]: ...


@dataclass
class LayerReport:
    """One layer's line in a report.

    Attributes:
        name: qualified module name.
        format: ``int8``, ``llm_int8``, ``nf4``, ``fp4`` or ``keep``.
        action: ``fake_quant``, ``kept``, ``converted``, ``calibrated`` or ``already_prepared``.
        reason: why (the rule that matched, the default that applied).
        bytes_before / bytes_after: weight + bias bytes in full precision and as stored.
        metrics: further per-layer numbers: ``weight_sqnr_db``, ``output_sqnr_db``,
            ``weight_max_abs_error``, ``output_max_abs_error``, ``calibration_method``, ...
    """

    name: str
    format: str
    action: str
    reason: str = ""
    bytes_before: int = 0
    bytes_after: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class QuantReport:
    """A list of :class:`LayerReport` plus notes, writable as JSON, Markdown and PNG."""

    stage: str
    layers: list[LayerReport] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def count(self, action: str) -> int:
        """Number of layers with this action."""
        return sum(layer.action == action for layer in self.layers)

    def layer(self, name: str) -> LayerReport:
        """The line for one module name."""
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no layer named {name!r} in this report")

    @property
    def bytes_before(self) -> int:
        return sum(layer.bytes_before for layer in self.layers)

    @property
    def bytes_after(self) -> int:
        return sum(layer.bytes_after for layer in self.layers)

    def merge(self, other: QuantReport, stage: str | None = None) -> QuantReport:
        """Combine two reports: ``other``'s line wins for a layer both describe (metrics are united)."""
        merged = {layer.name: layer for layer in self.layers}
        for layer in other.layers:
            if layer.name in merged:
                old = merged[layer.name]
                layer.metrics = {**old.metrics, **layer.metrics}
                layer.bytes_before = layer.bytes_before or old.bytes_before
                layer.bytes_after = layer.bytes_after or old.bytes_after
                layer.reason = layer.reason or old.reason
            merged[layer.name] = layer
        return QuantReport(stage or other.stage, list(merged.values()), self.notes + other.notes)

    # ---- writers ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (non-finite numbers become the strings ``inf`` / ``-inf`` / ``nan``)."""
        return _plain(
            {
                "stage": self.stage,
                "bytes_before": self.bytes_before,
                "bytes_after": self.bytes_after,
                "layers": [asdict(layer) for layer in self.layers],
                "notes": list(self.notes),
            }
        )

    def to_json(self, path: str | Path | None = None) -> str:
        """JSON text; also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=2, default=float)
        if path is not None:
            Path(path).write_text(text)
        return text

    def to_markdown(self, path: str | Path | None = None) -> str:
        """A Markdown table of every layer; also written to ``path`` when given."""
        present = {key for layer in self.layers for key, value in layer.metrics.items() if _scalar(value)}
        primary = [key for key in _PRIMARY_METRICS if key in present]
        extra = sorted(present - set(primary))
        header = ["layer", "format", "action", "reason", "bytes before", "bytes after"]
        header += [_PRIMARY_METRICS[key] for key in primary] + extra
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for layer in self.layers:
            cells = [
                f"`{layer.name}`",
                layer.format,
                layer.action,
                layer.reason,
                str(layer.bytes_before),
                str(layer.bytes_after),
                *(_cell(layer.metrics.get(key)) for key in primary + extra),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        ratio = self.bytes_before / self.bytes_after if self.bytes_after else float("nan")
        lines.append("")
        lines.append(f"Total: {self.bytes_before} -> {self.bytes_after} bytes ({ratio:.2f}x smaller).")
        lines.extend(f"- {note}" for note in self.notes)
        text = "\n".join(lines) + "\n"
        if path is not None:
            Path(path).write_text(text)
        return text

    def plot(
        self,
        path: str | Path,
        sensitivity: _SensitivityLike | Mapping[str, Mapping[str, float]] | None = None,
        title: str | None = None,
    ) -> Path:
        """Write a PNG: per-layer SQNR bars coloured by format, and sensitivity per layer if given.

        Output SQNR on calibration data is plotted where the layer was calibrated, weight SQNR
        otherwise (hatched); kept layers have no bar.

        Args:
            path: the PNG file to write.
            sensitivity: a :class:`~lightning_quant.sensitivity.SensitivityTable` or
                ``{layer: {format: sensitivity}}``: adds a panel with one bar per candidate format.
            title: figure title (default: the report's stage).

        Returns:
            The path written.
        """
        # A bare Figure renders with the Agg canvas: no display needed and pyplot's global state
        # (the user's backend, open figures) is left alone.
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch

        table: Mapping[str, Mapping[str, float]] | None
        table = sensitivity.as_dict() if hasattr(sensitivity, "as_dict") else sensitivity  # type: ignore[union-attr]
        panels = 2 if table else 1
        names = [layer.name for layer in self.layers]
        width = max(8.0, 0.35 * len(names) + 2)
        fig = Figure(figsize=(width, 4.2 * panels))
        axes = fig.subplots(panels, 1, squeeze=False)
        ax = axes[0][0]
        hatched = False
        for i, layer in enumerate(self.layers):
            value = layer.metrics.get("output_sqnr_db")
            hatch = ""
            if not _finite(value):
                value, hatch = layer.metrics.get("weight_sqnr_db"), "//"
            if _finite(value):
                hatched = hatched or bool(hatch)
                ax.bar(i, value, color=FORMAT_COLORS.get(layer.format, "#333333"), hatch=hatch, edgecolor="black")
        ax.set_xticks(range(len(names)), _short(names), rotation=75, fontsize=7)
        ax.set_ylabel("output SQNR on calibration data (dB)")
        ax.set_title(title or f"lightning-quant report: {self.stage}")
        formats = sorted({layer.format for layer in self.layers}, key=list(FORMAT_COLORS).index)
        handles = [Patch(color=FORMAT_COLORS.get(f, "#333333"), label=f) for f in formats]
        if hatched:
            handles.append(
                Patch(facecolor="white", edgecolor="black", hatch="//", label="weight SQNR (not calibrated)")
            )
        ax.legend(handles=handles, fontsize=7, loc="best")
        if table:
            _plot_sensitivity(axes[1][0], table)
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=110)
        return path

    def write(
        self,
        directory: str | Path,
        stem: str = "quant_report",
        sensitivity: _SensitivityLike | Mapping[str, Mapping[str, float]] | None = None,
    ) -> dict[str, Path]:
        """Write ``<stem>.json``, ``<stem>.md`` and ``<stem>.png`` into ``directory`` (created if needed).

        Example:
            >>> import tempfile
            >>> line = LayerReport("fc", "nf4", "converted", metrics={"weight_sqnr_db": 20.0})
            >>> report = QuantReport("convert", [line])
            >>> sorted(report.write(tempfile.mkdtemp()))
            ['json', 'markdown', 'png']
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths = {"json": directory / f"{stem}.json", "markdown": directory / f"{stem}.md"}
        self.to_json(paths["json"])
        self.to_markdown(paths["markdown"])
        paths["png"] = self.plot(directory / f"{stem}.png", sensitivity=sensitivity)
        return paths

    def __str__(self) -> str:
        return self.to_markdown()


def _plot_sensitivity(ax: Any, table: Mapping[str, Mapping[str, float]]) -> None:
    names = list(table)
    formats = [f for f in FORMAT_COLORS if any(f in row for row in table.values()) and f != "keep"]
    bar = 0.8 / max(len(formats), 1)
    for k, fmt in enumerate(formats):
        xs = [i + (k - (len(formats) - 1) / 2) * bar for i in range(len(names))]
        # Log scale: sensitivities span orders of magnitude; zero or negative ones sit at the floor.
        values = [max(float(table[n].get(fmt, math.nan)), 1e-12) for n in names]
        ax.bar(xs, values, width=bar, color=FORMAT_COLORS[fmt], label=fmt)
    ax.set_yscale("log")
    ax.set_xticks(range(len(names)), _short(names), rotation=75, fontsize=7)
    ax.set_ylabel("sensitivity (output change)")
    ax.set_title("sensitivity per layer: one layer quantized at a time")
    ax.legend(fontsize=7)


def _short(names: list[str]) -> list[str]:
    # Transformers names repeat a long prefix; the last parts tell the layers apart.
    return [".".join(name.split(".")[-4:]) for name in names]


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, (int, float, str, bool))


def _plain(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
