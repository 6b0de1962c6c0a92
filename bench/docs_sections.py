"""What the benchmark scripts share: paths, the machine they ran on, and their tables in docs/benchmarks.md (each
between `<!-- NAME:start -->` and `<!-- NAME:end -->`; a script with `--update-docs` rewrites only its own)."""

from __future__ import annotations

import os
import platform
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
DOCS = REPO / "docs" / "benchmarks.md"
DATA_DIR = Path(os.environ.get("ENECG_DATA_DIR", REPO.parent / "shared" / "data"))


def machine_info(**extra) -> dict:
    """Platform, Python, torch and transformers versions, CPU count and memory, plus `extra` (threads, device)."""
    import torch
    import transformers

    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "cpu_count": os.cpu_count(),
            "memory_total_gb": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, **extra}
    if str(extra.get("device", "")).startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def replace_section(name: str, body: str, docs: Path = DOCS) -> None:
    """Put `body` between the markers of section `name` (added at the end when missing)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = docs.read_text() if docs.is_file() else f"# Benchmarks\n\n{start}\n{end}\n"
    if start not in text:
        text += f"\n{start}\n{end}\n"
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    docs.write_text(f"{head}{start}\n{body}\n{end}{tail}")
