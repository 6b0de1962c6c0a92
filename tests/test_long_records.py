"""Recordings as PhysioNet databases and Holter devices write them: headers whose ADC gain is 0 ("uncalibrated"), lead
names of other conventions (MLII, ML2, D3) or none at all, and records longer than the model takes, predicted window
by window (pipeline, `enecg predict`, endpoint handler) with each window read from disk when it is needed."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import wfdb

from helpers import REPO, build_model_folder, shared

from ecg_files import peak_allocation

from enecg_hf import io_enecg
from enecg_hf.data.simulate import simulate_record
from enecg_hf.io_enecg import RecordLimits, read_record
from enecg_hf.preprocessing_enecg import lead_alias_notes, normalize_lead_name


RATE = 250  # Hz, as Holter and MIT-BIH-derived databases record


def holter(seconds: float, index: int = 0) -> np.ndarray:
    """(2, seconds x 250) float64 simulated ECG in mV: leads II and V5 (written as MLII and V5)."""
    signal, _ = simulate_record(index, seed=3, sampling_rate=RATE, seconds=seconds)
    return signal[[1, 10]].astype(np.float64)


def write_physionet_record(folder: Path, name: str, signal: np.ndarray, names=("MLII", "V5"),
                           gain: str = "0") -> Path:
    """A format-212 record at 250 Hz whose header writes the ADC gain as `gain` where wfdb writes `200.0(0)/mV`: by
    default 0, as whole PhysioNet databases do (`rec.dat 212 0 12 0 -16 12292 0 MLII`), which means 200 units/mV."""
    digital = np.clip(np.round(signal.T * 200), -2047, 2047).astype(np.int64)
    wfdb.wrsamp(name, fs=RATE, units=["mV"] * len(names), sig_name=list(names), d_signal=digital,
                fmt=["212"] * len(names), adc_gain=[200.0] * len(names), baseline=[0] * len(names),
                write_dir=str(folder))
    header = folder / f"{name}.hea"
    header.write_text(header.read_text().replace(" 200.0(0)/mV ", f" {gain} "))
    return folder / name


@pytest.fixture(scope="module")
def rr_folder(tmp_path_factory) -> Path:
    return build_model_folder(tmp_path_factory.mktemp("long") / "rr", ["dlinear", "timesnet", "features"],
                              target_mean=800.0, target_std=150.0)


@pytest.fixture(scope="module")
def ecg(rr_folder):
    from transformers import pipeline

    return pipeline(model=str(rr_folder), trust_remote_code=True)


@pytest.fixture(scope="module")
def multitask_ecg(tmp_path_factory):
    """A model answering RR (regression) and sex (classification) from one pass of two tiny experts."""
    from transformers import pipeline

    from enecg_hf import EnECGConfig, EnECGModel
    from enecg_hf.training.serving_export import export_serving_files

    experts = [{"name": "dlinear", "type": "dlinear", "input_length": 500, "leads": ["II"],
                "settings": {"preset": "tiny"}},
               {"name": "timesnet", "type": "timesnet", "input_length": 250, "leads": ["II", "V5"],
                "settings": {"preset": "tiny", "d_model": 4, "d_ff": 4}}]
    tasks = [{"name": "rr_interval", "problem_type": "regression", "unit": "ms", "target_mean": 800.0,
              "target_std": 150.0},
             {"name": "sex", "problem_type": "single_label_classification", "class_names": ["female", "male"]}]
    torch.manual_seed(0)
    model = EnECGModel(EnECGConfig(experts=experts, tasks=tasks, head_hidden_size=8, gate_input_length=50,
                                   gate_hidden_size=4, lora_r=2)).eval()
    folder = tmp_path_factory.mktemp("long") / "multitask"
    model.save_pretrained(folder)
    export_serving_files(model, folder)
    return pipeline(model=str(folder), trust_remote_code=True)


# ------------------------------------------------------------------------------------------------ header conventions
def test_an_adc_gain_of_zero_reads_as_wfdb_reads_it_with_one_uncalibrated_warning(tmp_path, monkeypatch, caplog):
    """WFDB header format: a gain of 0 (or none) means uncalibrated, 200 ADC units per mV (`wfdb.rdrecord` applies
    it). Read on the fast path and on wfdb's path, the same values as `wfdb.rdrecord`; one warning per record."""
    base = write_physionet_record(tmp_path, "rec", holter(12))
    assert (tmp_path / "rec.hea").read_text().splitlines()[1].startswith("rec.dat 212 0 12 0 ")
    reference = wfdb.rdrecord(str(base), return_res=32)
    assert reference.adc_gain == [200.0, 200.0]
    for fast in (True, False):
        monkeypatch.setattr(io_enecg, "FAST_WFDB", fast)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            record = read_record(base)
        assert np.array_equal(record.signal, reference.p_signal.T), fast
        assert len(record.warnings) == 1 and "uncalibrated" in record.warnings[0], record.warnings
        assert "['MLII', 'V5']" in record.warnings[0] and "200 ADC units per mV" in record.warnings[0]
        assert sum("uncalibrated" in message for message in caplog.messages) == 1, caplog.messages
    monkeypatch.setattr(io_enecg, "FAST_WFDB", True)
    # A header that leaves the gain out (and everything after it) is uncalibrated too; wfdb reads it.
    lines = (tmp_path / "rec.hea").read_text().splitlines()
    (tmp_path / "rec.hea").write_text("\n".join([lines[0], *(" ".join(line.split()[:2]) for line in lines[1:])]) + "\n")
    record = read_record(base)
    assert np.array_equal(record.signal, wfdb.rdrecord(str(base), return_res=32).p_signal.T)
    assert len(record.warnings) == 1 and "uncalibrated" in record.warnings[0]
    # A calibrated header: no warning.
    calibrated = write_physionet_record(tmp_path, "cal", holter(12), gain="200.0(0)/mV")
    assert read_record(calibrated).warnings == []


def test_lead_names_of_other_conventions_map_only_where_unambiguous():
    aliases = {"MLII": "II", "ML2": "II", "ml 2": "II", "MLI": "I", "ML1": "I", "MLIII": "III", "ML3": "III",
               "D1": "I", "D2": "II", "D3": "III", "DII": "II", "C1": "V1", "C6": "V6"}
    for name, lead in aliases.items():
        assert normalize_lead_name(name) == lead, name
        assert lead_alias_notes([name]) and f"read as {lead}" in lead_alias_notes([name])[0], name
    for name in ("CM5", "CC5", "CS5", "ECG1", "ECG", "record 14046, signal 0", "Vx", "M2"):
        assert normalize_lead_name(name) is None, name
    assert lead_alias_notes(["II", "V5", "lead aVR", "CM5"]) == []  # standard names (any spelling) need no note
    assert "Mason-Likar" in lead_alias_notes(["MLII"])[0]


def test_a_record_without_standard_lead_names_needs_lead_names(ecg, tmp_path):
    signal = holter(10)
    base = write_physionet_record(tmp_path, "anon", signal, names=("record 14046, signal 0", "record 14046, signal 1"))
    with pytest.raises(ValueError) as error:
        ecg(str(base), fill_missing_leads=True)
    message = str(error.value)
    assert error.value.reason == "unknown_lead", message
    assert "'record 14046, signal 0'" in message and "--lead-names" in message and "lead_names" in message
    named = ecg(str(base), lead_names=["II", "V5"], fill_missing_leads=True)
    expected = ecg(read_record(base).signal, sampling_rate=RATE, lead_names=["II", "V5"], fill_missing_leads=True)
    assert named["value"] == expected["value"]
    with pytest.raises(ValueError) as error:  # one name per signal of the header
        ecg(str(base), lead_names=["II"], fill_missing_leads=True)
    assert error.value.reason == "bad_shape" and "2 signals" in str(error.value)
    # A modified limb lead is read as its standard lead with a note; a bipolar chest lead is left out, said so.
    holter_base = write_physionet_record(tmp_path, "cm5", signal, names=("MLII", "CM5"))
    result = ecg(str(holter_base), fill_missing_leads=True)
    assert any(w.startswith("lead 'MLII' read as II: Mason-Likar") for w in result["warnings"]), result["warnings"]
    assert "non-standard leads ignored: ['CM5']" in result["warnings"]


# ------------------------------------------------------------------------------------------------ windows
def test_a_long_record_is_refused_without_window_seconds_and_the_message_names_it(ecg, tmp_path):
    base = write_physionet_record(tmp_path, "long", holter(65))
    with pytest.raises(ValueError) as error:
        ecg(str(base), fill_missing_leads=True)
    assert error.value.reason == "too_long", error.value
    assert "window_seconds" in str(error.value) and "--window-seconds" in str(error.value)
    with pytest.raises(ValueError) as error:  # an array too
        ecg(holter(65), sampling_rate=RATE, lead_names=["II", "V5"], fill_missing_leads=True)
    assert error.value.reason == "too_long" and "window_seconds" in str(error.value)


def test_windows_are_the_records_slices_and_the_summary_is_their_median(ecg, tmp_path):
    """A 65 s two-lead 250 Hz record with gain 0, windows of 10 s: each window's prediction is the prediction of that
    slice of the record given as an array; the summary is their median; the tail and the header are reported once."""
    base = write_physionet_record(tmp_path, "holter", holter(65))
    physical = read_record(base, limits=RecordLimits(max_seconds=100)).signal
    result = ecg(str(base), window_seconds=10, fill_missing_leads=True)
    assert json.loads(json.dumps(result, allow_nan=False)) == result  # strict JSON
    windows = result["windows"]
    assert [w["start_seconds"] for w in windows] == [0, 10, 20, 30, 40, 50]
    for index, window in enumerate(windows):
        expected = ecg(physical[:, index * 2500 : (index + 1) * 2500], sampling_rate=RATE, lead_names=["MLII", "V5"],
                       fill_missing_leads=True)
        assert window["value"] == expected["value"] and window["gate_weights"] == expected["gate_weights"], index
        assert "warnings" not in window  # nothing beyond what the record's warnings say once
    values = [w["value"] for w in windows]
    assert len(set(values)) > 1
    summary = result["summary"]["rr_interval"]
    assert summary["value"] == pytest.approx(float(np.median(values)), rel=1e-6)
    assert summary["unit"] == "ms" and summary["windows_used"] == 6 and summary["windows_skipped"] == 0
    assert (result["window_seconds"], result["hop_seconds"], result["source"]) == (10.0, 10.0, str(base))
    warnings = result["warnings"]
    assert sum("uncalibrated" in w for w in warnings) == 1, warnings
    assert sum(w.startswith("missing leads zero-filled") for w in warnings) == 1, warnings
    assert any("the last 5.0 s" in w for w in warnings) and any("'MLII' read as II" in w for w in warnings), warnings
    # Overlapping windows, at most a few of them, batched: the same predictions.
    overlapping = ecg(str(base), window_seconds=10, hop_seconds=5, fill_missing_leads=True)
    assert [w["start_seconds"] for w in overlapping["windows"]] == list(range(0, 56, 5))
    assert [w["value"] for w in overlapping["windows"][::2]] == values
    first = ecg(str(base), window_seconds=10, max_windows=2, fill_missing_leads=True, batch_size=4)
    assert [w["value"] for w in first["windows"]] == pytest.approx(values[:2], rel=1e-5)
    assert any("max_windows=2" in w for w in first["warnings"]), first["warnings"]
    batched = ecg([str(base), str(base)], window_seconds=10, fill_missing_leads=True, batch_size=4)
    assert all([w["value"] for w in r["windows"]] == pytest.approx(values, rel=1e-5) for r in batched)


def test_unusable_windows_are_skipped_with_their_reason(ecg):
    signal = holter(60, index=1)
    signal[:, 2500:5000] = 0.01  # 10-20 s: flat (electrodes off)
    signal[:, 7600:7800] = np.nan  # 30-40 s: 0.8 s of NaN, too long to interpolate
    signal[1, 12600:12610] = np.nan  # 50-60 s: 40 ms of NaN in V5, interpolated and said in that window
    result = ecg(signal, sampling_rate=RATE, lead_names=["II", "V5"], window_seconds=10, fill_missing_leads=True)
    skipped = {w["start_seconds"]: w["skipped"]["reason"] for w in result["windows"] if "skipped" in w}
    assert skipped == {10.0: "flat_signal", 30.0: "nan_run_too_long"}, result["windows"]
    assert result["windows"][5]["warnings"] == ["10 NaN/inf samples interpolated"]
    used = [w["value"] for w in result["windows"] if "value" in w]
    summary = result["summary"]["rr_interval"]
    assert (summary["windows_used"], summary["windows_skipped"]) == (4, 2)
    assert summary["skipped_reasons"] == {"flat_signal": 1, "nan_run_too_long": 1}
    assert summary["value"] == pytest.approx(float(np.median(used)), rel=1e-6)
    with pytest.raises(ValueError) as error:  # no usable window at all: an error, not an empty summary
        ecg(np.zeros((2, 5000)), sampling_rate=RATE, lead_names=["II", "V5"], window_seconds=10,
            fill_missing_leads=True)
    assert error.value.reason == "no_usable_window" and "flat_signal" in str(error.value)


@pytest.mark.parametrize("kwargs", [
    {"window_seconds": 0.5}, {"window_seconds": 61}, {"window_seconds": "10"}, {"window_seconds": True},
    {"window_seconds": float("nan")}, {"window_seconds": 10**400}, {"window_seconds": 10, "hop_seconds": 0},
    {"window_seconds": 10, "max_windows": 0}, {"window_seconds": 10, "max_windows": 2.5}, {"hop_seconds": 5},
    {"max_windows": 3}])
def test_window_parameters_are_checked(ecg, kwargs):
    with pytest.raises(ValueError) as error:
        ecg(holter(20), sampling_rate=RATE, lead_names=["II", "V5"], fill_missing_leads=True, **kwargs)
    assert error.value.reason == "bad_parameters", error.value


def test_a_multitask_model_summarises_every_task(multitask_ecg):
    signal = holter(40, index=2)
    result = multitask_ecg(signal, sampling_rate=RATE, lead_names=["II", "V5"], window_seconds=10, hop_seconds=7.5,
                           fill_missing_leads=True)
    windows = result["windows"]
    assert [w["start_seconds"] for w in windows] == [0.0, 7.5, 15.0, 22.5, 30.0]
    assert all(set(w["tasks"]) == {"rr_interval", "sex"} for w in windows)
    whole = multitask_ecg(signal[:, 1875:4375], sampling_rate=RATE, lead_names=["II", "V5"], fill_missing_leads=True)
    assert set(whole) == {"tasks", "warnings", "source"} and windows[1]["tasks"] == whole["tasks"]
    rr, sex = result["summary"]["rr_interval"], result["summary"]["sex"]
    assert rr["value"] == pytest.approx(float(np.median([w["tasks"]["rr_interval"]["value"] for w in windows])))
    mean = {label: np.mean([next(s["score"] for s in w["tasks"]["sex"]["scores"] if s["label"] == label)
                            for w in windows]) for label in ("female", "male")}
    assert {s["label"]: s["score"] for s in sex["scores"]} == pytest.approx(mean, rel=1e-5)
    assert sex["label"] == max(mean, key=mean.get) and sex["score"] == pytest.approx(max(mean.values()), rel=1e-5)
    assert rr["windows_used"] == sex["windows_used"] == 5 and rr["windows_skipped"] == 0


def test_mit_bih_100_is_predicted_window_by_window(ecg):
    """The 30-minute MIT-BIH record 100 (360 Hz, MLII and V5): refused whole, predicted window by window."""
    record = shared("wfdb_python_sample", "100")
    with pytest.raises(ValueError) as error:
        ecg(str(record), fill_missing_leads=True)
    assert error.value.reason == "too_long" and "window_seconds" in str(error.value)
    result = ecg(str(record), window_seconds=10, max_windows=3, fill_missing_leads=True)
    physical = wfdb.rdrecord(str(record), sampto=3600 * 3, return_res=32).p_signal.T
    assert [w["start_seconds"] for w in result["windows"]] == [0.0, 10.0, 20.0]
    third = ecg(physical[:, 7200:10800], sampling_rate=360, lead_names=["MLII", "V5"], fill_missing_leads=True)
    assert result["windows"][2]["value"] == third["value"]


def test_a_record_of_any_length_is_read_a_window_at_a_time(ecg, tmp_path):
    """A ten-hour header (2 x 9,000,000 samples: more than the 2**24 values a whole read may hold) over a sparse file
    whose first minute is ECG: windows are read from disk one at a time, allocating a few MB whatever the length."""
    base = write_physionet_record(tmp_path, "tenhours", holter(60, index=4))
    data = tmp_path / "tenhours.dat"
    with open(data, "r+b") as handle:
        handle.truncate(3 * 9_000_000)  # two 12-bit samples per 3 bytes, 2 leads
    header = tmp_path / "tenhours.hea"
    lines = header.read_text().splitlines()
    fields = lines[0].split()
    fields[3] = "9000000"
    # The checksums no longer match: a whole read would go to wfdb, a window has no checksum to compare.
    header.write_text("\n".join([" ".join(fields), *lines[1:]]) + "\n")
    peak, result = peak_allocation(ecg, str(base), window_seconds=10, max_windows=4, fill_missing_leads=True)
    assert not isinstance(result, Exception), result
    assert [w["start_seconds"] for w in result["windows"]] == [0.0, 10.0, 20.0, 30.0]
    assert result["summary"]["rr_interval"]["windows_used"] == 4
    assert peak < 8 * (1 << 20), f"{peak / (1 << 20):.1f} MB allocated for four windows of a ten-hour record"


# ------------------------------------------------------------------------------------------------ handler and CLI
def test_the_endpoint_predicts_window_by_window(rr_folder, ecg):
    sys.path.insert(0, str(rr_folder))
    try:
        import importlib

        handler = importlib.import_module("handler")
    finally:
        sys.path.remove(str(rr_folder))
    endpoint = handler.EndpointHandler(str(rr_folder))
    signal = holter(65, index=5).astype(np.float32)
    record = {"signal": signal.tolist(), "sampling_rate": RATE, "lead_names": ["MLII", "V5"]}
    response = endpoint({"inputs": record, "parameters": {"fill_missing_leads": True}})
    assert response["reason"] == "too_long" and "parameters.window_seconds" in response["error"]
    response = endpoint(json.loads(json.dumps({"inputs": record, "parameters": {
        "fill_missing_leads": True, "window_seconds": 10, "hop_seconds": 12.5, "max_windows": 2}})))
    assert isinstance(response, list) and len(response) == 1, response
    expected = ecg(signal, sampling_rate=RATE, lead_names=["MLII", "V5"], window_seconds=10, hop_seconds=12.5,
                   max_windows=2, fill_missing_leads=True)
    assert json.loads(json.dumps(response[0])) == json.loads(json.dumps(expected))
    for bad in ({"window_seconds": "10"}, {"window_seconds": 10, "max_windows": True}, {"hop_seconds": 5}):
        response = endpoint({"inputs": record, "parameters": {"fill_missing_leads": True, **bad}})
        assert response.get("reason") == "bad_parameters", (bad, response)


@pytest.mark.slow
def test_enecg_predict_windows_a_physionet_style_record_with_gain_zero(rr_folder, tmp_path):
    """The console script on a two-lead 250 Hz record whose header writes the gain as 0 (65 s here; the figures for
    15 minutes and 24 hours are in docs/serving.md): one JSON line with a prediction per window and the summary."""
    base = write_physionet_record(tmp_path, "holter", holter(65))
    anonymous = write_physionet_record(tmp_path, "anon", holter(25), names=("ECG1", "ECG2"))

    def run(*args):
        return subprocess.run([sys.executable, "-m", "enecg_hf.tools.cli", "predict", *args, "--model", str(rr_folder)],
                              capture_output=True, text=True, cwd=REPO, timeout=600)

    done = run(str(base), str(anonymous), "--window-seconds", "10", "--fill-missing-leads", "--batch-size", "3")
    assert done.returncode == 1, done.stderr  # the second record needs --lead-names
    windowed, refused = (json.loads(line) for line in done.stdout.strip().splitlines())
    assert [w["start_seconds"] for w in windowed["windows"]] == [0, 10, 20, 30, 40, 50]
    assert all(isinstance(w["value"], float) for w in windowed["windows"])
    assert windowed["summary"]["rr_interval"]["windows_used"] == 6
    assert any("uncalibrated" in w for w in windowed["warnings"])
    assert refused["reason"] == "unknown_lead" and "--lead-names" in refused["error"] and "'ECG1'" in refused["error"]
    named = run(str(anonymous), "--window-seconds", "10", "--fill-missing-leads", "--lead-names", "II,V5")
    assert named.returncode == 0 and len(json.loads(named.stdout)["windows"]) == 2, named.stdout + named.stderr
    clash = run(str(base), "--window-seconds", "10", "--explain", str(tmp_path / "x.png"))
    assert clash.returncode == 2 and "--explain" in clash.stderr
