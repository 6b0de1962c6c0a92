"""The fast WFDB reader (`enecg_hf/wfdb_enecg.py`): headers parse to what `wfdb.rdheader` reads, signals are
bit-identical to `wfdb.rdrecord(...).p_signal`, and everything else goes to `wfdb` (and says so)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
import wfdb

from enecg_hf import io_enecg
from enecg_hf.io_enecg import RecordLimits, fix_header_text, read_record
from enecg_hf.preprocessing_enecg import ECGInputError
from enecg_hf.wfdb_enecg import fast_read_unsupported, parse_header, read_dat_signal

from ecg_files import SHARED_DATA, shared_folder


HEADER_FIELDS = ("record_name", "n_sig", "fs", "sig_len", "file_name", "fmt", "samps_per_frame", "skew", "byte_offset",
                 "adc_gain", "baseline", "units", "adc_res", "adc_zero", "init_value", "checksum", "block_size",
                 "sig_name", "comments")
LONG = RecordLimits(max_seconds=3600.0, max_values=1 << 26)


def _wfdb_header(text: str, name: str):
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, f"{name}.hea").write_text(text, encoding="ascii")
        return wfdb.rdheader(str(Path(folder, name)))


def _assert_same_header(path: Path) -> None:
    text = fix_header_text(path.read_text(encoding="ascii", errors="ignore"))
    ours = parse_header(text)
    assert ours is not None, f"{path} should parse"
    theirs = _wfdb_header(text, text.split(None, 1)[0])
    for name in HEADER_FIELDS:
        mine, reference = getattr(ours, name), getattr(theirs, name)
        assert mine == reference and type(mine) is type(reference), f"{path}: {name} {mine!r} != {reference!r}"
        if isinstance(mine, list):
            assert [type(v) for v in mine] == [type(v) for v in reference], f"{path}: types of {name}"


def _assert_exact(base: Path, header=None) -> None:
    """Our float32 and float64 reads equal wfdb's p_signal bit for bit (NaN where wfdb has NaN)."""
    header = header or parse_header(Path(f"{base}.hea").read_text(encoding="ascii", errors="ignore"))
    assert header is not None and fast_read_unsupported(header) is None, base
    for dtype, resolution in ((np.float32, 32), (np.float64, 64)):
        ours = read_dat_signal(base.parent, header, header.sig_len, dtype)
        theirs = wfdb.rdrecord(str(base), sampto=header.sig_len, return_res=resolution).p_signal
        assert ours is not None, base
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, base
        assert np.array_equal(ours, theirs, equal_nan=True), f"{base}: {np.abs(ours - theirs).max()}"
        assert np.array_equal(np.isnan(ours), np.isnan(theirs)), base


class ReaderSpy:
    """Counts the wfdb calls io_enecg makes (wfdb is read through `wfdb.<name>` at call time)."""

    def __init__(self, monkeypatch):
        self.calls = {"rdheader": 0, "rdrecord": 0}
        for name in self.calls:
            original = getattr(wfdb, name)

            def spy(*args, _original=original, _name=name, **kwargs):
                self.calls[_name] += 1
                return _original(*args, **kwargs)

            monkeypatch.setattr(wfdb, name, spy)


def _both_paths(path, monkeypatch, limits=LONG):
    """(fast-path result, wfdb-only result, the path the default read took): recordings or ECGInputError reasons."""
    results = []
    spy = None
    for fast in (True, False):
        monkeypatch.setattr(io_enecg, "FAST_WFDB", fast)
        if fast:
            spy = ReaderSpy(monkeypatch)
        try:
            results.append(read_record(path, limits=limits))
        except ECGInputError as error:
            results.append(error.reason)
        if fast:
            calls = dict(spy.calls)
    monkeypatch.setattr(io_enecg, "FAST_WFDB", True)
    return results[0], results[1], ("wfdb" if calls["rdrecord"] else "fast"), calls


def _assert_same_recording(a, b) -> None:
    assert not isinstance(a, str) and not isinstance(b, str), (a, b)
    assert a.signal.dtype == b.signal.dtype == np.float32
    assert np.array_equal(a.signal, b.signal, equal_nan=True)
    assert (a.sampling_rate, a.lead_names, a.comments) == (b.sampling_rate, b.lead_names, b.comments)


# ------------------------------------------------------------------------------------------------ real records
def _real_headers() -> list[Path]:
    folders = ["ludb", "ptbxl_sample500", "mitdb", "wfdb_python_sample", "challenge2021_sample50",
               "challenge2020_awwong1", "challenge2020_sebgood"]
    return sorted(path for name in folders if (SHARED_DATA / name).is_dir() for path in (SHARED_DATA / name).rglob("*.hea"))


def test_every_real_header_parses_to_the_fields_wfdb_reads():
    """LUDB, PTB-XL, MIT-BIH, PTB and Challenge headers (the original Georgia ones too, record line fixed)."""
    headers = _real_headers()
    if not headers:
        pytest.skip(f"real ECG data not found at {SHARED_DATA} (see shared/data/README.md)")
    for path in headers:
        _assert_same_header(path)


def test_every_ludb_record_is_bit_identical_to_wfdb():
    folder = shared_folder("ludb") / "data"
    bases = sorted(path.with_suffix("") for path in folder.glob("*.hea"))
    assert len(bases) == 200
    for base in bases:
        _assert_exact(base)


def test_ptbxl_records_are_bit_identical_to_wfdb():
    bases = sorted(path.with_suffix("") for path in shared_folder("ptbxl_sample500").rglob("*_hr.hea"))[:25]
    assert bases
    for base in bases:
        _assert_exact(base)


def test_mit_bih_100_format_212_and_a_two_file_record_are_bit_identical_to_wfdb():
    folder = shared_folder("wfdb_python_sample")
    header = parse_header((folder / "100.hea").read_text())
    assert header.fmt == ["212", "212"] and header.sig_len == 650000
    _assert_exact(folder / "100")
    ptb = parse_header((folder / "s0010_re.hea").read_text())  # 12 leads in .dat, 3 Frank leads in .xyz
    assert len(set(ptb.file_name)) == 2
    _assert_exact(folder / "s0010_re")
    _assert_exact(shared_folder("mitdb") / "100")  # the same record as format 16, one channel


def test_read_record_takes_the_fast_path_for_real_records_and_agrees_with_wfdb(monkeypatch):
    for base in [shared_folder("ludb") / "data" / "1", shared_folder("wfdb_python_sample") / "100"]:
        fast, reference, path, calls = _both_paths(base, monkeypatch)
        assert path == "fast" and calls == {"rdheader": 0, "rdrecord": 0}
        _assert_same_recording(fast, reference)


# ------------------------------------------------------------------------------------------------ synthetic records
DIGITAL_RANGE = {"16": 32767, "212": 2047, "80": 127, "32": 1 << 20}


def _write(folder: Path, name: str, fmt: str, samples: int, gains, baselines, units=None, nan_at=None) -> Path:
    """A record of random ADC values over the format's whole range (one invalid-sample code if `nan_at`)."""
    rng = np.random.default_rng(len(name) + samples)
    top = DIGITAL_RANGE[fmt]
    digital = rng.integers(-top, top + 1, size=(samples, len(gains)))
    if nan_at is not None:
        digital[nan_at] = {"16": -(2**15), "212": -(2**11)}[fmt]
    wfdb.wrsamp(name, fs=500, units=units or ["mV"] * len(gains), sig_name=[f"s{i}" for i in range(len(gains))],
                d_signal=digital, fmt=[fmt] * len(gains), adc_gain=list(gains), baseline=list(baselines),
                write_dir=str(folder))
    return folder / name


@pytest.mark.parametrize("fmt", ["16", "212"])
@pytest.mark.parametrize("samples", [1, 2, 7, 501, 5000])
def test_synthetic_records_are_bit_identical_to_wfdb(tmp_path, fmt, samples):
    """Odd and even sample counts (an odd total of 212 samples ends in half a block), several channels, non-zero
    baselines, gains that are not powers of two, uV units, an invalid sample (NaN)."""
    gains, baselines = [200.0, 37.5, 1000.0, 4880.0, 0.3], [1024, -7, 0, 15, -300]
    base = _write(tmp_path, f"r{fmt}", fmt, samples, gains, baselines, ["mV", "uV", "mV", "mV", "mV"],
                  nan_at=(samples // 2, 1))
    _assert_exact(base)


def test_baselines_beyond_float32_integers_take_wfdb_arithmetic(tmp_path):
    """|ADC value - baseline| >= 2**24 is not exact in float32: wfdb's rounding after the subtraction is kept."""
    base = _write(tmp_path, "far", "16", 3001, [200.0, 7.3], [0, 0])
    _edit_signal_lines(base, "(0)", "(16777000)")
    header = parse_header((tmp_path / "far.hea").read_text())
    assert header.baseline == [16777000, 16777000]
    _assert_exact(base, header)


def test_synthetic_records_read_the_same_through_read_record(tmp_path, monkeypatch):
    for fmt in ("16", "212"):
        base = _write(tmp_path, f"rec{fmt}", fmt, 2501, [200.0, 1000.0, 37.5], [1024, 0, -7], ["mV", "uV", "V"])
        fast, reference, path, calls = _both_paths(base, monkeypatch)
        assert path == "fast" and calls == {"rdheader": 0, "rdrecord": 0}
        _assert_same_recording(fast, reference)


def test_byte_offsets_and_several_signal_files_are_read_exactly(tmp_path, monkeypatch):
    one = _write(tmp_path, "one", "212", 1001, [200.0, 100.0, 50.0], [0, 5, -5])
    two = _write(tmp_path, "two", "16", 1001, [1000.0, 250.0], [3, 0])
    # `one.dat` behind 17 bytes of preamble (a byte offset), then the two files in one record.
    (tmp_path / "pre.dat").write_bytes(b"x" * 17 + (tmp_path / "one.dat").read_bytes())
    lines = [line for line in (tmp_path / "one.hea").read_text().splitlines()[1:]]
    lines = [line.replace("one.dat 212", "pre.dat 212+17") for line in lines]
    lines += (tmp_path / "two.hea").read_text().splitlines()[1:]
    (tmp_path / "both.hea").write_text("\n".join(["both 5 500 1001", *lines]) + "\n")
    header = parse_header((tmp_path / "both.hea").read_text())
    assert header.byte_offset == [17, 17, 17, None, None]
    _assert_exact(tmp_path / "both", header)
    expected = np.concatenate([wfdb.rdrecord(str(one)).p_signal, wfdb.rdrecord(str(two)).p_signal], axis=1)
    assert np.array_equal(read_dat_signal(tmp_path, header, dtype=np.float64), expected)
    fast, reference, path, _ = _both_paths(tmp_path / "both", monkeypatch)
    assert path == "fast"
    _assert_same_recording(fast, reference)


# ------------------------------------------------------------------------------------------------ wfdb's path
def _edit_signal_lines(base: Path, old: str, new: str) -> None:
    header = Path(f"{base}.hea")
    lines = header.read_text().splitlines()
    header.write_text("\n".join([lines[0], *(line.replace(old, new, 1) for line in lines[1:])]) + "\n")


@pytest.mark.parametrize("case", ["format 32", "format 80", "2 samples per frame", "skew", "short signal lines",
                                  "counter frequency", "checksum", "more signal lines", "fewer signal lines",
                                  "tab in a line"])
def test_headers_the_fast_reader_does_not_take_go_to_wfdb(tmp_path, monkeypatch, case):
    """Each case is read by wfdb (`rdrecord` called) and the result is what the wfdb-only reader gives."""
    fmt = {"format 32": "32", "format 80": "80"}.get(case, "16")
    base = _write(tmp_path, "rec", fmt, 1000, [200.0, 1000.0], [10, -3])
    header_path = tmp_path / "rec.hea"
    text = header_path.read_text()
    lines = text.splitlines()
    if case == "2 samples per frame":
        _edit_signal_lines(base, "rec.dat 16", "rec.dat 16x2")
        header_path.write_text(header_path.read_text().replace("rec 2 500 1000", "rec 2 500 500"))
    elif case == "skew":
        _edit_signal_lines(base, "rec.dat 16", "rec.dat 16:0")
        lines = header_path.read_text().splitlines()
        lines[2] = lines[2].replace("rec.dat 16:0", "rec.dat 16:3")
        header_path.write_text("\n".join(lines) + "\n")
    elif case == "short signal lines":  # adc_res ... description left out: wfdb's defaults apply
        header_path.write_text("\n".join([lines[0], *(" ".join(line.split()[:3]) for line in lines[1:])]) + "\n")
    elif case == "counter frequency":
        header_path.write_text(text.replace("rec 2 500 1000", "rec 2 500/1(0) 1000"))
    elif case == "checksum":  # a header whose checksums do not match the samples: wfdb reads it (it ignores them)
        fields = lines[1].split()
        fields[6] = str(int(fields[6]) + 1)
        header_path.write_text("\n".join([lines[0], " ".join(fields), *lines[2:]]) + "\n")
    elif case == "more signal lines":  # refused before either reader runs (wfdb would read past its lists)
        header_path.write_text(text.replace("rec 2 500 1000", "rec 1 500 1000"))
        fast, reference, _, calls = _both_paths(base, monkeypatch)
        assert fast == reference == "unreadable_header" and calls["rdrecord"] == 0
        return
    elif case == "fewer signal lines":
        header_path.write_text(text.replace("rec 2 500 1000", "rec 3 500 1000"))
        fast, reference, _, calls = _both_paths(base, monkeypatch)
        assert fast == reference == "unreadable_header" and calls["rdrecord"] == 0
        return
    elif case == "tab in a line":
        header_path.write_text(text.replace("rec 2 500 1000", "rec\t2 500 1000"))
    parsed = parse_header(header_path.read_text())
    if case in ("format 32", "format 80", "2 samples per frame", "skew"):
        assert parsed is not None and fast_read_unsupported(parsed), case
    elif case == "checksum":
        assert parsed is not None and fast_read_unsupported(parsed) is None
        assert read_dat_signal(tmp_path, parsed) is None  # the checksum check hands it to wfdb
    else:
        assert parsed is None, case
    fast, reference, path, calls = _both_paths(base, monkeypatch)
    assert path == "wfdb" and calls["rdrecord"] == 1, case
    if isinstance(reference, str):
        assert fast == reference, case
    else:
        _assert_same_recording(fast, reference)


# ------------------------------------------------------------------------------------------------ bad files
@pytest.mark.parametrize("fmt,samples,keep", [("16", 1000, 3000), ("16", 1000, 5999), ("212", 1001, 2251),
                                              ("212", 1001, 4504), ("212", 1001, 10), ("16", 1000, 0)])
def test_truncated_signal_files_fail_as_with_wfdb(tmp_path, monkeypatch, fmt, samples, keep):
    """A signal file cut short: the same error class on both paths (`truncated_signal` from the size check; a 212
    file one byte short of its last half block is left to wfdb, which gives `unreadable_signal`)."""
    base = _write(tmp_path, "cut", fmt, samples, [200.0, 1000.0, 500.0], [0, 1, 2])
    data = (tmp_path / "cut.dat").read_bytes()
    (tmp_path / "cut.dat").write_bytes(data[:keep])
    fast, reference, path, _ = _both_paths(base, monkeypatch)
    assert isinstance(fast, str) and fast == reference, (fast, reference)


def test_size_limits_apply_before_the_fast_reader_reads(tmp_path, monkeypatch):
    base = _write(tmp_path, "big", "16", 5000, [200.0], [0])

    def forbidden(*args, **kwargs):
        raise AssertionError("samples read before the size check")

    monkeypatch.setattr(io_enecg, "read_dat_signal", forbidden)
    with pytest.raises(ECGInputError) as error:
        read_record(base, limits=RecordLimits(max_seconds=5.0))
    assert error.value.reason == "too_long"
    with pytest.raises(ECGInputError) as error:
        read_record(base, limits=RecordLimits(max_values=4999))
    assert error.value.reason == "too_large"


@pytest.mark.parametrize("record_line", ["rec 2 500 1000 25:61:00 01/01/2000", "rec 2 500 1000 10:00:00 31/02/2000",
                                         "rec 2 500 1000 12:00:00 1/13/2000", "rec 2 500 1000 99-Jan-2020 10:00:00"])
def test_headers_wfdb_refuses_are_refused_the_same_way(tmp_path, monkeypatch, record_line):
    base = _write(tmp_path, "rec", "16", 1000, [200.0, 1000.0], [0, 0])
    header = tmp_path / "rec.hea"
    lines = header.read_text().splitlines()
    header.write_text("\n".join([record_line, *lines[1:]]) + "\n")
    assert parse_header(header.read_text()) is None
    fast, reference, _, _ = _both_paths(base, monkeypatch)
    assert fast == reference == "unreadable_header"


def test_missing_signal_file_is_reported_as_before(tmp_path, monkeypatch):
    base = _write(tmp_path, "gone", "212", 100, [200.0], [0])
    (tmp_path / "gone.dat").unlink()
    fast, reference, _, _ = _both_paths(base, monkeypatch)
    assert fast == reference == "missing_signal_file"


# ------------------------------------------------------------------------------------------------ spans
@pytest.mark.parametrize("fmt", ["16", "212"])
def test_spans_from_any_sample_are_bit_identical_to_wfdb_sampfrom_sampto(tmp_path, fmt):
    """A span read from the middle of a record (odd and even starts: a 212 span may start in the second half of a
    three-byte block, with an odd or even number of channels) equals `wfdb.rdrecord(sampfrom=, sampto=)`, and so do
    the spans of a record stored in two files."""
    three = _write(tmp_path, f"three{fmt}", fmt, 3001, [200.0, 37.5, 1000.0], [1024, -7, 0], nan_at=(1500, 1))
    two = _write(tmp_path, f"two{fmt}", fmt, 3001, [200.0, 100.0], [0, 5])
    lines = [line for name in (three, two) for line in Path(f"{name}.hea").read_text().splitlines()[1:]]
    (tmp_path / "both.hea").write_text("\n".join(["both 5 500 3001", *lines]) + "\n")
    for base in (three, two, tmp_path / "both"):
        header = parse_header(Path(f"{base}.hea").read_text())
        for start, stop in ((0, 1), (1, 2), (1, 1000), (2, 1001), (1499, 1502), (2000, 3001), (3000, 3001)):
            for dtype, resolution in ((np.float32, 32), (np.float64, 64)):
                ours = read_dat_signal(base.parent, header, stop - start, dtype, start=start)
                theirs = wfdb.rdrecord(str(base), sampfrom=start, sampto=stop, return_res=resolution).p_signal
                assert ours is not None and ours.dtype == theirs.dtype, (base, start, stop)
                assert np.array_equal(ours, theirs, equal_nan=True), (base, start, stop)


def test_a_lazy_record_reads_only_the_span_asked_for(tmp_path):
    """`open_record(lazy=True)` reads the header, then only the bytes of each span: a window of a one-hour two-lead
    record allocates a few kB, the whole record tens of MB; spans equal slices of the whole read."""
    from ecg_files import peak_allocation

    from enecg_hf.io_enecg import open_record

    base = _write(tmp_path, "hour", "212", 250 * 3600, [200.0, 200.0], [0, 0])
    (tmp_path / "hour.hea").write_text((tmp_path / "hour.hea").read_text().replace(" 500 ", " 250 ", 1))
    unlimited = RecordLimits(max_seconds=float("inf"), max_values=1 << 30)
    whole_peak, whole = peak_allocation(read_record, base, limits=unlimited)
    reader = open_record(base, limits=RecordLimits(max_seconds=60.0), lazy=True)
    assert reader.num_samples == 250 * 3600 and reader.sampling_rate == 250
    window_peak, window = peak_allocation(reader.read, 250 * 1800 + 1, 250 * 1810 + 1)
    assert window.shape == (2, 2500) and np.array_equal(window, whole.signal[:, 250 * 1800 + 1 : 250 * 1810 + 1])
    assert window_peak < 200_000 and whole_peak > 20_000_000, (window_peak, whole_peak)
    with pytest.raises(ECGInputError) as error:  # the limits apply to each span of a lazy record
        reader.read(0, 250 * 61)
    assert error.value.reason == "too_long"
    with pytest.raises(ECGInputError) as error:  # and to the whole record otherwise, from its header
        open_record(base, limits=RecordLimits(max_seconds=60.0))
    assert error.value.reason == "too_long"
