"""Results of a run: median and range over seeds, as JSON, Markdown, a PNG plot and a printed table."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

__all__ = ["summarize", "write_results", "render_markdown"]

_COLUMNS = (
    "accuracy",
    "agreement",
    "model_bytes",
    "linear_bytes",
    "seconds_per_1k",
    "optimizer_state_bytes",
    "rss_growth_bytes",
    "seconds_per_step",
)


def summarize(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per variant and column: median, min, max over seeds (columns a variant lacks are skipped)."""
    variants: dict[str, dict[str, list[float]]] = {}
    for per_seed in results["seeds"].values():
        for name, values in per_seed.items():
            for column in _COLUMNS:
                if values.get(column) is not None:
                    variants.setdefault(name, {}).setdefault(column, []).append(float(values[column]))
    return {
        name: {
            col: {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)}
            for col, v in columns.items()
        }
        for name, columns in variants.items()
    }


def _pct(stats: dict[str, Any]) -> str:
    text = f"{100 * stats['median']:.2f}"
    if stats["n"] > 1:
        text += f" ({100 * stats['min']:.2f}-{100 * stats['max']:.2f})"
    return text


def _mib(value: float) -> str:
    return f"{value / 2**20:.2f}"


def render_markdown(summary: dict[str, dict[str, Any]], results: dict[str, Any]) -> str:
    """The results table: accuracy (median, range over seeds), delta vs FP32, agreement, bytes, time."""
    fp32 = summary.get("fp32", {}).get("accuracy", {}).get("median")
    seeds = len(results["seeds"])
    lines = [
        f"Backend: {results['backend']}; seeds: {seeds}; data sizes: {results['sizes']}.",
        "",
        "| variant | accuracy % (median, range) | delta vs FP32 (points) | agreement with FP32 % | model MiB | "
        "linear MiB | eval s / 1k | optimizer state MiB | training RSS growth MiB | s / step |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, stats in summary.items():
        accuracy = stats["accuracy"]
        state, step = stats.get("optimizer_state_bytes"), stats.get("seconds_per_step")
        cells = [
            name,
            _pct(accuracy),
            "" if fp32 is None else f"{100 * (accuracy['median'] - fp32):+.2f}",
            _pct(stats["agreement"]),
            _mib(stats["model_bytes"]["median"]),
            _mib(stats["linear_bytes"]["median"]),
            f"{stats['seconds_per_1k']['median']:.2f}",
            _mib(state["median"]) if state else "",
            _mib(stats["rss_growth_bytes"]["median"]) if "rss_growth_bytes" in stats else "",
            f"{step['median']:.3f}" if step else "",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    simulated = sorted(
        {name for per_seed in results["seeds"].values() for name, v in per_seed.items() if _is_simulated(v)}
    )
    if simulated:
        lines += [
            "",
            f"Evaluated as the simulation: {', '.join(simulated)}. Their 4-bit blocks cross weight rows, which "
            "bitsandbytes' CUDA kernel handles and its CPU kernel dequantizes wrongly; the simulation equals "
            "the exported weights bit for bit.",
        ]
    return "\n".join(lines) + "\n"


def _is_simulated(values: dict[str, Any]) -> bool:
    return str(values.get("evaluated", "")).startswith("simulation")


def _plot(summary: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, stats in summary.items():
        x = stats["model_bytes"]["median"] / 2**20
        y = 100 * stats["accuracy"]["median"]
        low, high = 100 * stats["accuracy"]["min"], 100 * stats["accuracy"]["max"]
        ax.errorbar(x, y, yerr=[[y - low], [high - y]], fmt="o", capsize=3, color="black" if name == "fp32" else None)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    if "fp32" in summary:
        ax.axhline(100 * summary["fp32"]["accuracy"]["median"], color="gray", linestyle="--", linewidth=0.8)
    ax.set_xlabel("model size (MiB, as saved)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("accuracy vs model bytes (median over seeds, bars = range)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(results: dict[str, Any], output_dir: Path) -> dict[str, dict[str, Any]]:
    """Write results.json, results.md and results.png; print the table."""
    summary = summarize(results)
    (output_dir / "results.json").write_text(json.dumps({"summary": summary, **results}, indent=2))
    markdown = render_markdown(summary, results)
    (output_dir / "results.md").write_text(markdown)
    _plot(summary, output_dir / "results.png")
    from rich.console import Console
    from rich.markdown import Markdown

    Console().print(Markdown(markdown))
    return summary
