"""Signal transforms (`preprocessing_enecg`) and record reading (`io_enecg`), including their remote-code import rule."""

from __future__ import annotations

import ast
import importlib
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.signal import resample_poly

from enecg_hf import io_enecg, preprocessing_enecg
from enecg_hf.io_enecg import fix_header_text, parse_header_comments, read_record
from enecg_hf.preprocessing_enecg import (
    STANDARD_LEAD_NAMES,
    ECGInputError,
    crop_or_pad,
    fill_nonfinite,
    match_leads,
    normalize_lead_name,
    prepare_signal,
    resample,
)

from ecg_files import STANDARD, lead_pattern, peak_allocation, write_header, write_mat_zeros, write_record


@pytest.mark.parametrize(
    "spelling, lead",
    [("ii", "II"), ("II", "II"), ("avr", "aVR"), ("AVR", "aVR"), ("aVL", "aVL"), ("Lead V1", "V1"), ("v6", "V6"),
     ("MLII", "II"), ("DIII", "III"), ("C4", "V4"), ("lead_avf", "aVF")],
)
def test_lead_names_are_normalised_whatever_the_spelling(spelling, lead):
    assert normalize_lead_name(spelling) == lead


def test_unknown_leads_are_none():
    assert normalize_lead_name("vx") is None and normalize_lead_name("V7") is None


def test_match_leads_reorders_and_marks_missing_leads():
    names = ["v6", "AVR", "i", "ii", "vx"]
    signal = np.arange(5)[:, None] * np.ones((5, 3))
    standard, missing = match_leads(signal, names)
    assert standard.shape == (12, 3) and standard.dtype == np.float32
    assert standard[STANDARD_LEAD_NAMES.index("V6"), 0] == 0 and standard[STANDARD_LEAD_NAMES.index("aVR"), 0] == 1
    assert standard[0, 0] == 2 and standard[1, 0] == 3
    assert [lead for lead, gone in zip(STANDARD_LEAD_NAMES, missing) if not gone] == ["I", "II", "aVR", "V6"]


def test_match_leads_rejects_duplicates_and_shape_mismatch():
    with pytest.raises(ECGInputError, match="duplicate_lead"):
        match_leads(np.zeros((2, 4)), ["II", "ii"])
    with pytest.raises(ValueError, match="bad_shape"):
        match_leads(np.zeros((3, 4)), ["I", "II"])


def test_resample_uses_resample_poly_and_keeps_the_waveform():
    fs_in, fs_out = 360, 500
    time = np.arange(3600) / fs_in
    signal = np.sin(2 * np.pi * 1.0 * time)[None, :]
    out = resample(signal, fs_in, fs_out)
    assert out.shape == (1, 5000) and out.dtype == np.float32
    np.testing.assert_allclose(out, resample_poly(signal, 25, 18, axis=-1, padtype="line"), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out[0, 100:-100], np.sin(2 * np.pi * np.arange(5000) / fs_out)[100:-100], atol=1e-3)
    with pytest.raises(ECGInputError, match="bad_sampling_rate"):
        resample(signal, 0, 500)


def test_crop_or_pad():
    x = np.ones((2, 10))
    assert crop_or_pad(x, 4).shape == (2, 4)
    padded = crop_or_pad(x, 12)
    assert padded.shape == (2, 12) and padded[:, 10:].sum() == 0


def test_short_nan_runs_are_interpolated_long_ones_rejected_and_empty_leads_reported():
    x = np.tile(np.linspace(0, 1, 100), (3, 1))
    x[0, 10:15] = np.nan
    x[1, 50] = np.inf
    x[2, :] = np.nan
    filled, empty = fill_nonfinite(x, max_gap=5)
    np.testing.assert_allclose(filled[:2], np.tile(np.linspace(0, 1, 100), (2, 1)), atol=1e-6)
    assert empty.tolist() == [False, False, True]
    x[0, 10:16] = np.nan
    with pytest.raises(ECGInputError) as error:
        fill_nonfinite(x, max_gap=5)
    assert error.value.reason == "nan_run_too_long"


def test_prepare_signal_standardises_order_rate_and_length():
    names = ["V6", "V5", "V4", "V3", "V2", "V1", "avf", "avl", "avr", "iii", "ii", "i"]
    signal = np.stack([lead_pattern(normalize_lead_name(n), 250, 12.0) for n in names])
    prepared = prepare_signal(signal, 250, names, target_rate=500, seconds=10)
    assert prepared.signal.shape == (12, 5000) and prepared.signal.dtype == np.float32
    assert prepared.missing_leads == [] and prepared.flat_leads == [] and prepared.original_seconds == 12.0
    for row, lead in enumerate(STANDARD):
        np.testing.assert_allclose(prepared.signal[row, 50:-50], lead_pattern(lead, 500)[50:-50], atol=2e-3)


def test_prepare_signal_missing_leads_skip_or_zero_fill_and_flat_flags():
    names = ["I", "II", "V1", "V2", "V3", "V4", "V5", "V6"]
    signal = np.stack([lead_pattern(n, 500) for n in names])
    with pytest.raises(ECGInputError) as error:
        prepare_signal(signal, 500, names)
    assert error.value.reason == "missing_leads" and "aVR" in str(error.value)
    prepared = prepare_signal(signal, 500, names, fill_missing_leads=True)
    assert prepared.missing_leads == ["III", "aVR", "aVL", "aVF"] == prepared.flat_leads
    assert not prepared.signal[2:6].any()


def test_prepare_signal_rejects_low_rates_and_empty_signals():
    with pytest.raises(ECGInputError, match="sampling_rate_too_low"):
        prepare_signal(np.zeros((12, 500)), 50, STANDARD)
    with pytest.raises(ECGInputError, match="empty_signal"):
        prepare_signal(np.zeros((12, 0)), 500, STANDARD)


def test_fix_header_text_drops_the_mat_extension_only():
    original = "E00001.mat 12 500 5000 05-May-2020 09:49:17\nE00001.mat 16+24 1000/mV 16 0 -68 1250 0 I\n#Age: 78\n"
    fixed = fix_header_text(original)
    assert fixed.splitlines()[0] == "E00001 12 500 5000 05-May-2020 09:49:17"
    assert fixed.splitlines()[1:] == original.splitlines()[1:]
    assert fix_header_text(fixed) == fixed


def test_wfdb_record_round_trip_in_millivolts(tmp_path):
    base = write_record(tmp_path, "rec", lead_names=("I", "II", "III", "aVR", "aVF", "aVL", *STANDARD[6:]))
    for path in (base, base.with_suffix(".hea"), base.with_suffix(".dat")):
        recording = read_record(path)
        assert recording.signal.shape == (12, 5000) and recording.sampling_rate == 500
        assert recording.lead_names[4] == "aVF"
        np.testing.assert_allclose(recording.signal[4], lead_pattern("aVF", 500), atol=1e-3)


def test_microvolt_records_are_converted_to_millivolts(tmp_path):
    import wfdb

    wfdb.wrsamp("uv", fs=500, units=["uV"] * 12, sig_name=list(STANDARD), write_dir=str(tmp_path),
                p_signal=np.stack([lead_pattern(n, 500) * 1000 for n in STANDARD], axis=1), fmt=["16"] * 12)
    np.testing.assert_allclose(read_record(tmp_path / "uv").signal[1], lead_pattern("II", 500), atol=1e-3)


def test_numpy_and_csv_arrays(tmp_path):
    signal = np.stack([lead_pattern(n, 250) for n in STANDARD]).astype(np.float32)
    np.save(tmp_path / "a.npy", signal.T)  # (samples, leads) is transposed
    recording = read_record(tmp_path / "a.npy", sampling_rate=250)
    assert recording.signal.shape == (12, 2500) and recording.lead_names == list(STANDARD)
    names = ["ii", "i", "iii", "avr", "avl", "avf", "v1", "v2", "v3", "v4", "v5", "v6"]
    columns = [signal[STANDARD.index(normalize_lead_name(n))] for n in names]
    np.savetxt(tmp_path / "a.csv", np.stack(columns, axis=1), delimiter=",", header=",".join(names), comments="")
    recording = read_record(tmp_path / "a.csv", sampling_rate=250)
    assert recording.lead_names == names
    np.testing.assert_allclose(recording.signal[0], signal[1], atol=1e-6)
    with pytest.raises(ECGInputError, match="bad_sampling_rate"):
        read_record(tmp_path / "a.npy")


def test_header_comments_are_parsed():
    fields = parse_header_comments(["<age>: 51", "<sex>: F", "Dx: 1,2", "Rhythm: Sinus rhythm.", "free text"])
    assert fields == {"age": "51", "sex": "F", "dx": "1,2", "rhythm": "Sinus rhythm."}


@pytest.mark.parametrize("module, allowed", [(preprocessing_enecg, {"numpy", "scipy"}), (io_enecg, {"numpy", "scipy", "wfdb"})])
def test_remote_code_modules_import_only_numpy_scipy_wfdb_and_siblings(module, allowed):
    tree = ast.parse(Path(module.__file__).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots = {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level > 0:
                continue  # relative: a sibling module
            roots = {node.module.split(".")[0]}
        else:
            continue
        for root in roots:
            assert root in allowed or root in sys.stdlib_module_names, f"{module.__name__} imports {root}"


def test_remote_code_modules_work_copied_flat_into_a_folder(tmp_path):
    folder = tmp_path / "model_folder_pkg"
    folder.mkdir()
    (folder / "__init__.py").write_text("")
    # The files the model folder's code saving copies: io_enecg and the flat modules it imports (relatively).
    from transformers.dynamic_module_utils import get_relative_import_files

    copied = [io_enecg.__file__, *get_relative_import_files(io_enecg.__file__)]
    assert {Path(path).name for path in copied} == {"io_enecg.py", "preprocessing_enecg.py", "wfdb_enecg.py"}
    for path in copied:
        shutil.copy(path, folder)
    sys.path.insert(0, str(tmp_path))
    try:
        flat_io = importlib.import_module("model_folder_pkg.io_enecg")
        base = write_record(tmp_path / "records", "rec")
        assert flat_io.read_record(base).signal.shape == (12, 5000)
    finally:
        sys.path.remove(str(tmp_path))
        for name in [name for name in sys.modules if name.startswith("model_folder_pkg")]:
            del sys.modules[name]


# ------------------------------------------------------------------------------------------------ hostile files
MB = 1 << 20


def _refusal(path, **kwargs) -> tuple[int, ECGInputError]:
    peak, result = peak_allocation(read_record, path, **kwargs)
    assert isinstance(result, ECGInputError), f"{path} was read: {result!r}"
    return peak, result


def test_a_mat_bomb_is_refused_from_its_declared_shape_before_inflating(tmp_path):
    """12 x 5e6 zeros: a 120 kB file that inflates to 120 MB, behind a valid 10 s header."""
    write_mat_zeros(tmp_path / "bomb.mat", 12, 5_000_000)
    write_header(tmp_path / "bomb.hea", file_name="bomb.mat")
    assert (tmp_path / "bomb.mat").stat().st_size < 200_000
    peak, error = _refusal(tmp_path / "bomb.hea")
    assert error.reason == "too_long" and "5000000 samples" in str(error), error
    assert peak < 20 * MB, f"{peak / MB:.0f} MB allocated to refuse it"


def test_a_mat_whose_data_inflates_beyond_its_declared_shape_is_refused(tmp_path):
    """The matrix declares 12 x 5000, its data element holds 12 x 2.5e6 zeros (60 MB)."""
    write_mat_zeros(tmp_path / "liar.mat", 12, 2_500_000, declared=(12, 5000))
    write_header(tmp_path / "liar.hea", file_name="liar.mat")
    peak, error = _refusal(tmp_path / "liar.hea")
    assert error.reason == "too_large" and "inflates to more than" in str(error), error
    assert peak < 20 * MB, f"{peak / MB:.0f} MB allocated to refuse it"
    # A compressed record of the declared size reads (the same writer, honest shape).
    write_mat_zeros(tmp_path / "honest.mat", 12, 5000)
    write_header(tmp_path / "honest.hea", file_name="honest.mat")
    assert read_record(tmp_path / "honest.hea").signal.shape == (12, 5000)


def test_a_wfdb_header_claiming_a_huge_record_is_refused_before_reading(tmp_path):
    """12 x 1e6 samples (2000 s) with a matching sparse .dat of 24 MB that takes no disk space."""
    write_header(tmp_path / "huge.hea", sig_len=1_000_000)
    with open(tmp_path / "huge.dat", "wb") as handle:
        handle.truncate(12 * 1_000_000 * 2)
    peak, error = _refusal(tmp_path / "huge.hea")
    assert error.reason == "too_long" and "2000.0 s" in str(error), error
    assert peak < 5 * MB, f"{peak / MB:.0f} MB allocated to refuse it"


def test_record_limits_are_configurable_and_count_values(tmp_path):
    from enecg_hf.io_enecg import RecordLimits

    base = write_record(tmp_path, "rec")  # 12 x 5000 at 500 Hz
    with pytest.raises(ECGInputError, match="too_long"):
        read_record(base, limits=RecordLimits(max_seconds=9.0))
    with pytest.raises(ECGInputError, match="too_large"):
        read_record(base, limits=RecordLimits(max_values=12 * 4999))
    with pytest.raises(ECGInputError, match="bad_sampling_rate"):
        read_record(base, limits=RecordLimits(max_sampling_rate=400))
    assert read_record(base, limits=RecordLimits(max_seconds=10.0)).signal.shape == (12, 5000)


def test_a_one_line_csv_is_refused_without_parsing_it(tmp_path):
    path = tmp_path / "one_line.csv"
    path.write_text(",".join(["0.1"] * 400_000) + "\n")  # 1.6 MB, 400k values on one line
    peak, error = _refusal(path, sampling_rate=500)
    assert error.reason == "bad_shape" and "line 1" in str(error) and "longer than" in str(error), error
    assert peak < 5 * MB, f"{peak / MB:.0f} MB allocated to refuse it"
    # A long line further down, and too many lines for the limit, are found by counting lines.
    rows = "\n".join([",".join(["0.1"] * 12)] * 100)
    (tmp_path / "late.csv").write_text(rows + "\n" + ",".join(["0.1"] * 400_000) + "\n")
    assert _refusal(tmp_path / "late.csv", sampling_rate=500)[1].reason == "bad_shape"
    (tmp_path / "long.csv").write_text("\n".join([",".join(["0.1"] * 12)] * 40_000) + "\n")  # 80 s at 500 Hz
    error = _refusal(tmp_path / "long.csv", sampling_rate=500)[1]
    assert error.reason == "too_long" and "40000 samples" in str(error)


def test_npy_headers_are_checked_before_the_data_is_read(tmp_path):
    # A header declaring 12 x 1e8 float32 (4.8 GB) followed by no data.
    header = io_enecg.np.lib.format.header_data_from_array_1_0(np.zeros((1, 1), dtype=np.float32))
    header["shape"] = (12, 100_000_000)
    with open(tmp_path / "huge.npy", "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, header)
    peak, error = _refusal(tmp_path / "huge.npy", sampling_rate=500)
    assert error.reason == "too_large" and "(12, 100000000)" in str(error), error
    assert peak < 5 * MB
    # Declared 12 x 5000 but cut short.
    np.save(tmp_path / "short.npy", np.zeros((12, 5000), dtype=np.float32))
    data = (tmp_path / "short.npy").read_bytes()
    (tmp_path / "short.npy").write_bytes(data[: len(data) // 2])
    assert _refusal(tmp_path / "short.npy", sampling_rate=500)[1].reason == "truncated_signal"


def test_files_that_are_not_npy_arrays_say_what_they_are(tmp_path):
    np.savez(tmp_path / "archive.npz", signal=np.zeros((12, 5000)))
    (tmp_path / "archive.npz").rename(tmp_path / "disguised.npy")
    error = _refusal(tmp_path / "disguised.npy", sampling_rate=500)[1]
    assert error.reason == "unreadable_signal" and "zip archive" in str(error), error
    (tmp_path / "text.npy").write_text("1,2,3\n")
    error = _refusal(tmp_path / "text.npy", sampling_rate=500)[1]
    assert error.reason == "unreadable_signal" and "not a .npy file" in str(error), error
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    error = _refusal(tmp_path / "objects.npy", sampling_rate=500)[1]
    assert error.reason == "unreadable_signal" and "object" in str(error), error


@pytest.mark.parametrize(
    "fs, gain, message",
    [("-1", "1000", "sampling frequency -1 "), ("nan", "1000", "sampling frequency nan "),
     ("500", "nan", "ADC gain nan of "), ("500", "-200", "ADC gain -200 of "), ("500", "abc", "ADC gain nan of ")],
)
def test_header_values_wfdb_would_replace_by_defaults_are_refused(tmp_path, fs, gain, message):
    """wfdb reads a rate of -1 or NaN as 250 Hz: a record read at a made-up rate. A gain that is NaN, negative or no
    number leaves the scale unknown (a gain of 0 is WFDB's "uncalibrated", read: tests/test_long_records.py)."""
    base = write_record(tmp_path, "rec")
    write_header(tmp_path / "rec.hea", fs=fs, gain=gain)
    error = _refusal(base)[1]
    assert error.reason == "unreadable_header" and message in str(error), error
    write_header(tmp_path / "rec.hea", fs="500", gain="1000")
    assert read_record(base).sampling_rate == 500


# A line of /etc/passwd: what a "record" holds when a server reads the wrong file. No error may quote it.
SECRET = "root:hunter2:0:0:root:/root:/bin/bash"


def _npy_with_header(header: str) -> bytes:
    text = header.ljust(117) + "\n"
    return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text.encode()


HOSTILE_FILES = {
    "cell.csv": f"1,2\n3,{SECRET}\n",
    "first_row.csv": f"{SECRET}\n1\n2\n",
    "text.npy": f"{SECRET}\n",
    "header.npy": _npy_with_header(f"{{'descr': '{SECRET}', 'fortran_order': False, 'shape': (12, 500), }}"),
    "record_line.hea": f"{SECRET}\n",
    "rate.hea": f"rec 1 {SECRET} 5000\nrec.dat 16 200 16 0 0 0 0 II\n",
    "gain.hea": f"rec 1 500 5000\nrec.dat 16 {SECRET} 16 0 0 0 0 II\n",
    "variables.mat": None,
}


@pytest.mark.parametrize("name, content", HOSTILE_FILES.items(), ids=list(HOSTILE_FILES))
def test_errors_name_the_problem_not_the_file_contents(tmp_path, name, content):
    """Messages reach the people who sent the file (the Space shows them on the page): they say what is wrong and
    where, never the text of the file (a quoted cell, header line, field or variable name)."""
    path = tmp_path / name
    if content is None:  # a Challenge .mat without `val`, its one variable named after the secret
        from scipy.io import savemat

        savemat(path, {"hunter2": np.zeros((12, 10))})
        write_header(tmp_path / "variables.hea", sig_len=10, file_name="variables.mat")
        path = tmp_path / "variables.hea"
    else:
        if path.suffix == ".hea":
            write_record(tmp_path, "rec")  # the signal file the header names
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ECGInputError) as caught:
        read_record(path, sampling_rate=500)
    assert "hunter2" not in str(caught.value) and "root:" not in str(caught.value), caught.value


def test_short_records_and_absurd_amplitudes_are_refused_with_their_reason():
    signal = np.stack([lead_pattern(n, 250) for n in STANDARD]).astype(np.float32)
    with pytest.raises(ECGInputError, match="too_short: the record has 1 sample"):
        prepare_signal(signal[:, :1], 250, STANDARD)
    with pytest.raises(ECGInputError, match="implausible_amplitude: a sample of 3e\\+38 mV"):
        prepare_signal(signal / np.abs(signal).max() * 3e38, 250, STANDARD)  # finite in float32, overflows statistics
    assert prepare_signal(signal * 1000, 250, STANDARD).signal.shape == (12, 5000)  # microvolts: still read


@pytest.mark.parametrize("rate", [10**400, "500", True, None, float("inf"), -5],
                         ids=["10**400", "string", "bool", "none", "inf", "negative"])
def test_sampling_rates_must_be_positive_finite_numbers(rate):
    from enecg_hf.preprocessing_enecg import check_sampling_rate

    with pytest.raises(ECGInputError, match="bad_sampling_rate"):
        check_sampling_rate(rate)
