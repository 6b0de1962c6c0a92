"""Builders on collections the tests write: MIMIC-IV-ECG and PTB-XL trees, the research JSONL, corrupted records,
and the command line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from enecg_hf.data import DatasetBuildError, LayoutError, build, build_dataset, column_folds
from enecg_hf.data.__main__ import main

from ecg_files import (STANDARD, assert_standard_order, lead_pattern, peak_allocation, rhythm, write_header,
                       write_mat_zeros, write_ptbxl_tree, write_record)


# MIMIC-IV-ECG stores aVF before aVL.
MIMIC_LEADS = ("I", "II", "III", "aVR", "aVF", "aVL", "V1", "V2", "V3", "V4", "V5", "V6")


@pytest.fixture
def mimic_tree(tmp_path):
    root = tmp_path / "mimic-iv-ecg"
    studies = [(10000032, 40689238), (10000032, 44458630), (10000117, 45090959)]
    records = []
    for subject, study in studies:
        relative = f"files/p{str(subject)[:4]}/p{subject}/s{study}/{study}"
        write_record(root / relative.rsplit("/", 1)[0], str(study), lead_names=MIMIC_LEADS)
        records.append({"subject_id": subject, "study_id": study, "file_name": study, "ecg_time": "2180-07-23 08:44:00",
                        "path": relative})
    pd.DataFrame(records).to_csv(root / "record_list.csv", index=False)
    measurements = pd.DataFrame(
        {
            "subject_id": [s for s, _ in studies],
            "study_id": [s for _, s in studies],
            "report_0": ["Sinus rhythm", "Atrial fibrillation with rapid ventricular response", "Sinus bradycardia"],
            "report_1": ["Left axis deviation", None, None],
            "report_2": ["Borderline ECG", None, None],
            "rr_interval": [857, 29999, 1200],
            "qrs_axis": [-40, 29999, 10],
        }
    )
    measurements.to_csv(root / "machine_measurements.csv", index=False)
    labels = pd.DataFrame({"subject_id": [10000032, 10000032, 10000117], "study_id": [40689238, 44458630, 45090959],
                           "anchor_age": [52, 52, 91], "gender": ["F", "F", "M"], "flag": ["abnormal", None, "normal"]})
    labels.to_csv(tmp_path / "labels.csv", index=False)
    return root


def test_mimic_iv_ecg_tree(mimic_tree, tmp_path):
    dataset = build_dataset("mimic-iv-ecg", mimic_tree, labels_csv=tmp_path / "labels.csv").with_format("numpy")
    assert len(dataset) == 3 and set(dataset["source"]) == {"mimic-iv-ecg"}
    rows = {row["record_id"]: row for row in dataset}
    first, second, third = rows["40689238"], rows["44458630"], rows["45090959"]
    assert first["subject_id"] == second["subject_id"] == "10000032"
    assert first["rr_interval"] == 857 and np.isnan(second["rr_interval"])  # 29999 is the machine's "not measured"
    assert rhythm(dataset, first["arrhythmia"]) == "sinus_rhythm"
    assert rhythm(dataset, second["arrhythmia"]) == "atrial_fibrillation"
    assert rhythm(dataset, third["arrhythmia"]) == "sinus_bradycardia"
    assert list(first["diagnoses"]) == ["Sinus rhythm", "Left axis deviation", "Borderline ECG"]
    assert (first["age"], first["sex"], first["potassium_flag"]) == (52, 0, 1)
    assert (third["age"], third["sex"], third["potassium_flag"]) == (91, 1, 0)
    for row in rows.values():
        assert_standard_order(row["signal"], 500)


def test_mimic_iv_ecg_without_user_labels_has_null_demographics(mimic_tree):
    table = build_dataset("mimic-iv-ecg", mimic_tree).remove_columns("signal").to_pandas()
    assert table[["age", "sex", "potassium_flag"]].isna().all().all()
    assert table["rr_interval"].notna().sum() == 2


@pytest.fixture
def ptbxl_tree(tmp_path):
    return write_ptbxl_tree(tmp_path / "ptb-xl")


def test_ptbxl_tree(ptbxl_tree):
    dataset = build_dataset("ptb-xl", ptbxl_tree).with_format("numpy")
    assert len(dataset) == 5 and "strat_fold" in dataset.column_names
    rows = {row["record_id"]: row for row in dataset}
    assert rows["1"]["subject_id"] == "15709" and rows["2"]["subject_id"] == rows["3"]["subject_id"] == "13243"
    assert rows["1"]["sex"] == 0 and rows["2"]["sex"] == 1 and rows["1"]["age"] == 56  # PTB-XL: 0 = male, 1 = female
    assert rows["2"]["age"] == 90  # 300 means "over 89"
    assert np.isnan(rows["5"]["age"])
    assert [rhythm(dataset, rows[str(i)]["arrhythmia"]) for i in range(1, 6)] == [
        "sinus_rhythm", "sinus_bradycardia", "atrial_flutter", "other", None]
    assert list(rows["1"]["diagnoses"]) == ["NORM", "LVOLT", "SR"]
    for row in rows.values():
        assert_standard_order(row["signal"], 500)
    folds = column_folds(dataset, "strat_fold")
    assert len(folds) == 4
    test_sides = [sorted(dataset.select(test)["record_id"]) for _, test in folds]
    assert test_sides == [["2", "3"], ["1"], ["5"], ["4"]]
    for train, test in folds:
        assert not set(train) & set(test) and len(train) + len(test) == 5


def test_ptbxl_low_rate_files_for_low_rate_builds(ptbxl_tree):
    dataset = build_dataset("ptb-xl", ptbxl_tree, sampling_rate=100).with_format("numpy")
    assert dataset[0]["signal"].shape == (12, 1000) and dataset[0]["sampling_rate"] == 100
    assert set(dataset["source_sampling_rate"]) == {100}
    assert_standard_order(dataset[0]["signal"], 100)


def test_ptbxl_records100_alone_is_read_and_resampled_to_the_stored_rate(tmp_path):
    """A download of the 100 Hz files only (`filename_hr` names absent files): every record is read from
    `records100/`, resampled to 500 Hz, and the dataset and the report keep the source rate."""
    root = write_ptbxl_tree(tmp_path / "ptb-xl", rates=lambda ecg_id: (100,))
    result = build("ptb-xl", root)
    dataset, report = result.dataset.with_format("numpy"), result.report
    assert report.records_kept == 5 and not report.skipped
    assert report.source_sampling_rates == {"100": 5}
    assert "source rates: 100 Hz 5 (5 records resampled to 500 Hz)" in report.summary()
    assert set(dataset["source_sampling_rate"]) == {100} and set(dataset["sampling_rate"]) == {500}
    for row in dataset:
        assert row["signal"].shape == (12, 5000)
        assert_standard_order(row["signal"], 500)
    rows = {row["record_id"]: row for row in dataset}
    assert rows["2"]["subject_id"] == rows["3"]["subject_id"] == "13243" and rows["2"]["age"] == 90


def test_ptbxl_reads_records500_when_a_record_has_it_and_records100_otherwise(tmp_path):
    root = write_ptbxl_tree(tmp_path / "ptb-xl", rates=lambda ecg_id: (500, 100) if ecg_id <= 3 else (100,))
    result = build("ptb-xl", root)
    rates = dict(zip(result.dataset["record_id"], result.dataset["source_sampling_rate"]))
    assert rates == {"1": 500, "2": 500, "3": 500, "4": 100, "5": 100}
    assert result.report.source_sampling_rates == {"500": 3, "100": 2}
    for row in result.dataset.with_format("numpy"):
        assert_standard_order(row["signal"], 500)


def test_ptbxl_rate_option_chooses_the_folder(tmp_path, capsys):
    root = write_ptbxl_tree(tmp_path / "ptb-xl", rates=lambda ecg_id: (500, 100) if ecg_id <= 3 else (100,))
    low = build("ptb-xl", root, ptbxl_rate="100")
    assert set(low.dataset["source_sampling_rate"]) == {100} and low.report.source_sampling_rates == {"100": 5}
    high = build("ptb-xl", root, ptbxl_rate=500)
    assert sorted(high.dataset["record_id"]) == ["1", "2", "3"] and set(high.dataset["source_sampling_rate"]) == {500}
    assert {entry["record_id"]: entry["reason"] for entry in high.report.skipped} == {"4": "missing_file",
                                                                                      "5": "missing_file"}
    with pytest.raises(ValueError, match="ptbxl_rate must be one of"):
        build("ptb-xl", root, ptbxl_rate="250")
    output = tmp_path / "out"
    assert main(["--format", "ptb-xl", "--input", str(root), "--output", str(output), "--ptbxl-rate", "100"]) == 0
    assert "source rates: 100 Hz 5 (5 records resampled to 500 Hz)" in capsys.readouterr().out
    report = json.loads((output / "build_report.json").read_text())
    assert report["source_sampling_rates"] == {"100": 5} and report["records_kept"] == 5


def test_ptbxl_record_with_neither_file_is_skipped_naming_both(tmp_path):
    root = write_ptbxl_tree(tmp_path / "ptb-xl", rates=lambda ecg_id: () if ecg_id == 5 else (100,))
    report = build("ptb-xl", root).report
    assert [(entry["record_id"], entry["reason"]) for entry in report.skipped] == [("5", "missing_file")]
    assert "00005_hr.hea nor" in report.skipped[0]["detail"] and "00005_lr.hea exists" in report.skipped[0]["detail"]


def test_the_same_patient_in_two_ptbxl_folders_is_one_subject(tmp_path):
    """A 500 Hz folder and a 100 Hz folder sharing patient 13243 (its id written as 13243.0 in one table and 13243
    in the other): one `subject_id`, and every subject-wise split of `train.py --dataset A B` keeps its records on
    one side."""
    from enecg_hf.data import subject_kfold
    from enecg_hf.training.arguments import TrainScriptArguments
    from enecg_hf.training.records import load_training_dataset, make_folds

    first = write_ptbxl_tree(tmp_path / "sample500", rates=lambda ecg_id: (500,))
    second_records = [(ecg_id, patient, age, sex, scp, fold) for ecg_id, patient, age, sex, scp, fold in [
        (601, 13243, 61, 0, "{'SR': 0.0}", 2), (602, 20001, 44, 1, "{'SR': 0.0}", 4), (603, 20002, 50, 0, "{}", 5),
        (604, 20003, 70, 1, "{'AFIB': 100.0}", 6), (605, 13243, 62, 0, "{'SR': 0.0}", 2)]]
    second = write_ptbxl_tree(tmp_path / "lr", records=second_records, rates=lambda ecg_id: (100,))
    build("ptb-xl", first, output=tmp_path / "ds_500")
    build("ptb-xl", second, output=tmp_path / "ds_100")

    class Accelerator:  # only what loading a --dataset list uses
        is_main_process = True

    args = TrainScriptArguments(dataset=[str(tmp_path / "ds_500"), str(tmp_path / "ds_100")])
    dataset = load_training_dataset(args, Accelerator(), tmp_path)
    ids = dataset["record_id"]
    assert len(ids) == 10 and "source_sampling_rate" in dataset.column_names
    subjects = dict(zip(ids, dataset["subject_id"]))
    assert {subjects[i] for i in ("2", "3", "601", "605")} == {"13243"}
    patient_rows = {ids.index(i) for i in ("2", "3", "601", "605")}
    for k in (2, 3, 5):
        for seed in range(3):
            for folds in (make_folds(dataset, k, seed), subject_kfold(dataset, k, seed)):
                for train, test in folds:
                    assert patient_rows <= set(test.tolist()) or not patient_rows & set(test.tolist())


def test_a_recording_republished_in_another_folder_at_another_gain_is_trained_on_once(tmp_path, caplog):
    """`train.py --dataset A B` where B re-publishes two of A's recordings under new ids and 5x their amplitude (the
    Challenge 2020 `HR*` copies of PTB-XL records, whose headers say 200 units/mV): each recording is kept once, from
    A, and each dropped copy is logged with the record kept; B's other records and a same-patient record stay."""
    import datasets

    from enecg_hf.training.arguments import TrainScriptArguments
    from enecg_hf.training.records import load_training_dataset

    built = build("ptb-xl", write_ptbxl_tree(tmp_path / "ptb-xl", rates=lambda ecg_id: (500,))).dataset
    # The tree's records share one waveform; real recordings differ: a rhythm of each record's own rate.
    first = built.map(lambda row, index: {"signal": (np.asarray(row["signal"]) + 0.5 * np.sin(
        np.arange(len(row["signal"][0])) * (index + 1) / 300.0)).tolist()}, with_indices=True)
    first.save_to_disk(str(tmp_path / "ds_a"))
    copies = first.select([1, 3]).map(lambda row: {"signal": [[5.0 * v for v in lead] for lead in row["signal"]],
                                                   "record_id": "HR" + row["record_id"]})
    other = first.select([0]).map(lambda row: {"signal": [[v + 0.3 * ((i % 50) > 25) for i, v in enumerate(lead)]
                                                          for lead in row["signal"]], "record_id": "HR_other"})
    datasets.concatenate_datasets([copies, other]).save_to_disk(str(tmp_path / "ds_b"))

    class Accelerator:  # only what loading a --dataset list uses
        is_main_process = True

    args = TrainScriptArguments(dataset=[str(tmp_path / "ds_a"), str(tmp_path / "ds_b")])
    with caplog.at_level("WARNING", logger="enecg_hf.training.records"):
        dataset = load_training_dataset(args, Accelerator(), tmp_path)
    ids = dataset["record_id"]
    assert list(ids) == list(first["record_id"]) + ["HR_other"]
    dropped = [record.getMessage() for record in caplog.records if "is the recording of" in record.getMessage()]
    assert len(dropped) == 2
    for copy, kept in zip(copies["record_id"], first.select([1, 3])["record_id"]):
        assert any(f"record {copy} of {tmp_path / 'ds_b'} is the recording of {kept} of" in message
                   and "5.00x its amplitude" in message for message in dropped), dropped


def test_jsonl_research_format(tmp_path):
    signal = np.stack([lead_pattern(lead, 500) for lead in STANDARD]).astype(np.float32)
    np.save(tmp_path / "a.npy", signal)
    other = signal.copy()
    other[0, 1234] += 0.002  # another recording: identical signals would be stored once
    np.savetxt(tmp_path / "b.csv", other.T, delimiter=",", header=",".join(STANDARD), comments="")
    write_record(tmp_path / "wfdb", "c", lead_names=[lead.lower() for lead in STANDARD], fs=250)
    lines = [
        {"subject_id": 7, "ecg_path": "a.npy", "rr_interval": 812.5, "age": 63, "gender": "M", "flag": 1,
         "report_label": "atrial_fibrillation"},
        {"subject_id": 7, "ecg_path": str(tmp_path / "b.csv"), "rr_interval": None, "age": "NaN", "gender": "F",
         "flag": "normal", "report_label": 2},
        {"subject_id": 8, "ecg_path": "wfdb/c", "rr_interval": 1000, "age": 40, "gender": 0, "flag": None,
         "report_label": "Sinus bradycardia"},
        {"subject_id": 9, "ecg_path": "missing.npy", "rr_interval": 700},
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n{not json\n")
    result = build("jsonl", path)
    dataset, report = result.dataset.with_format("numpy"), result.report
    assert report.records_read == 5 and len(dataset) == 3
    assert report.skipped_by_reason == {"missing_file": 1, "bad_jsonl_line": 1}
    first, second, third = dataset
    assert (first["subject_id"], first["rr_interval"], first["age"], first["sex"], first["potassium_flag"]) == (
        "7", 812.5, 63, 1, 1)
    assert rhythm(dataset, first["arrhythmia"]) == "atrial_fibrillation"
    assert rhythm(dataset, second["arrhythmia"]) == "sinus_tachycardia"
    assert rhythm(dataset, third["arrhythmia"]) == "sinus_bradycardia" and third["sex"] == 0
    assert np.isnan(second["rr_interval"]) and np.isnan(second["age"]) and second["potassium_flag"] == 0
    for row in dataset:
        assert_standard_order(row["signal"], 500)


def test_unusable_label_values_are_missing_with_a_counted_reason(tmp_path):
    """Issue 25: ages such as -5, "1e9", "abc12" or [5] were stored as 5, 1, 12, 5; 300 meant 90 in every source.
    Now they are missing, each with a note, counted per label and reason in build_report.json."""
    rng = np.random.default_rng(0)
    ages = [-5, "-5", 1e9, "1e9", "1e-3", "abc12", [5], 300, 63]
    lines = []
    for index, age in enumerate(ages):
        np.save(tmp_path / f"{index}.npy", rng.normal(0, 0.3, (12, 5000)).astype(np.float32))
        lines.append({"record_id": f"r{index}", "ecg_path": f"{index}.npy", "age": age,
                      "rr_interval": "1e9" if index == 0 else 800, "gender": "X" if index == 1 else "F"})
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = build("jsonl", tmp_path / "data.jsonl", output=tmp_path / "out")
    stored = dict(zip(result.dataset["record_id"], result.dataset["age"]))
    assert stored.pop("r4") == pytest.approx(0.001)  # "1e-3" is a number, and a possible age (stored as float32)
    assert stored == {"r0": None, "r1": None, "r2": None, "r3": None, "r5": None, "r6": None, "r7": None, "r8": 63.0}
    report = json.loads((tmp_path / "out" / "build_report.json").read_text())
    assert report["label_notes_by_reason"] == {"age": {"out_of_range": 5, "not_a_number": 2},
                                               "rr_interval": {"out_of_range": 1}, "sex": {"unknown_value": 1}}
    assert {"record_id": "r5", "label": "age", "reason": "not_a_number",
            "detail": "age 'abc12' is not a finite number"} in report["label_notes"]
    assert report["label_coverage"]["age"] == 2 and report["records_kept"] == 9


@pytest.fixture
def corrupted_folder(tmp_path):
    """A Challenge-style folder with two good records and one of each kind of damage."""
    root = tmp_path / "corrupted"
    comments = ["Age: 60", "Sex: Female", "Dx: 426783006"]
    write_record(root, "good1", comments=comments)
    write_record(root, "good2", lead_names=[lead.lower() for lead in STANDARD], fs=1000, seconds=12, comments=comments)
    truncated = write_record(root, "truncated", comments=comments)
    data = truncated.with_suffix(".dat").read_bytes()
    truncated.with_suffix(".dat").write_bytes(data[: len(data) // 3])
    (root / "garbage.hea").write_text("this is not\x00 a header\n%%%\n")
    write_record(root, "nodat", comments=comments).with_suffix(".dat").unlink()
    signal = np.stack([lead_pattern(lead, 500) for lead in STANDARD], axis=1)
    signal[1000:1500, 3] = np.nan  # one second of a lead lost
    write_record(root, "nanblock", signal=signal, comments=comments)
    short_gap = np.stack([lead_pattern(lead, 500) for lead in STANDARD], axis=1)
    short_gap[2000:2010, :] = np.nan  # 20 ms dropout: interpolated
    write_record(root, "shortgap", signal=short_gap, comments=comments)
    write_record(root, "eightleads", lead_names=("I", "II", "V1", "V2", "V3", "V4", "V5", "V6"), comments=comments)
    write_record(root, "wrongrate", fs=50, comments=comments)
    return root


EXPECTED_SKIPS = {
    "truncated": "truncated_signal",
    "garbage": "unreadable_header",
    "nodat": "missing_signal_file",
    "nanblock": "nan_run_too_long",
    "eightleads": "missing_leads",
    "wrongrate": "sampling_rate_too_low",
}


def test_corrupted_records_are_skipped_with_their_reason_and_good_ones_kept(corrupted_folder):
    result = build("challenge", corrupted_folder)
    dataset, report = result.dataset.with_format("numpy"), result.report
    assert sorted(dataset["record_id"]) == ["good1", "good2", "shortgap"]
    assert {entry["record_id"]: entry["reason"] for entry in report.skipped} == EXPECTED_SKIPS
    assert report.records_read == 9 and report.records_kept == 3
    for row in dataset:
        assert np.isfinite(row["signal"]).all()
        assert_standard_order(row["signal"], 500)
        assert (row["age"], row["sex"], rhythm(dataset, row["arrhythmia"])) == (60, 0, "sinus_rhythm")
    assert dataset[list(dataset["record_id"]).index("good2")]["original_seconds"] == 12


def test_missing_leads_can_be_zero_filled_and_flagged(corrupted_folder):
    dataset = build_dataset("challenge", corrupted_folder, fill_missing_leads=True).with_format("numpy")
    row = dataset[list(dataset["record_id"]).index("eightleads")]
    assert list(row["missing_leads"]) == ["III", "aVR", "aVL", "aVF"] == list(row["flat_leads"])
    assert not row["signal"][2:6].any()


def test_nothing_usable_and_unknown_layouts_fail_clearly(tmp_path, corrupted_folder):
    for name in ("good1", "good2", "shortgap"):
        for path in corrupted_folder.glob(f"{name}.*"):
            path.unlink()
    with pytest.raises(DatasetBuildError, match="nothing usable.*all 6 records were skipped"):
        build_dataset("challenge", corrupted_folder)
    (tmp_path / "empty").mkdir()
    with pytest.raises(LayoutError, match="not a PTB-XL folder"):
        build_dataset("ptb-xl", tmp_path / "empty")
    with pytest.raises(LayoutError, match="not a MIMIC-IV-ECG folder"):
        build_dataset("mimic-iv-ecg", tmp_path / "empty")
    with pytest.raises(LayoutError, match="does not exist"):
        build_dataset("ludb", tmp_path / "nowhere")


def test_bad_build_arguments_and_an_empty_listing_fail_before_any_record_is_read():
    with pytest.raises(ValueError, match=r"unknown format 'edf'; expected one of \['challenge', "):
        build("edf", "anywhere")
    with pytest.raises(ValueError, match="format 'ludb' needs an input path"):
        build("ludb")
    with pytest.raises(ValueError, match="ptbxl_rate must be one of"):
        build("simulated", ptbxl_rate=250)
    with pytest.raises(DatasetBuildError, match=r"no records found in None \(simulated\)"):
        build("simulated", limit=0)


def test_a_build_without_output_leaves_only_its_arrow_files_in_a_folder_of_its_own(tmp_path):
    result = build("simulated", limit=3, cache_dir=tmp_path)
    (work,) = tmp_path.iterdir()
    assert work.name.startswith("enecg-dataset-") and sorted(p.name for p in work.iterdir()) == ["cache"]
    assert all(Path(f["filename"]).is_relative_to(work) for f in result.dataset.cache_files)
    report = result.report
    assert (report.output, report.records_read, report.records_kept) == (None, 3, 3)
    assert report.seconds_elapsed > 0 and report.records_per_second == pytest.approx(3 / report.seconds_elapsed)


def test_a_build_into_an_existing_output_replaces_it_and_cleans_its_work_folder(tmp_path):
    output = tmp_path / "out"
    build("simulated", limit=4, output=output)
    (output / "stale.txt").write_text("from an earlier build")
    result = build("simulated", limit=2, output=output, seed=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no .enecg-build-* left beside it
    assert not (output / "stale.txt").exists() and {"build_report.json", "checksums.json"} <= {
        p.name for p in output.iterdir()}
    assert result.report.output == str(output) and list(result.dataset["record_id"]) == ["sim-1-000000", "sim-1-000001"]
    assert all(Path(f["filename"]).is_relative_to(output) for f in result.dataset.cache_files)  # memory-mapped from it


def test_a_failure_of_datasets_is_raised_not_taken_for_an_empty_build(tmp_path, monkeypatch):
    """`datasets` cannot make a dataset of zero examples, so the builder reads a failure with every record skipped as
    "nothing usable"; any other failure is raised as it is, and the work folder is removed."""
    import datasets

    def from_generator(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(datasets.Dataset, "from_generator", from_generator)
    with pytest.raises(OSError, match="disk full"):
        build("simulated", limit=2, output=tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_command_line_saves_dataset_and_report(corrupted_folder, tmp_path, capsys):
    import datasets

    output = tmp_path / "out"
    assert main(["--format", "challenge", "--input", str(corrupted_folder), "--output", str(output), "--num-proc", "2"]) == 0
    printed = capsys.readouterr().out
    assert "9 records read, 3 kept, 6 skipped" in printed and "truncated_signal" in printed and "age" in printed
    assert f"datasets.load_from_disk({str(output)!r})" in printed
    report = json.loads((output / "build_report.json").read_text())
    assert report["records_kept"] == 3 and report["skipped_by_reason"]["missing_leads"] == 1
    assert {entry["record_id"] for entry in report["skipped"]} == set(EXPECTED_SKIPS)
    assert report["label_coverage"]["age"] == 3 and report["label_coverage"]["rr_interval"] == 0
    reloaded = datasets.load_from_disk(str(output))
    assert sorted(reloaded["record_id"]) == ["good1", "good2", "shortgap"]
    assert reloaded.features["signal"].shape == (12, 5000)
    assert main(["--format", "ptb-xl", "--input", str(tmp_path / "missing"), "--output", str(tmp_path / "o")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_hostile_records_are_skipped_from_their_headers_without_reading_them(tmp_path):
    """A Challenge tree with a 120 kB .mat that inflates to 120 MB and a header claiming 2000 s (sparse .dat): both
    skipped as too_long, decided before their samples are read. The limit is the builder's `max_record_seconds`."""
    root = tmp_path / "hostile"
    write_record(root, "good", comments=["Age: 60", "Sex: Female"], seconds=12)
    write_mat_zeros(root / "bomb.mat", 12, 5_000_000)
    write_header(root / "bomb.hea", file_name="bomb.mat")
    write_header(root / "huge.hea", sig_len=1_000_000)
    with open(root / "huge.dat", "wb") as handle:
        handle.truncate(12 * 1_000_000 * 2)
    peak, result = peak_allocation(build, "challenge", root, max_record_seconds=1000)
    assert {entry["record_id"]: entry["reason"] for entry in result.report.skipped} == {"bomb": "too_long",
                                                                                     "huge": "too_long"}
    assert result.report.records_kept == 1 and peak < 60 * (1 << 20), f"{peak / (1 << 20):.0f} MB"
    with pytest.raises(DatasetBuildError, match="all 3 records were skipped \\(too_long 3\\)"):
        build("challenge", root, max_record_seconds=11)  # the good record is 12 s long


def test_duplicate_ids_and_identical_signals_are_kept_once_and_reported(tmp_path):
    """`dup1/DUP001` and `dup2/DUP001` share a record id; A1 and A2 are the same recording under two ids (as
    Challenge E07509/E07510), which would leak across subject-wise folds. One of each is kept; the report says why."""
    root = tmp_path / "dups"
    comments = ["Age: 60", "Sex: Female", "Dx: 426783006"]
    write_record(root / "dup1", "DUP001", comments=comments)
    write_record(root / "dup2", "DUP001", comments=comments, fs=250)
    signal = np.stack([lead_pattern(lead, 500) * 1.5 for lead in STANDARD], axis=1)
    write_record(root, "A1", signal=signal, comments=comments)
    write_record(root, "A2", signal=signal, comments=["Age: 61", "Sex: Female", "Dx: 426783006"])
    result = build("challenge", root, output=tmp_path / "out")
    assert sorted(result.dataset["record_id"]) == ["A1", "DUP001"]
    report = json.loads((tmp_path / "out" / "build_report.json").read_text())
    assert (report["records_read"], report["records_kept"]) == (4, 2)
    skipped = {entry["record_id"]: entry for entry in report["skipped"]}
    assert skipped["DUP001"]["reason"] == "duplicate_record_id"
    assert "dup2/DUP001" in skipped["DUP001"]["detail"] and "dup1/DUP001" in skipped["DUP001"]["detail"]
    assert skipped["A2"] == {"record_id": "A2", "reason": "duplicate_signal",
                             "detail": "the same stored signal as A1, which is kept (labels that differ: ['age'])"}
    assert report["label_coverage"]["age"] == 2 and report["skipped_by_reason"] == {"duplicate_record_id": 1,
                                                                                   "duplicate_signal": 1}
    kept = result.dataset.with_format("numpy")
    assert kept[list(kept["record_id"]).index("DUP001")]["signal"].shape == (12, 5000)


@pytest.mark.parametrize("fast", [True, False])
def test_a_zero_length_record_is_skipped_as_empty_signal(tmp_path, monkeypatch, fast):
    """A header of signal length 0 with an empty `.dat` (issue 25): `empty_signal`, on the fast reader and on wfdb's
    (it once ended in a bare `ValueError: zero-size array` from `wfdb_enecg.to_physical`, or `unreadable_signal`)."""
    from enecg_hf import io_enecg
    from enecg_hf.preprocessing_enecg import ECGInputError

    monkeypatch.setattr(io_enecg, "FAST_WFDB", fast)
    root = tmp_path / "zero"
    write_record(root, "good", comments=["Age: 60", "Sex: Female"])
    write_header(root / "empty.hea", sig_len=0)
    (root / "empty.dat").write_bytes(b"")
    with pytest.raises(ECGInputError) as error:
        io_enecg.read_record(root / "empty")
    assert error.value.reason == "empty_signal" and "no samples" in error.value.detail
    if fast:  # the fast reader's own functions take a record of no samples too
        from enecg_hf.wfdb_enecg import parse_header, read_dat_signal

        header = parse_header((root / "empty.hea").read_text())
        assert read_dat_signal(root, header, samples=0).shape == (0, 12)
    build("challenge", root, output=tmp_path / "out")
    report = json.loads((tmp_path / "out" / "build_report.json").read_text())
    assert report["skipped"] == [{"record_id": "empty", "reason": "empty_signal", "detail": error.value.detail}]
