"""Regenerate the README's performance section from the benchmarks' Markdown output.

Each benchmark writes ``benchmarks/results/<name>.md``; this copies them, with the command that
produced them, between the ``<!-- benchmarks:start -->`` and ``<!-- benchmarks:end -->`` markers.
A benchmark that has not been run yet is listed as such instead of being dropped.

Run:
    .venv/bin/python benchmarks/update_readme.py
"""

from __future__ import annotations

import re
from pathlib import Path

RESULTS = Path("benchmarks/results")
README = Path("README.md")
SECTIONS = (
    (
        "Accuracy against the peers",
        "accuracy.md",
        ".venv/bin/python benchmarks/accuracy.py --seeds 0 1 2  # after `make full`; resumable",
    ),
    ("QAT training-step overhead", "overhead.md", ".venv/bin/python benchmarks/overhead.py --rounds 10"),
    (
        "QAT training-step overhead before the last speed-up",
        "overhead_before.md",
        "git checkout eedd37f && .venv/bin/python benchmarks/overhead.py --rounds 10",
    ),
    (
        "8-bit optimizer state",
        "optimizer_state.md",
        ".venv/bin/python benchmarks/optimizer_state.py --full --train-rows 1500",
    ),
    ("GPU check (one run on a lent GPU)", "gpu/gpu_check.md", "bash benchmarks/gpu_check.sh  # on a CUDA machine"),
)
# The GPU check's per-case table stays in its own file.
CUT_AT = "## Every case"
START, END = "<!-- benchmarks:start -->", "<!-- benchmarks:end -->"


def render() -> str:
    parts = [START, ""]
    for title, name, command in SECTIONS:
        path = RESULTS / name
        parts.append(f"### {title}\n\n`{command}` wrote `{path}`:\n")
        if path.is_file():
            text = path.read_text().split(CUT_AT)[0].strip()
            # Demote the file's own headings below this section's.
            parts.append(re.sub(r"^(#+) ", lambda m: "#" * (len(m.group(1)) + 3) + " ", text, flags=re.M))
        else:
            parts.append("_Not run yet._")
        parts.append("")
    parts.append(END)
    return "\n".join(parts)


def main() -> None:
    text = README.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{README} has no {START} ... {END} markers; add them where the section belongs")
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    README.write_text(head + render() + tail)
    print(f"updated {README}")


if __name__ == "__main__":
    main()
