"""The table of tasks: encodings, and agreement of every shipped config with it."""

import json
from pathlib import Path

import pytest

import enecg_hf
from enecg_hf.data import TASKS, TaskError, TaskSpec
from enecg_hf.data.labels import LABEL_COLUMNS, SEX_LABELS


HUB_CONFIGS = sorted((Path(enecg_hf.__file__).parent / "hub_configs").glob("*.json"))


def test_the_data_module_reads_the_table():
    assert LABEL_COLUMNS == tuple(TASKS) == ("rr_interval", "age", "sex", "potassium_flag", "arrhythmia")
    assert SEX_LABELS is TASKS["sex"].class_names


def test_encode_and_decode_round_trip():
    sex, rr = TASKS["sex"], TASKS["rr_interval"]
    assert [sex.encode(v) for v in ("female", "male", 0, 1, None, "unknown")] == [0, 1, 0, 1, None, None]
    assert sex.decode(sex.encode("male")) == "male"
    assert rr.encode("812.5") == 812.5 and rr.decode(812.5) == 812.5 and rr.unit == "ms"
    with pytest.raises(TaskError, match="not one of the classes"):
        sex.encode("x")
    with pytest.raises(TaskError, match="not a class index"):
        sex.encode(2)
    with pytest.raises(TaskError, match="at least 2 class names"):
        TaskSpec("flag", "single_label_classification", class_names=("only",))


@pytest.mark.parametrize("path", HUB_CONFIGS, ids=lambda p: p.name)
def test_every_hub_config_agrees_with_the_table(path):
    config = json.loads(path.read_text())
    if "tasks" in config:  # a multi-task config: one entry per task
        assert [task["name"] for task in config["tasks"]] == list(TASKS), path.name
        described = [(t["problem_type"], t.get("unit"), tuple(t["class_names"]) if t.get("class_names") else None)
                     for t in config["tasks"]]
    else:
        spec = TaskSpec.from_config(config)
        assert spec.name in TASKS, f"{path.name}: unknown task {spec.name!r}"
        described = [(spec.problem_type, spec.unit, spec.class_names)]
    names = [t["name"] for t in config["tasks"]] if "tasks" in config else [config["label_name"]]
    assert described == [(TASKS[n].problem_type, TASKS[n].unit, TASKS[n].class_names) for n in names]
