"""The benchmark scripts' tables in docs/benchmarks.md: each lives between `<!-- NAME:start -->` and
`<!-- NAME:end -->`, and a script with `--update-docs` rewrites only its own section."""

from __future__ import annotations

from pathlib import Path


DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def replace_section(name: str, body: str, docs: Path = DOCS) -> None:
    """Put `body` between the markers of section `name` (added at the end when missing)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = docs.read_text() if docs.is_file() else f"# Benchmarks\n\n{start}\n{end}\n"
    if start not in text:
        text += f"\n{start}\n{end}\n"
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    docs.write_text(f"{head}{start}\n{body}\n{end}{tail}")
