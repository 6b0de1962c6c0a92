"""Frozen features live in one place (issue 27): the store, the in-memory `FeatureTable` and the function that runs
the model's frozen pass for them are in `enecg_hf.features`; no other module runs the pass for features on its own,
and the names training exported before keep working. Read with `ast` where it is about the code."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import enecg_hf

PACKAGE = Path(enecg_hf.__file__).resolve().parent
# The model's frozen pass: what `EnECGModel` offers to compute features (`compute_normalized_features` is the
# saliency maps' view, with gradients, and is not counted).
FROZEN_PASS = ("compute_features", "compute_frozen_columns")
# Where the pass may run: the model itself and `features/compute.py`, the one way features are computed.
RUNS_THE_PASS = {"modeling_enecg.py", "features/compute.py"}
# Still running it on their own, to fold into `features.compute` (the list may only shrink; the test fails until a
# folded entry is removed): none.
NOT_YET_FOLDED: set[str] = set()


def modules_calling(names: tuple[str, ...], root: Path = PACKAGE) -> set[str]:
    """Files under `root` (relative to it) with a call `<anything>.<name>(...)` for one of `names`, at any depth."""
    found = set()
    for path in root.rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        if any(isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in names
               for node in ast.walk(tree)):
            found.add(path.relative_to(root).as_posix())
    return found


def test_only_the_model_and_features_compute_run_the_frozen_pass():
    assert modules_calling(FROZEN_PASS) == RUNS_THE_PASS | NOT_YET_FOLDED


def test_the_check_finds_a_second_frozen_pass(tmp_path):
    (tmp_path / "training").mkdir()
    (tmp_path / "training" / "table.py").write_text(
        "class Table:\n    def load(self, model, x):\n        return [model.compute_frozen_columns(x, None)]\n")
    (tmp_path / "training" / "other.py").write_text("def f(model, x):\n    return model.compute_features_of(x)\n")
    (tmp_path / "pipeline.py").write_text("def f(self, x):\n    return self.compute_normalized_features(x)\n")
    assert modules_calling(FROZEN_PASS, tmp_path) == {"training/table.py"}


def test_the_names_training_exported_are_the_features_ones():
    """`from enecg_hf.training import FeatureTable` (and `training.fitting`'s) and the helpers of the removed
    `training/features.py` still work, and are the objects of their one home."""
    import enecg_hf.features as features
    import enecg_hf.training as training
    from enecg_hf.training import fitting

    for name in ("FeatureTable", "compute_features", "expert_fingerprint", "build_feature_cache"):
        assert getattr(training, name) is getattr(features, name), name
        assert name in training.__all__ and name in features.__all__, name
    assert fitting.FeatureTable is features.FeatureTable
    assert features.FeatureTable.__module__ == "enecg_hf.features.table"
    assert importlib.util.find_spec("enecg_hf.training.features") is None
    assert all(hasattr(training, name) for name in training.__all__)
