"""Builders on the real recordings in ../shared/data: LUDB (all 200 records, RR against the cardiologists'
annotations), the PhysioNet Challenge folders (age/sex/Dx, including the untouched Georgia headers) and PTB-XL's
100 Hz files (`ptbxl_lr1500`)."""

from __future__ import annotations

import json
import re
import shutil

import datasets
import numpy as np
import pandas as pd
import pytest
import wfdb

from enecg_hf.data import ARRHYTHMIA_CLASSES, build, ptbxl
from enecg_hf.data.__main__ import main
from enecg_hf.data.source import BuildOptions
from enecg_hf.preprocessing_enecg import normalize_lead_name, resample

from ecg_files import STANDARD, rhythm, shared_folder


@pytest.fixture(scope="module")
def ludb_build():
    return build("ludb", shared_folder("ludb"))


def test_all_ludb_records_load_with_rr_equal_to_the_annotation_means(ludb_build):
    folder = shared_folder("ludb") / "data"
    dataset, report = ludb_build.dataset, ludb_build.report
    assert report.records_read == report.records_kept == len(dataset) == 200 and report.skipped == []
    labels = dict(zip(dataset["record_id"], dataset["rr_interval"]))
    for record_id, rr_interval in labels.items():
        annotation = wfdb.rdann(str(folder / record_id), "ii")
        peaks = annotation.sample[np.array(annotation.symbol) == "N"]
        expected = np.diff(peaks).mean() / annotation.fs * 1000
        assert rr_interval == pytest.approx(expected, rel=1e-6), record_id
    values = np.array(list(labels.values()))
    assert 300 < values.min() and values.max() < 2000


def test_ludb_labels_match_the_header_comments(ludb_build):
    folder = shared_folder("ludb") / "data"
    dataset = ludb_build.dataset.select_columns(["record_id", "age", "sex", "arrhythmia", "diagnoses"])
    for row in dataset:
        header = (folder / f"{row['record_id']}.hea").read_text()
        age = re.search(r"<age>: *(\d+)", header)
        if age:
            assert row["age"] == float(age.group(1))
        assert row["sex"] == {"F": 0, "M": 1}[re.search(r"<sex>: *([FM])", header).group(1)]
        assert rhythm(dataset, row["arrhythmia"]) in ARRHYTHMIA_CLASSES
        statement = re.search(r"Rhythm: *(.*)", header).group(1).lower()
        expected = {"sinus rhythm.": "sinus_rhythm", "sinus bradycardia.": "sinus_bradycardia",
                    "sinus tachycardia.": "sinus_tachycardia", "atrial fibrillation.": "atrial_fibrillation"}
        assert rhythm(dataset, row["arrhythmia"]) == expected.get(
            statement, "atrial_flutter" if "flutter" in statement else "other")
        assert any(item.startswith("Rhythm:") for item in row["diagnoses"])


def test_ludb_lowercase_leads_are_stored_in_standard_order(ludb_build):
    folder = shared_folder("ludb") / "data"
    dataset = ludb_build.dataset.with_format("numpy")
    for index in (0, 99, 199):
        row = dataset[index]
        record = wfdb.rdrecord(str(folder / row["record_id"]))
        assert record.sig_name[3] == "avr"
        for column, name in enumerate(record.sig_name):
            row_index = STANDARD.index(normalize_lead_name(name))
            np.testing.assert_allclose(row["signal"][row_index], record.p_signal[:, column], atol=1e-5)


def _header_labels(text: str) -> tuple[float | None, int | None, list[str]]:
    age = re.search(r"#Age: *(\d+)", text)
    sex = re.search(r"#Sex: *(\w+)", text)
    dx = re.search(r"#Dx: *(.*)", text)
    return (
        float(age.group(1)) if age else None,
        {"female": 0, "male": 1}.get(sex.group(1).lower()) if sex else None,
        [code.strip() for code in dx.group(1).split(",") if code.strip()] if dx else [],
    )


@pytest.mark.parametrize("folder_name", ["challenge2021_sample50", "challenge2020_awwong1", "challenge2020_sebgood"])
def test_challenge_folders_load_with_age_sex_and_dx(folder_name):
    folder = shared_folder(folder_name)
    result = build("challenge", folder)
    dataset, report = result.dataset, result.report
    headers = sorted(folder.glob("*.hea"))
    originals = sorted((folder / "original_headers_georgia").glob("*.hea"))
    assert report.records_read == len(headers) + len(originals)
    # The untouched Georgia headers sit in a subfolder under the same record ids: kept once, the repeats reported.
    # E07509 and E07510 are the same recording (a duplicate in the source data): kept once, the copy reported.
    copies = {"E07510": "E07509"} if folder_name == "challenge2021_sample50" else {}
    assert report.records_kept == len(dataset) == len(headers) - len(copies)
    assert report.skipped_by_reason == {**({"duplicate_record_id": len(originals)} if originals else {}),
                                        **({"duplicate_signal": len(copies)} if copies else {})}
    for entry in report.skipped:
        if entry["reason"] == "duplicate_record_id":
            assert "original_headers_georgia" in entry["detail"] and "which is kept" in entry["detail"]
        else:
            assert entry["detail"] == f"the same stored signal as {copies[entry['record_id']]}, which is kept (same labels)"
    rows = {row["record_id"]: row for row in dataset.remove_columns("signal")}
    for header in headers:
        if header.stem in copies:
            continue
        age, sex, codes = _header_labels(header.read_text())
        row = rows[header.stem]
        assert (row["age"], row["sex"], row["diagnoses"]) == (age, sex, codes), header.stem
        assert row["source"] == "challenge" and row["subject_id"] == header.stem
    assert all(row["original_seconds"] >= 10 for row in rows.values())
    if folder_name == "challenge2020_sebgood":
        assert sum(row["age"] is None for row in rows.values()) == 3  # `Age: NaN`
        assert all(row["arrhythmia"] is None for row in rows.values())  # its Dx lines are empty


def test_original_georgia_headers_read_as_distributed(tmp_path):
    folder = shared_folder("challenge2021_sample50")
    originals = sorted((folder / "original_headers_georgia").glob("*.hea"))
    assert originals and all(path.read_text().split()[0].endswith(".mat") for path in originals)
    for header in originals:
        shutil.copy(header, tmp_path / header.name)  # untouched
        shutil.copy(folder / f"{header.stem}.mat", tmp_path / f"{header.stem}.mat")
    from_originals = build("challenge", tmp_path).dataset.with_format("numpy")
    from_edited = build("challenge", folder).dataset.with_format("numpy")
    edited = {record_id: index for index, record_id in enumerate(from_edited["record_id"])}
    assert len(from_originals) == len(originals) - 1 and "E07510" not in set(from_originals["record_id"])  # = E07509
    for row in from_originals:
        age, sex, codes = _header_labels((tmp_path / f"{row['record_id']}.hea").read_text())
        assert (row["age"], row["sex"], list(row["diagnoses"])) == (age, sex, codes)
        other = from_edited[edited[row["record_id"]]]
        np.testing.assert_array_equal(row["signal"], other["signal"])
    # Sinus bradycardia (426177001) with left atrial enlargement: the rhythm code wins.
    first = from_originals[0]
    assert first["record_id"] == "E07500" and rhythm(from_originals, first["arrhythmia"]) == "sinus_bradycardia"


def test_ludb_keeps_a_record_whose_annotation_is_corrupted_and_a_repeated_table_row_once(tmp_path):
    """A corrupted `.ii` leaves rr_interval empty with a reason (the signal is fine); a row repeated in ludb.csv does
    not make a record appear twice."""
    source = shared_folder("ludb")
    (tmp_path / "data").mkdir()
    for record in ("1", "2", "3"):
        for path in (source / "data").glob(f"{record}.*"):
            shutil.copy(path, tmp_path / "data" / path.name)
    table = pd.read_csv(source / "ludb.csv", dtype=str)  # cells span lines ("F\\n"): edited with pandas
    rows = table[table["ID"].str.strip().isin(["1", "2", "3"])]
    pd.concat([rows.iloc[:2], rows.iloc[1:2], rows.iloc[2:]]).to_csv(tmp_path / "ludb.csv", index=False)
    for record in ("1", "3"):  # random bytes: wfdb raises on record 1's, decodes record 3's into nonsense
        annotation = tmp_path / "data" / f"{record}.ii"
        annotation.write_bytes(np.random.default_rng(0).bytes(annotation.stat().st_size))
    result = build("ludb", tmp_path)
    dataset, report = result.dataset, result.report
    assert sorted(dataset["record_id"]) == ["1", "2", "3"] and report.records_read == 4
    assert [(e["record_id"], e["reason"]) for e in report.skipped] == [("2", "duplicate_record_id")]
    rr = dict(zip(dataset["record_id"], dataset["rr_interval"]))
    assert rr["1"] is None and rr["3"] is None and 300 < rr["2"] < 2000
    assert [(n["record_id"], n["label"], n["reason"]) for n in report.label_notes] == [
        ("1", "rr_interval", "unreadable_annotation"), ("3", "rr_interval", "unreadable_annotation")]
    assert "IndexError" in report.label_notes[0]["detail"] and "outside" in report.label_notes[1]["detail"]
    assert "unreadable_annotation" in report.summary()


def test_ptbxl_100hz_download_loads_resampled_with_its_labels(tmp_path):
    """`ptbxl_lr1500` has only `records100/` (as many users download PTB-XL): the first records through the command
    line, each stored as its 100 Hz file resampled to 500 Hz, with its table's labels and the source rate."""
    folder = shared_folder("ptbxl_lr1500")
    assert not (folder / "records500").exists()
    output = tmp_path / "lr"
    assert main(["--format", "ptb-xl", "--input", str(folder), "--output", str(output), "--limit", "16"]) == 0
    report = json.loads((output / "build_report.json").read_text())
    assert report["records_kept"] == 16 and report["source_sampling_rates"] == {"100": 16}
    dataset = datasets.load_from_disk(str(output)).with_format("numpy")
    table = pd.read_csv(folder / "ptbxl_database.csv", index_col="ecg_id")
    for row in dataset:
        source = table.loc[int(row["record_id"])]
        assert row["source_sampling_rate"] == 100 and row["signal"].shape == (12, 5000)
        assert row["age"] == min(source["age"], 90) and row["sex"] == 1 - source["sex"]
        assert row["subject_id"] == str(int(source["patient_id"])) and row["strat_fold"] == source["strat_fold"]
        raw = wfdb.rdrecord(str(folder / source["filename_lr"]))
        order = [[normalize_lead_name(name) for name in raw.sig_name].index(lead) for lead in STANDARD]
        expected = resample(raw.p_signal.T[order].astype(np.float32), 100, 500)
        np.testing.assert_allclose(row["signal"], expected, atol=1e-5)
    # Patient 19497 also has records in ptbxl_sample500 (ecg_id 450): the same subject id, so every split keeps
    # them together (checked on written folders in test_data_formats.py); likewise the other shared patients.
    rows = dict(zip(dataset["record_id"], dataset["subject_id"]))
    assert rows["522"] == rows["525"] == "19497"
    both = [ptbxl.list_records(shared_folder(name), BuildOptions()) for name in ("ptbxl_sample500", "ptbxl_lr1500")]
    shared = set(both[0]["subject_id"]) & set(both[1]["subject_id"])
    assert "19497" in shared and len(shared) == 9
    assert set(both[0].loc[both[0]["record_id"] == "450", "subject_id"]) == {"19497"}
