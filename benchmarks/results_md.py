"""RESULTS.md, one section per benchmark: each script replaces its own `## Heading` section (from
the heading to the next `## `) and leaves the others as they are."""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")


def write_section(heading: str, body: str, path: Path = RESULTS) -> None:
    """Replaces the section `## {heading}` of `path` with `body`, or appends it."""
    title = f"## {heading}"
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    lines = old.rstrip("\n").splitlines()
    new_section = [title, "", *body.strip("\n").splitlines(), ""]
    if title in lines:
        start = lines.index(title)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        lines[start:end] = new_section
    else:
        lines += ["", *new_section]
    path.write_text("\n".join(lines).rstrip("\n") + "\n")
