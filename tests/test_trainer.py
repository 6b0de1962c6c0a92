"""Training EnECG with `transformers.Trainer` on a dataset built by `enecg_hf.data` (docs/training.md, "With
transformers.Trainer"): the columns the model reads, the statistics the callback fits, and a tiny model that learns."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import REPO


@pytest.fixture(scope="module")
def simulated():
    from enecg_hf.data import build_dataset

    return build_dataset("simulated", limit=45, seed=0)


def tiny_model(experts: list[str], **overrides):
    from enecg_hf import EnECGConfig, EnECGModel

    config = json.loads((REPO / "hub_configs" / "tiny.json").read_text())
    config["experts"] = [e for e in config["experts"] if e["name"] in experts]
    config.pop("model_type")
    if "id2label" in overrides:
        config.pop("num_labels")
    config.update(overrides)
    torch.manual_seed(0)
    return EnECGModel(EnECGConfig(**config))


@pytest.mark.slow
def test_trainer_learns_rr_intervals_from_a_built_dataset(simulated, tmp_path):
    """The documented recipe: model_inputs + EnECGTrainerCallback + a plain Trainer (default collator, default
    remove_unused_columns) trains a tiny model with the ECG-features expert far below the mean predictor."""
    from transformers import Trainer, TrainingArguments

    from enecg_hf.data import subject_kfold
    from enecg_hf.training import EnECGTrainerCallback, model_inputs, regression_metrics

    train_idx, test_idx = subject_kfold(simulated, k=3, seed=0)[0]
    model = tiny_model(["features"])
    train = model_inputs(simulated.select(train_idx), config=model.config)
    test = model_inputs(simulated.select(test_idx), config=model.config)
    assert train.column_names == ["input_values", "labels"]
    args = TrainingArguments(str(tmp_path), num_train_epochs=10, per_device_train_batch_size=8, learning_rate=1e-2,
                             save_strategy="no", report_to="none", use_cpu=True, seed=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=test,
                      compute_metrics=regression_metrics, callbacks=[EnECGTrainerCallback()])
    trainer.train()

    train_labels = np.asarray(simulated.select(train_idx)["rr_interval"], dtype=np.float64)
    (task,) = model.tasks.values()  # a single-task model: one task
    assert task.task_config.target_mean == pytest.approx(train_labels.mean(), rel=1e-6)
    assert task.task_config.target_std == pytest.approx(train_labels.std(), rel=1e-6)
    assert float(task.heads["features"].input_std.sub(1).abs().max()) > 0  # head standardisation was fitted
    assert float(task.heads["features"].linear.weight.abs().max()) > 0  # and the linear path (LoRA cannot train it)
    metrics = trainer.evaluate()
    test_labels = np.asarray(simulated.select(test_idx)["rr_interval"], dtype=np.float64)
    mean_predictor = float(np.abs(test_labels - train_labels.mean()).mean())
    print(f"Trainer: eval MAE {metrics['eval_mae']:.1f} ms, mean predictor {mean_predictor:.1f} ms")
    assert metrics["eval_mae"] < 0.6 * mean_predictor


def test_model_inputs_gives_the_forward_columns(simulated):
    import datasets

    from enecg_hf.training import model_inputs

    model = tiny_model(["dlinear"], label_name="arrhythmia", problem_type="single_label_classification",
                       id2label=dict(enumerate(simulated.features["arrhythmia"].names)), label_unit=None)
    records = simulated.select(range(10))
    with_a_gap = datasets.concatenate_datasets([records, records.select([0]).map(lambda _: {"arrhythmia": None})])
    inputs = model_inputs(with_a_gap, config=model.config)
    assert inputs.column_names == ["input_values", "labels"] and len(inputs) == 10  # the unlabelled record is left out
    row = inputs[0]
    assert row["input_values"].shape == (12, 5000) and row["labels"].dtype == torch.int64
    with torch.no_grad():
        out = model(**{k: torch.stack([inputs[i][k] for i in range(3)]) for k in inputs.column_names})
    assert out.logits.shape == (3, 6) and torch.isfinite(out.loss)

    # A column of class names (a dataset not built by enecg_hf.data) maps to the model's classes by name.
    names = records.features["arrhythmia"].names
    features = records.features.copy()
    features["arrhythmia"] = datasets.Value("string")
    as_strings = records.map(lambda v: {"arrhythmia": names[v]}, input_columns="arrhythmia", features=features)
    assert [int(v) for v in model_inputs(as_strings, config=model.config)["labels"]] == list(records["arrhythmia"])


@pytest.mark.parametrize(
    "case, message",
    [
        ("unknown_column", r"no column \['heart_axis'\]"),
        ("strings_without_config", "holds strings"),
        ("other_classes", "the model's are"),
        ("other_length", r"signals are \(12, 5000\).*reads \(12, 2500\)"),
    ],
)
def test_model_inputs_refuses_what_the_model_cannot_read(simulated, case, message):
    import datasets

    from enecg_hf.training import model_inputs

    records = simulated.select(range(4))
    with pytest.raises(ValueError, match=message):
        if case == "unknown_column":
            model_inputs(records, "heart_axis")
        elif case == "strings_without_config":
            model_inputs(records.cast_column("arrhythmia", datasets.Value("string")), "arrhythmia")
        elif case == "other_classes":
            model = tiny_model(["dlinear"], label_name="sex", problem_type="single_label_classification",
                               id2label={0: "male", 1: "female"}, label_unit=None)
            model_inputs(records, config=model.config)
        else:
            model = tiny_model(["dlinear"], input_length=2500, sampling_rate=250, gate_input_length=250)
            model_inputs(records, config=model.config)
