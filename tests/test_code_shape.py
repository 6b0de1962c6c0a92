"""The shape of the code (issue 27): no function of the package, the benchmarks or train.py is over 80 lines.

Lengths are counted as Python's `ast` gives them: `end_lineno - lineno + 1` of the `def`, its docstring and comments
included (decorators not). Methods and nested functions count on their own.
"""

from __future__ import annotations

import ast

from helpers import REPO


MAX_FUNCTION_LINES = 80

# Functions still over the limit while they are being split (issue 27), with their length when they were listed.
# The list may only shrink: an entry goes once its function is 80 lines or fewer (the test below fails until it is
# removed), a listed function may not grow, and nothing is added to it (split the function instead).
BEING_SPLIT: dict[tuple[str, str], int] = {}


def function_lengths() -> dict[tuple[str, str], int]:
    """(path relative to the repository, qualified name such as `Class.method` or `outer.inner`) -> lines, for every
    function and method under enecg_hf/ and bench/, and in train.py."""
    paths = sorted([*(REPO / "enecg_hf").rglob("*.py"), *(REPO / "bench").rglob("*.py"), REPO / "train.py"])
    lengths = {}

    def visit(node: ast.AST, path: str, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    lengths[(path, name)] = child.end_lineno - child.lineno + 1
                visit(child, path, f"{name}.")
            else:
                visit(child, path, prefix)

    for path in paths:
        relative = path.relative_to(REPO).as_posix()
        visit(ast.parse(path.read_text(), filename=relative), relative, "")
    return lengths


def test_no_function_is_over_80_lines():
    lengths = function_lengths()
    assert len(lengths) > 500 and ("bench/quality.py", "run_loso") in lengths  # the walk found the code
    too_long = {f"{path}: {name} ({lines} lines)" for (path, name), lines in lengths.items()
                if lines > MAX_FUNCTION_LINES and (path, name) not in BEING_SPLIT}
    assert not too_long, (f"functions over {MAX_FUNCTION_LINES} lines; split them into named steps: "
                          f"{sorted(too_long)}")


def test_the_list_of_functions_being_split_only_shrinks():
    lengths = function_lengths()
    gone = [key for key in BEING_SPLIT if key not in lengths]
    assert not gone, f"listed in BEING_SPLIT but not found (renamed or removed?): {gone}"
    done = [key for key in BEING_SPLIT if lengths[key] <= MAX_FUNCTION_LINES]
    assert not done, f"now {MAX_FUNCTION_LINES} lines or fewer: remove them from BEING_SPLIT: {done}"
    grown = {f"{path}: {name}": (listed, lengths[(path, name)]) for (path, name), listed in BEING_SPLIT.items()
             if lengths[(path, name)] > listed}
    assert not grown, f"functions of BEING_SPLIT longer than when they were listed (listed, now): {grown}"
