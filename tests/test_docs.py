"""Code in the documentation runs as written, and says what it prints."""

from __future__ import annotations

import re

import pytest
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
    # The shapes its comments state, for the 9 experts of tiny.json.
    for comment, value in (("(4, 1)", out.logits), ("(4, 9, 1)", out.expert_logits), ("(4, 9)", out.gate_weights)):
        assert f"# {comment}" in snippet and tuple(value.shape) == eval(comment)  # noqa: S307
    torch.testing.assert_close(out.gate_weights.sum(-1), torch.ones(4))
    assert out.loss.item() < 10  # the standardised target: O(1), not O(800^2)
    assert (tmp_path / "my-enecg" / "config.json").is_file()


# Task ids of the Hub (huggingface.js `PIPELINE_DATA`) that an EnECG card may name.
HUB_TASK_IDS = {"tabular-regression", "tabular-classification"}


def render_card(folder, problem_type: str = "regression", sources=("simulated", "ludb")) -> str:
    from transformers import AutoModel

    from enecg_hf.training.model_card import random_weight_experts, render_model_card

    model = AutoModel.from_pretrained(folder)
    summary = {"mae": {"mean": 10.0, "std": 1.0}} if problem_type == "regression" else {
        "accuracy": {"mean": 0.7, "std": 0.1}}
    task = model.config.task_configs[0]
    metrics = {"problem_type": problem_type, "label": task.label_name, "unit": task.label_unit,
               "classes": None if problem_type == "regression" else list(task.id2label.values()),
               "records": 10, "folds": [{}, {}], "cv": summary, "cv_baseline": summary,
               "final": {"metrics": {k: v["mean"] for k, v in summary.items()}}}
    training_args = {"epochs": 1, "batch_size": 2, "learning_rate": 1e-3, "weight_decay": 0.0, "seed": 0,
                     "cache_features": True}
    return render_model_card(model, metrics, training_args, list(sources), random_weight_experts(model), str(folder))


def test_model_card_metadata_is_what_the_hub_reads(tmp_path):
    from huggingface_hub import ModelCard

    from helpers import build_model_folder

    folder = build_model_folder(tmp_path / "rr", ["dlinear"], target_mean=800.0, target_std=150.0)
    card = ModelCard(render_card(folder))
    data = card.data.to_dict()
    assert data["pipeline_tag"] == "tabular-regression" and data["library_name"] == "transformers"
    assert "datasets" not in data  # simulated and LUDB have no Hub dataset ids
    (result,) = data["model-index"][0]["results"]
    assert result["task"]["type"] in HUB_TASK_IDS and result["dataset"]["name"].startswith("simulated, ludb")
    assert "@article{xu2025enecg" in card.text and "arXiv:2511.22935" in card.text
    assert "[ludb](https://physionet.org/content/ludb/1.0.1/)" in card.text

    classifier = build_model_folder(tmp_path / "sex", ["dlinear"], label_name="sex", label_unit=None,
                                    problem_type="single_label_classification", num_labels=2,
                                    id2label={0: "female", 1: "male"}, label2id={"female": 0, "male": 1})
    data = ModelCard(render_card(classifier, "single_label_classification")).data.to_dict()
    assert data["pipeline_tag"] == "tabular-classification"
    assert data["model-index"][0]["results"][0]["task"]["type"] in HUB_TASK_IDS


def test_a_multi_task_card_has_a_section_and_results_per_task_without_undefined_scores():
    """A multi-task card: every task's CV results, and the leave-one-source-out ones under a split of their own, in
    the metadata (scores that are NaN, e.g. F1 of a fold set with one class, left out); a section per task; the
    adaptation and gate as configured."""
    from huggingface_hub import ModelCard

    from enecg_hf import EnECGModel
    from enecg_hf.training.model_card import random_weight_experts, render_model_card
    from test_multitask import multitask_config

    nan = float("nan")
    model = EnECGModel(multitask_config(adaptation="full", gate_type="uniform"))

    def block(label, problem_type, cv, **extra):
        return {"label": label, "problem_type": problem_type, "records": 12, "folds": [{}, {}], "cv": cv,
                "cv_baseline": cv, "final": {"metrics": {name: value["mean"] for name, value in cv.items()}}, **extra}

    by_source = {"groups": [{"source": "ludb", "test_records": 4, "train_records": 8, "metrics": {"mae": 21.0},
                             "baseline": {"mae": 30.0}},
                            {"source": "ptb-xl", "test_records": 8, "train_records": 4, "metrics": {"mae": nan},
                             "baseline": {"mae": 33.0}}],
                 "pooled": {"mae": 22.0, "rmse": nan}, "baseline_pooled": {"mae": 31.0, "rmse": 40.0}, "records": 12}
    metrics = {"records": 12, "tasks": {
        "rr_interval": block("rr_interval", "regression", {"mae": {"mean": 20.0, "std": 2.0}}, unit="ms",
                             cv_source=by_source),
        "sex": block("sex", "single_label_classification", {"auroc": {"mean": 0.8, "std": 0.05},
                                                            "f1": {"mean": nan, "std": nan}},
                     classes=["female", "male"]),
        "arrhythmia": block("arrhythmia", "single_label_classification", {"auroc": {"mean": 0.7, "std": 0.1}},
                            classes=["sinus", "other"])}}
    training_args = {"epochs": 1, "batch_size": 2, "learning_rate": 1e-3, "weight_decay": 0.0, "seed": 0,
                     "cache_features": True}
    card = ModelCard(render_model_card(model, metrics, training_args, ["ludb", "ptb-xl"], random_weight_experts(model),
                                       "me/multi"))
    data = card.data.to_dict()
    assert data["pipeline_tag"] == "tabular-regression" and data["metrics"] == ["mae", "auroc", "f1"]
    assert {"multi-task", "time-series-regression", "time-series-classification"} <= set(data["tags"])
    # (The Hub keeps one task name per task type and dataset: the names are not compared.)
    results = [(r["task"]["type"], r["dataset"]["name"], r["dataset"].get("split"), m["type"], m["name"], m["value"])
               for r in data["model-index"][0]["results"] for m in r["metrics"]]
    cv = "ludb, ptb-xl (2-fold subject-wise CV)"
    assert sorted(results, key=str) == sorted([
        ("tabular-regression", cv, None, "mae", "MAE (CV mean)", 20.0),
        ("tabular-classification", cv, None, "auroc", "AUROC (CV mean)", 0.8),
        ("tabular-classification", cv, None, "auroc", "AUROC (CV mean)", 0.7),
        ("tabular-regression", "ludb, ptb-xl (leave-one-source-out CV)", "held-out sources", "mae",
         "MAE (held-out sources, pooled)", 22.0)], key=str)
    assert all(r["dataset"]["type"] == "ludb+ptb-xl" for r in data["model-index"][0]["results"])
    text = card.text
    assert ("EnECG multi-task ensemble for **rr_interval, sex, arrhythmia** (3 tasks from one pass of the experts)"
            in text)
    assert "small FFN head (trained fully); a uniform average (no learned gate) per task mixes" in text
    assert '{"tasks": {"rr_interval": {...}, "sex": {...}, "arrhythmia": {...}}}' in text
    assert "### sex (classification, 12 records)" in text and "| ptb-xl | 8 | 4 | n/a | n/a | 33 |" in text


def test_model_card_usage_snippets_run_as_written(tmp_path, monkeypatch):
    """The card's snippets, in order, on the model folder: the first reads LUDB record 1 from PhysioNet, which the
    test serves from the local copy (no network here)."""
    import wfdb

    from helpers import build_model_folder, shared

    folder = build_model_folder(tmp_path / "rr", ["dlinear", "features"], target_mean=800.0, target_std=150.0)
    card = render_card(folder)
    snippets = re.findall(r"```python\n(.*?)```", card, re.S)
    assert len(snippets) == 2 and card.index(snippets[0]) < card.index("## Intended use")  # the first thing shown
    assert 'pn_dir="ludb/1.0.1/data"' in snippets[0] and "trust_remote_code=True" in snippets[0]
    local = shared("ludb", "data", "1").parent
    read = wfdb.rdrecord

    def rdrecord(name, pn_dir=None, **kwargs):
        assert pn_dir == "ludb/1.0.1/data"
        return read(str(local / name), **kwargs)

    monkeypatch.setattr(wfdb, "rdrecord", rdrecord)
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    namespace: dict = {}
    for snippet in snippets:
        exec(compile(snippet, "model card", "exec"), namespace)  # noqa: S102 - our own template
    output = namespace["output"]
    assert output.logits.shape == (1, 1) and output.gate_weights.shape == (1, 2)
    direct = namespace["ecg"](namespace["record"].p_signal.T, sampling_rate=500,
                              lead_names=namespace["record"].sig_name)
    assert direct["value"] == pytest.approx(float(output.logits[0, 0]), rel=1e-5)


def test_the_card_says_what_the_gate_reads():
    """The card's description of the gate follows `gate_type` and `gate_input` (the shipped model's gate reads the
    heads' predictions, not lead II)."""
    from enecg_hf import EnECGConfig
    from enecg_hf.training.model_card import gate_description

    experts = [{"name": "dlinear", "type": "dlinear", "input_length": 500, "settings": {"preset": "tiny"}}]
    assert gate_description(EnECGConfig(experts=experts, gate_leads=["II", "V1"])) == (
        "learned softmax gate reading II, V1")
    assert gate_description(EnECGConfig(experts=experts, gate_input="predictions")) == (
        "learned softmax gate reading the heads' predictions")
    assert gate_description(EnECGConfig(experts=experts, gate_type="uniform")) == "uniform average (no learned gate)"
