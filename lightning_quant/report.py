"""What ``prepare`` / ``calibrate`` / ``convert`` / ``quantize`` did, per layer.

Example:
    >>> report = QuantReport("prepare", [LayerReport("fc", "nf4", "fake_quant")])
    >>> report.count("fake_quant")
    1
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["LayerReport", "QuantReport"]


@dataclass
class LayerReport:
    """One layer's line in a report.

    Attributes:
        name: qualified module name.
        format: ``int8``, ``llm_int8``, ``nf4``, ``fp4`` or ``keep``.
        action: ``fake_quant``, ``kept``, ``converted``, ``calibrated`` or ``already_prepared``.
        reason: why (the rule that matched, the default that applied).
        bytes_before / bytes_after: weight + bias bytes in full precision and as stored.
        metrics: further per-layer numbers (SQNR dB, max error, calibration method, ...).
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
    """A list of :class:`LayerReport` plus notes, writable as JSON and Markdown."""

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
        """Combine two reports: ``other``'s line wins for a layer both describe."""
        merged = {layer.name: layer for layer in self.layers}
        for layer in other.layers:
            if layer.name in merged:
                old = merged[layer.name]
                layer.metrics = {**old.metrics, **layer.metrics}
                layer.bytes_before = layer.bytes_before or old.bytes_before
            merged[layer.name] = layer
        return QuantReport(stage or other.stage, list(merged.values()), self.notes + other.notes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "layers": [asdict(layer) for layer in self.layers],
            "notes": list(self.notes),
        }

    def to_json(self, path: str | Path | None = None) -> str:
        """JSON text; also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=2, default=float)
        if path is not None:
            Path(path).write_text(text)
        return text

    def to_markdown(self, path: str | Path | None = None) -> str:
        """A Markdown table of every layer; also written to ``path`` when given."""
        metric_keys = sorted({key for layer in self.layers for key in layer.metrics})
        header = ["layer", "format", "action", "reason", "bytes before", "bytes after", *metric_keys]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for layer in self.layers:
            cells = [
                f"`{layer.name}`",
                layer.format,
                layer.action,
                layer.reason,
                str(layer.bytes_before),
                str(layer.bytes_after),
                *(_cell(layer.metrics.get(key)) for key in metric_keys),
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

    def __str__(self) -> str:
        return self.to_markdown()


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
