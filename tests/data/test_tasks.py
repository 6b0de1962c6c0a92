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


@pytest.mark.parametrize(
    "value, age, reason",
    [
        # Issue 25: these were stored as 5, 5, 90, 1, 1, 12, 5 (sign and exponent dropped, PTB-XL's 300 everywhere).
        (-5, None, "out_of_range"),
        ("-5", None, "out_of_range"),
        (1e9, None, "out_of_range"),
        ("1e9", None, "out_of_range"),
        ("1e-3", 0.001, None),  # a number as a whole, and a possible age (a newborn's, in years)
        ("abc12", None, "not_a_number"),
        ([5], None, "not_a_number"),
        (300, None, "out_of_range"),  # "over 89" only in PTB-XL
        (True, None, "not_a_number"),
        (float("inf"), None, "not_a_number"),
        ("12 years", None, "not_a_number"),
        (" 78 ", 78.0, None),
        (63, 63.0, None),
        (">89", 90.0, None),
        ("NaN", None, None),  # missing, not unusable: no note
        (None, None, None),
    ],
)
def test_ages_are_numbers_as_a_whole_within_the_tasks_range(value, age, reason):
    from enecg_hf.data.labels import parse_age

    notes = []
    assert parse_age(value, notes) == age
    assert [note["reason"] for note in notes] == ([reason] if reason else [])
    if reason:
        assert notes[0]["label"] == "age" and repr(value)[:10] in notes[0]["detail"]


def test_the_over_89_code_is_the_sources_and_ranges_are_the_tables():
    from enecg_hf.data.labels import parse_age, parse_float, parse_sex

    assert parse_age(300, over_89_code=300) == parse_age("300", over_89_code=300) == 90.0
    assert parse_age(301, over_89_code=300) is None
    assert TASKS["age"].valid_range == (0.0, 125.0) and TASKS["rr_interval"].valid_range == (100.0, 10000.0)
    assert TASKS["sex"].valid_range is None
    notes = []
    assert parse_float("812.5", label="rr_interval", notes=notes) == 812.5
    assert parse_float(29999, (29999.0,), "rr_interval", notes) is None and notes == []  # a placeholder: missing
    assert parse_float(-800, label="rr_interval", notes=notes) is None and notes[-1]["reason"] == "out_of_range"
    assert parse_float("8e2x", label="rr_interval", notes=notes) is None and notes[-1]["reason"] == "not_a_number"
    assert parse_sex("x", notes=notes) is None and notes[-1] == {
        "label": "sex", "reason": "unknown_value", "detail": "sex 'x' is none of F/female/M/male/0/1"}
    with pytest.raises(TaskError, match="valid_range"):
        TaskSpec("sex", "single_label_classification", class_names=("f", "m"), valid_range=(0, 1))
