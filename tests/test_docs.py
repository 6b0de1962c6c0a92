"""Code in the documentation runs as written, and says what it prints."""

from __future__ import annotations

import re

import torch
from helpers import REPO


def python_blocks(markdown: str, section: str) -> list[str]:
    """The ```python blocks of a markdown section (from its heading to the next heading of the same level)."""
    start = markdown.index(section)
    level = section.split(" ")[0]
    end = markdown.find(f"\n{level} ", start + len(section))
    return re.findall(r"```python\n(.*?)```", markdown[start : end if end > 0 else None], re.S)


def test_readme_usage_snippet_runs_as_written(tmp_path, monkeypatch):
    snippet = python_blocks((REPO / "README.md").read_text(), "## Using the model")[0]
    (tmp_path / "hub_configs").symlink_to(REPO / "hub_configs")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(snippet, "README.md", "exec"), namespace)  # noqa: S102 - our own documentation
    out, x = namespace["out"], namespace["x"]
    # The shapes its comments state, for the 8 experts of tiny.json.
    for comment, value in (("(4, 1)", out.logits), ("(4, 8, 1)", out.expert_logits), ("(4, 8)", out.gate_weights)):
        assert f"# {comment}" in snippet and tuple(value.shape) == eval(comment)  # noqa: S307
    torch.testing.assert_close(out.gate_weights.sum(-1), torch.ones(4))
    assert out.loss.item() < 10  # the standardised target: O(1), not O(800^2)
    assert (tmp_path / "my-enecg" / "config.json").is_file()
