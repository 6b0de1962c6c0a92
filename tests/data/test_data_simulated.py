"""Simulated data (labels checked against neurokit2's R-peak detector, determinism, speed) and subject k-fold."""

from __future__ import annotations

import time

import numpy as np
import pytest

from enecg_hf.data import (
    ARRHYTHMIA_CLASSES,
    LABEL_COLUMNS,
    POTASSIUM_LABELS,
    SEX_LABELS,
    build,
    build_dataset,
    subject_kfold,
)
from enecg_hf.data.simulate import simulate_record


@pytest.fixture(scope="module")
def simulated():
    started = time.perf_counter()
    result = build("simulated", limit=300, num_proc=2, seed=3)
    return result, time.perf_counter() - started


def test_a_few_hundred_simulated_records_build_fast_with_every_label(simulated):
    result, seconds = simulated
    dataset, report = result.dataset, result.report
    assert len(dataset) == 300 and report.skipped == [] and seconds < 30
    assert dataset.features["signal"].shape == (12, 5000)
    assert report.label_coverage == {name: 300 for name in LABEL_COLUMNS}
    assert set(dataset.features["arrhythmia"].int2str(dataset["arrhythmia"])) == set(ARRHYTHMIA_CLASSES)
    table = dataset.remove_columns("signal").to_pandas()
    assert set(table["sex"]) == {0, 1} and set(table["potassium_flag"]) == {0, 1}
    assert table["age"].between(18, 95).all() and table["rr_interval"].between(300, 1600).all()
    # Two records per subject, with the same age band and sex.
    assert table.groupby("subject_id")["sex"].nunique().max() == 1 and table["subject_id"].nunique() == 150


def test_class_labels_are_class_label_columns_that_stratify(simulated):
    import datasets

    dataset, report = simulated[0].dataset, simulated[0].report
    for name, classes in (("sex", SEX_LABELS), ("potassium_flag", POTASSIUM_LABELS), ("arrhythmia", ARRHYTHMIA_CLASSES)):
        assert dataset.features[name] == datasets.ClassLabel(names=list(classes)), name
    names = dataset.features["arrhythmia"].int2str(dataset["arrhythmia"])
    assert report.arrhythmia_counts == {c: names.count(c) for c in ARRHYTHMIA_CLASSES}
    split = dataset.select_columns(["arrhythmia"]).train_test_split(test_size=0.25, stratify_by_column="arrhythmia",
                                                                   seed=0)
    for c in range(len(ARRHYTHMIA_CLASSES)):
        share = split["test"]["arrhythmia"].count(c) / (names.count(ARRHYTHMIA_CLASSES[c]) or 1)
        assert abs(share - 0.25) < 0.1, (ARRHYTHMIA_CLASSES[c], share)


def test_simulated_rr_labels_agree_with_neurokit2_r_peaks():
    nk = pytest.importorskip("neurokit2")
    checked = 0
    for index in range(40):
        signal, labels = simulate_record(index, seed=5)
        if labels["arrhythmia"] not in ("sinus_rhythm", "sinus_bradycardia", "sinus_tachycardia", "atrial_fibrillation"):
            continue
        _, info = nk.ecg_peaks(signal[1], sampling_rate=500)
        detected = np.diff(info["ECG_R_Peaks"]).mean() / 500 * 1000
        # Regular rhythms agree to 1 %; the detector's refractory period can merge AF's shortest intervals.
        tolerance = 0.01 if labels["arrhythmia"].startswith("sinus") else 0.1
        assert detected == pytest.approx(labels["rr_interval"], rel=tolerance), (index, labels)
        checked += 1
    assert checked >= 25


def test_regular_sinus_rr_is_exactly_60000_over_the_rate():
    for index in range(30):
        _, labels = simulate_record(index)
        if labels["arrhythmia"].startswith("sinus"):
            rate = 60000 / labels["rr_interval"]
            low, high = {"sinus_rhythm": (60, 100), "sinus_bradycardia": (40, 59), "sinus_tachycardia": (101, 150)}[
                labels["arrhythmia"]]
            assert low <= rate <= high


def test_simulated_leads_obey_einthoven_and_goldberger():
    signal, _ = simulate_record(0)
    lead_i, lead_ii, lead_iii, avr, avl, avf = signal[:6].astype(np.float64)
    np.testing.assert_allclose(lead_iii, lead_ii - lead_i, atol=1e-5)
    np.testing.assert_allclose(avr + avl + avf, 0, atol=1e-5)
    np.testing.assert_allclose(avl, lead_i - lead_ii / 2, atol=1e-5)
    again, _ = simulate_record(0)
    assert np.array_equal(again, signal)


def test_simulated_data_is_deterministic_whatever_the_sharding(simulated):
    result, _ = simulated
    again = build_dataset("simulated", limit=20, num_proc=1, seed=3, shard_size=7).with_format("numpy")
    first = result.dataset.select(range(20)).with_format("numpy")
    assert list(again["record_id"]) == list(first["record_id"])
    np.testing.assert_array_equal(again["signal"][:], first["signal"][:])
    other_seed = build_dataset("simulated", limit=3, seed=4).with_format("numpy")
    assert not np.array_equal(other_seed["signal"][:], first["signal"][:3])


def test_subject_kfold_is_disjoint_by_subject_and_shuffled_by_seed(simulated):
    dataset = simulated[0].dataset
    subjects = np.array(dataset["subject_id"])
    folds = subject_kfold(dataset, k=5, seed=0)
    assert len(folds) == 5
    tests = np.concatenate([test for _, test in folds])
    assert sorted(tests.tolist()) == list(range(len(dataset)))  # test sides partition the rows
    for train, test in folds:
        assert len(np.intersect1d(train, test)) == 0 and len(train) + len(test) == len(dataset)
        assert not set(subjects[train]) & set(subjects[test])
        assert 50 <= len(test) <= 70
    # Shuffled: not the source order in contiguous blocks, and another seed deals subjects differently.
    assert any(np.any(np.diff(test) > 2) for _, test in folds)
    other = subject_kfold(dataset, k=5, seed=1)
    assert any(not np.array_equal(a[1], b[1]) for a, b in zip(folds, other))
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(folds, subject_kfold(dataset, k=5, seed=0)))


def test_subject_kfold_rejects_too_many_folds():
    dataset = build_dataset("simulated", limit=4)
    with pytest.raises(ValueError, match="2 subjects"):
        subject_kfold(dataset, k=3)


def test_subject_folds_follow_the_rows_of_shuffled_and_selected_datasets():
    """Folds index the rows of the dataset they are given, whatever `select` / `shuffle` / `filter` did to it: no
    subject on both sides, and every index within range (a regression: they were computed on the table underneath)."""
    import datasets

    from enecg_hf.data import column_folds

    subjects = [f"s{i // 3}" for i in range(90)]  # 30 subjects, 3 records each
    base = datasets.Dataset.from_dict({"record_id": [f"r{i}" for i in range(90)], "subject_id": subjects,
                                       "strat_fold": [1 + (i // 3) % 3 for i in range(90)]})
    views = {"shuffled": base.shuffle(seed=0), "selected": base.select(range(10, 70)),
             "selected_shuffled": base.shuffle(seed=1).select(range(45)),
             "filtered": base.filter(lambda row: row["record_id"] not in ("r7", "r8", "r9"))}
    for name, view in views.items():
        rows = np.array(view["subject_id"])
        for train, test in subject_kfold(view, k=2, seed=0):
            assert max(train.max(), test.max()) < len(view), name
            assert not set(rows[train]) & set(rows[test]), f"{name}: subjects on both sides"
        folds = np.array(view["strat_fold"])
        for (train, test), fold in zip(column_folds(view, "strat_fold"), sorted(set(folds))):
            assert set(folds[test]) == {fold} and fold not in set(folds[train]), name
