"""The feature store's fingerprints follow what the frozen pass computes (issue 27, "one frozen pass").

Every field of `EnECGConfig` and of an expert's entry is changed one at a time on a tiny model (TimesNet, then DLinear,
the expert whose entry changes), and each column of the frozen pass is recomputed for two random records:

- a column whose values changed must have a new fingerprint: the store never serves values computed under another
  config (a field the code reads but does not declare would fail here);
- a column whose values did not change keeps its fingerprint (no needless recompute), except for the few changes in
  `CONSERVATIVE`, which are fingerprinted although they do not change the values, each with its reason.

Every field of `EnECGConfig` (and of `EnECGExpertConfig`) must be listed below: a new field fails the test until it is
given a change to try.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from enecg_hf.preprocessing_enecg import STANDARD_LEAD_NAMES


REPO = Path(__file__).resolve().parents[1]
TINY = json.loads((REPO / "hub_configs" / "tiny.json").read_text())
# TimesNet first: DLinear, whose entry changes, is built last, so a change of its weights' shapes leaves TimesNet's
# random weights alone.
EXPERTS = [next(e for e in TINY["experts"] if e["name"] == name) for name in ("timesnet", "dlinear")]
BASE = {**{k: v for k, v in TINY.items() if k not in ("model_type", "num_labels")}, "experts": EXPERTS,
        "label_name": "sex", "problem_type": "single_label_classification", "id2label": {0: "male", 1: "female"}}

# One change per field of EnECGConfig (and the inherited fields the model reads), each valid on its own.
MODEL_CHANGES = {
    "experts": [*EXPERTS, {**EXPERTS[1], "name": "dlinear_2", "settings": {"preset": "paper"}}],  # one more expert
    "sampling_rate": 250,
    "input_length": 4000,
    "lead_names": list(STANDARD_LEAD_NAMES)[::-1],  # the same rows read as other leads
    "normalization": "lead",
    "label_name": "rhythm",
    "label_unit": "ms",
    "target_mean": 800.0,
    "target_std": 150.0,
    "head_hidden_size": 8,
    "head_dropout": 0.2,
    "head_standardize": False,
    "head_input_clip": 3.0,
    "head_linear_clip": 12.0,
    "head_type": "ffn",
    "regression_loss": "mse",
    "huber_delta": 0.5,
    "expert_loss_weight": 0.0,
    "class_weights": [1.0, 3.0],
    "logit_temperature": 0.7,
    "gate_leads": ["I", "II"],
    "gate_input_length": 250,
    "gate_hidden_size": 8,
    "gate_type": "uniform",
    "gate_input": "predictions",
    "adaptation": "full",
    "lora_r": 2,
    "lora_alpha": 8,
    "lora_dropout": 0.2,
    "save_backbones": False,
    "max_input_seconds": 30.0,
    "tasks": [{"name": "sex", "problem_type": "single_label_classification", "class_names": ["male", "female"]},
              {"name": "age", "problem_type": "regression", "unit": "years"}],
    # inherited from PreTrainedConfig
    "problem_type": "multi_label_classification",
    "id2label": {0: "a", 1: "b", 2: "c"},
    "output_hidden_states": True,
    "return_dict": False,
    "dtype": "bfloat16",
}
# One change (or more) per field of the varied expert's entry; `pretrained` is filled in with a folder of the same
# weights by the test.
ENTRY_CHANGES = {
    "name": {"name": "renamed"},
    "type": {"type": "timesnet"},
    "input_length": {"input_length": 250},
    "leads": {"leads": ["I", "II"]},
    "pretrained": {"pretrained": "<folder of the same weights>"},
    "settings": {"settings": {"preset": "tiny", "moving_avg": 5}},
    "settings (a preset's own value spelled out)": {"settings": {"preset": "tiny", "pred_len": 16}},
}
# (change, column) fingerprinted although its values stay the same, and why. Columns: "expert 0", "expert 1", "gate".
CONSERVATIVE = {
    # The record is taken to be at this rate (experts measuring in seconds need it to match their `record_seconds`);
    # the same samples read at another rate are another record. Kept in every fingerprint as the stores written before
    # this check have it.
    **{("sampling_rate", column): "the rate the record is at" for column in ("expert 0", "expert 1", "gate")},
    # An expert's entry is fingerprinted as written (its weights are hashed as well): another source of the same
    # weights, or settings that spell out what the preset already says, are recomputed once.
    ("entry pretrained", "expert 1"): "the entry as written",
    ("entry settings (a preset's own value spelled out)", "expert 1"): "the entry as written",
}
# Fields of PreTrainedConfig not changed: transformers' own bookkeeping, which no EnECG code reads.
INHERITED_NOT_READ = ("base_config_key", "sub_configs_defaults", "attribute_map", "base_model_tp_plan",
                      "base_model_fsdp_plan", "base_model_pp_plan", "base_model_ep_plan", "_auto_class", "extra_files",
                      "extra_config_files", "model_type", "transformers_version", "architectures",
                      "chunk_size_feed_forward", "is_encoder_decoder", "label2id")


SINGLE_TASK_FIELDS = ("label_name", "label_unit", "problem_type", "id2label")


def build(config: dict):
    from enecg_hf import EnECGConfig, EnECGModel

    torch.manual_seed(0)
    model = EnECGModel(EnECGConfig(**config)).eval()
    if any(e.get("pretrained") for e in config["experts"]):
        model.load_expert_weights([e["name"] for e in config["experts"] if e.get("pretrained")])
    return model


def columns(model) -> dict[str, tuple[str, torch.Tensor]]:
    """`{"expert <i>" or "gate": (store folder, values of two random records)}`: experts by their place in the config
    (a renamed expert is the same column)."""
    from enecg_hf.features import model_columns

    generator = torch.Generator().manual_seed(1)
    records = torch.randn(2, len(model.config.lead_names), model.config.input_length, generator=generator)
    with torch.no_grad():
        values = model.compute_frozen_columns(records)
    roles = [f"expert {i}" for i in range(len(model.experts))] + ["gate"]
    return {role: (column.folder, values[column.column].float()) for role, column in zip(roles, model_columns(model))}


def problems(change: str, base: dict, variant: dict) -> list[str]:
    """What is wrong with the fingerprints of `variant`'s columns against `base`'s, after `change`."""
    found = []
    for role in base.keys() & variant.keys():
        (folder, values), (new_folder, new_values) = base[role], variant[role]
        values_changed = values.shape != new_values.shape or not torch.equal(values, new_values)
        fingerprint_changed = folder != new_folder
        if values_changed and not fingerprint_changed:
            found.append(f"{change}: the values of {role} change but its fingerprint does not (stale values served)")
        elif not values_changed and fingerprint_changed != ((change, role) in CONSERVATIVE):
            found.append(f"{change}: the values of {role} stay the same, but its fingerprint "
                         + ("changes (a needless recompute)" if fingerprint_changed else
                            "does not change: remove the entry from CONSERVATIVE"))
    return found


def variants(tmp_path: Path):
    """`(change name, config)` of every change of `MODEL_CHANGES` and `ENTRY_CHANGES`."""
    for field, value in MODEL_CHANGES.items():
        # BASE describes its one task in the single-task fields of earlier releases; `tasks` replaces them.
        base = {k: v for k, v in BASE.items() if k not in SINGLE_TASK_FIELDS} if field == "tasks" else BASE
        yield field, {**base, field: value}
    weights = build(BASE).experts["dlinear"].save_pretrained(tmp_path / "dlinear")
    for name, change in ENTRY_CHANGES.items():
        change = {"pretrained": str(weights)} if name == "pretrained" else change
        yield f"entry {name}", {**BASE, "experts": [EXPERTS[0], {**EXPERTS[1], **change}]}


def test_every_field_is_tried():
    from enecg_hf import EnECGConfig, EnECGExpertConfig
    from transformers import PreTrainedConfig

    assert set(EnECGConfig.__annotations__) - set(MODEL_CHANGES) == set()
    assert set(PreTrainedConfig.__annotations__) - set(MODEL_CHANGES) == set(INHERITED_NOT_READ)
    assert {f.name for f in dataclasses.fields(EnECGExpertConfig)} <= set(ENTRY_CHANGES)


def test_a_column_gets_a_new_fingerprint_exactly_when_its_values_change(tmp_path):
    base = columns(build(BASE))
    found, changed = [], set()
    for change, config in variants(tmp_path):
        variant = columns(build(config))
        found += problems(change, base, variant)
        changed |= {(change, role) for role in base.keys() & variant.keys() if base[role][0] != variant[role][0]}
    assert not found, "\n".join(found)
    # What the frozen pass reads changes what it should, and only that.
    assert {change for change, role in changed if role == "gate"} == {
        "sampling_rate", "input_length", "lead_names", "normalization", "gate_leads", "gate_input_length"}
    assert {change for change, role in changed if role == "expert 0"} == {
        "sampling_rate", "input_length", "lead_names", "normalization"}
    assert {change for change, role in changed if role == "expert 1"} == {
        "sampling_rate", "input_length", "lead_names", "normalization", *(
            f"entry {name}" for name in ENTRY_CHANGES if name != "name")}


@pytest.mark.parametrize("field", ["gate_input_length", "gate_leads", "normalization"])
def test_the_check_finds_a_field_left_out_of_the_fingerprint(monkeypatch, field):
    """A column whose code reads a field that its declared dependencies leave out (simulated by dropping the field
    from what the model says the gate input depends on) is reported as serving stale values."""
    from enecg_hf import EnECGModel

    frozen_columns = EnECGModel.frozen_columns

    def leaving_out(self):
        listed = frozen_columns(self)
        listed[-1].depends_on.pop(field)
        return listed

    monkeypatch.setattr(EnECGModel, "frozen_columns", leaving_out)
    assert problems(field, columns(build(BASE)), columns(build({**BASE, field: MODEL_CHANGES[field]}))) == [
        f"{field}: the values of gate change but its fingerprint does not (stale values served)"]
