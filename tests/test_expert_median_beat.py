"""Median-beat expert: shapes and names, the median beat of a simulated ECG, baseline correction, the detection lead's
fallback and the flags of degenerate records (never NaN, never an exception), the measurements and their settings,
and the wave boundaries of LUDB records against the cardiologists' per-lead annotations."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import hide_module

from enecg_hf import EnECGConfig, EnECGModel
from enecg_hf.beats_enecg import bin_matrix
from enecg_hf.configuration_enecg import STANDARD_LEAD_NAMES, EnECGExpertConfig
from enecg_hf.data.ludb import wave_boundaries
from enecg_hf.expert_median_beat import LEAD_MEASUREMENTS, RECORD_MEASUREMENTS, EnECGMedianBeatExpert


pytest.importorskip("neurokit2")

LEADS = list(STANDARD_LEAD_NAMES)
LUDB = Path(os.environ.get("ENECG_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data")) / "ludb"
POINTS = 50


def make_expert(input_length: int = 5000, leads=LEADS, **settings) -> EnECGMedianBeatExpert:
    config = EnECGExpertConfig("median_beat", "median_beat", input_length, list(leads), settings=settings)
    return EnECGMedianBeatExpert(config, LEADS).eval()


# Gains of a simulated lead II in each lead: upright in most, inverted in aVR and V1 (as their QRS usually is).
LEAD_GAINS = (0.8, 1.0, 0.3, -0.9, 0.4, 0.6, -0.7, 0.5, 0.9, 1.2, 1.1, 0.9)


def simulated_record(heart_rate: int = 70, seconds: float = 10.0, fs: int = 500, seed: int = 0) -> np.ndarray:
    """(12, samples): neurokit2's ECGSYN lead II, scaled per lead (`LEAD_GAINS`), with a little independent noise."""
    import neurokit2 as nk

    ecg = nk.ecg_simulate(duration=seconds, sampling_rate=fs, heart_rate=heart_rate, random_state=seed, noise=0.0)
    noise = np.random.default_rng(seed).normal(0.0, 0.01, (12, len(ecg)))
    return (np.asarray(LEAD_GAINS)[:, None] * ecg[None] + noise).astype(np.float32)


def column(expert: EnECGMedianBeatExpert, embedding: torch.Tensor, name: str) -> torch.Tensor:
    return embedding[:, expert.feature_names.index(name)]


def test_shapes_names_and_the_median_beat_of_a_simulated_record():
    expert = make_expert()
    assert not list(expert.parameters()) and not expert.DIFFERENTIABLE
    names = expert.feature_names
    assert len(names) == expert.embedding_dim == 12 * POINTS + 1 + 12 + 2 + 3
    assert names[0] == "I.beat_-243ms" and names[POINTS - 1] == "I.beat_+443ms" and "V1.beat_+121ms" in names
    assert names[12 * POINTS] == "rr_mean" and names[-3:] == ["detected_on_II", "detected_on_V5", "detected_on_I"]
    x = torch.from_numpy(np.stack([simulated_record(70), simulated_record(100, seed=1)]))
    out = expert(x)
    assert out.shape == (2, expert.embedding_dim) and out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(column(expert, out, "rr_mean"), torch.tensor([60 / 70, 60 / 100]), atol=0.01, rtol=0)
    assert column(expert, out, "detected_on_II").eq(1).all() and column(expert, out, "beat_missing").eq(0).all()
    beat_ii = out[0, POINTS: 2 * POINTS]
    centre = names.index("II.beat_-5ms") - POINTS  # the point whose 14 ms span holds the R peak (-12 ... +2 ms)
    assert int(beat_ii.argmax()) in (centre, centre + 1)
    # The baseline is the PR segment's (P ends ~120 ms, QRS starts ~40 ms before the R peak here): 0 there.
    pr_segment = [names.index(f"II.beat_{t:+d}ms") - POINTS for t in (-103, -89, -75, -61)]
    assert float(beat_ii[pr_segment].abs().min()) < 0.02 * float(beat_ii.max())
    torch.testing.assert_close(out, expert(x), rtol=0, atol=0)  # deterministic


def test_binning_is_the_mean_of_whole_samples_and_an_area_average_otherwise():
    signal = np.random.default_rng(0).standard_normal((3, 350))
    np.testing.assert_allclose(signal @ bin_matrix(350, np.linspace(0, 350, 51)), signal.reshape(3, 50, 7).mean(-1))
    ramp = np.arange(7.0)[None]  # samples 0..6 covering [k, k+1): the area over [0.5, 2.0) is (0.5 * 0 + 1) / 1.5
    np.testing.assert_allclose(ramp @ bin_matrix(7, np.array([0.5, 2.0, 7.0])), [[1 / 1.5, 4.0]])
    # A bin inside one step (a coarse latent sequence) takes that step's value.
    np.testing.assert_allclose(ramp @ bin_matrix(7, np.array([2.2, 2.7])), [[2.0]])


def test_a_lead_offset_or_a_slow_drift_does_not_change_the_beat():
    """The median beat is measured from the PR segment's isoelectric level: a constant offset on a lead changes
    nothing; a baseline drift of 0.2 mV over the record moves the beat values by far less than the drift."""
    expert = make_expert()
    record = simulated_record()
    shifted = record.copy()
    shifted[6] += 0.8  # V1 offset
    drifting = record + 0.1 * np.sin(2 * np.pi * 0.1 * np.arange(5000) / 500)[None].astype(np.float32)
    base, moved, drifted = expert(torch.from_numpy(np.stack([record, shifted, drifting])))
    torch.testing.assert_close(moved, base, rtol=0, atol=1e-5)
    assert float((drifted - base)[: 12 * POINTS].abs().max()) < 0.05


def test_detection_falls_back_when_lead_ii_is_flat_and_says_so():
    expert = make_expert()
    record = simulated_record()
    no_ii = record.copy()
    no_ii[1] = 0.0  # a missing lead is zero-filled
    no_ii_v5 = no_ii.copy()
    no_ii_v5[10] = 0.0
    out = expert(torch.from_numpy(np.stack([record, no_ii, no_ii_v5])))
    detected = torch.stack([column(expert, out, f"detected_on_{lead}") for lead in ("II", "V5", "I")], dim=1)
    assert detected.tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 1]]
    assert column(expert, out, "II.flat").tolist() == [0, 1, 1] and column(expert, out, "V5.flat").tolist() == [0, 0, 1]
    assert out[1, POINTS: 2 * POINTS].eq(0).all()  # the flat lead's beat is 0
    # Another lead's beat is the same whichever lead the peaks came from (same beats, peaks within a sample or two).
    v1 = slice(6 * POINTS, 7 * POINTS)
    assert float((out[1, v1] - out[0, v1]).abs().max()) < 0.15 * float(out[0, v1].abs().max())
    analysis = expert.analyze(no_ii_v5)
    assert analysis.detection_lead == "I" and analysis.notes == ["II is flat or missing", "V5 is flat or missing"]
    # The expert reads only the leads it is given: detection leads it does not read are left out.
    assert make_expert(leads=["V5", "V6"]).detection_leads == ["V5"]


def test_degenerate_records_give_flags_never_nan_or_exceptions():
    expert = make_expert(measurements=True)
    generator = torch.Generator().manual_seed(0)
    x = torch.zeros(5, 12, 5000)  # 0: flat everywhere
    x[1] = torch.randn(12, 5000, generator=generator)  # white noise
    x[2] = torch.from_numpy(simulated_record())
    x[2, :, 3:7] = float("nan")  # NaN at the start of every lead
    x[3, :, :700] = torch.from_numpy(simulated_record()[:, :700])  # 1.4 s of ECG, then flat: too few beats
    x[4] = 1e6 * torch.randn(12, 5000, generator=generator).sign()
    out = expert(x)
    assert out.shape == (5, expert.embedding_dim) and torch.isfinite(out).all()
    names = expert.feature_names
    beat = out[:, : 12 * POINTS]
    flags = out[:, names.index("I.flat"):]
    assert torch.isin(flags, torch.tensor([0.0, 1.0])).all()
    # Flat: every lead flagged, no beat, no RR, no detection lead, every measurement missing.
    assert flags[0, :14].eq(1).all() and beat[0].eq(0).all() and out[0, names.index("rr_mean")] == 0
    assert column(expert, out, "detected_on_II")[0] == 0 and out[0, -len(expert.measured_names):].eq(1).all()
    assert column(expert, out, "II.flat")[2] == 1 and beat[2].eq(0).all()  # NaN leads count as missing
    assert column(expert, out, "beat_missing")[3] == 1 and beat[3].eq(0).all()
    analysis = expert.analyze(x[3].double().numpy())
    assert analysis.detection_lead is None and "min_beats 3" in analysis.reason
    # Every value is 0 or flagged where it was not measured; measured values are finite.
    for name in expert.measured_names:
        missing = column(expert, out, f"{name}_missing")
        assert (column(expert, out, name)[missing == 1] == 0).all(), name


def test_measurements_of_a_simulated_record():
    expert = make_expert(measurements=True)
    names = expert.feature_names
    assert len(expert.measured_names) == 12 * len(LEAD_MEASUREMENTS) + len(RECORD_MEASUREMENTS)
    assert {"II.st_j60", "V1.r_amp", "aVF.qtc", "qrs_axis_cos", "r_transition", "II.st_j60_missing"} <= set(names)
    # Without measurements the first columns are the same, and nothing else is computed.
    plain = make_expert()
    assert names[: 12 * POINTS + 1] == plain.feature_names[: 12 * POINTS + 1]
    record = simulated_record(60)
    out, without = expert(torch.from_numpy(record[None])), plain(torch.from_numpy(record[None]))
    torch.testing.assert_close(out[:, : 12 * POINTS + 1], without[:, : 12 * POINTS + 1], rtol=0, atol=0)
    analysis = expert.analyze(record)
    values = analysis.measurements
    assert set(values) == set(expert.measured_names)
    # neurokit2's ECGSYN at 60 bpm: Gaussian Q, R and S waves (troughs 40 ms before and 45 ms after the R peak, back
    # at the baseline ~85 ms from it), QT about 0.45 s, a P wave ~0.2 s before the R peak; lead II upright.
    waves = analysis.waves["II"]
    assert -0.12 <= waves["qrs_on"] <= -0.06 and 0.06 <= waves["qrs_off"] <= 0.12, waves
    assert 0.3 <= values["II.qt"] <= 0.55 and 0.08 <= values["II.pr"] <= 0.3
    assert values["II.r_amp"] > 0.5 and values["II.p_amp"] > 0 and values["II.t_amp"] > 0
    assert values["II.q_amp"] <= 0 <= values["II.r_amp"] and values["II.s_amp"] <= 0
    assert math.isclose(values["II.qtc"], values["II.qt"] / math.sqrt(analysis.rr_mean))
    assert values["qrs_axis_cos"] ** 2 + values["qrs_axis_sin"] ** 2 == pytest.approx(1.0)
    assert -30 <= math.degrees(math.atan2(values["qrs_axis_sin"], values["qrs_axis_cos"])) <= 100  # normal axis
    assert values["r_transition"] in (1, 2, 3, 4, 5, 6, 7)
    assert {"p_on", "qrs_on", "qrs_off", "t_off"} <= set(analysis.waves["II"])


def test_settings_are_checked():
    with pytest.raises(ValueError, match="none of detection_leads"):
        make_expert(leads=["V1"], detection_leads=["II"])
    with pytest.raises(ValueError, match="window_ms must run from before to after"):
        make_expert(window_ms=[50, 400])
    with pytest.raises(ValueError, match="baseline_window_ms must lie before the R peak"):
        make_expert(baseline_window_ms=[-300, -40])
    with pytest.raises(ValueError, match="points must be an integer"):
        make_expert(points=0)
    with pytest.raises(ValueError, match="delineation must be one of"):
        make_expert(delineation="dwtt")
    with pytest.raises(ValueError, match=r"unknown settings \['colour'\]"):
        make_expert(colour=1)
    coarse = make_expert(points=10, window_ms=[-200, 400])
    assert coarse.feature_names[:2] == ["I.beat_-170ms", "I.beat_-110ms"] and coarse.embedding_dim == 120 + 1 + 17
    config = EnECGConfig(experts=[{"name": "m", "type": "median_beat", "input_length": 500}], sampling_rate=100,
                         input_length=500, gate_input_length=50)
    with pytest.raises(ValueError, match=r"expert 'm' \(median_beat\): settings\.record_seconds must be 5"):
        EnECGModel(config)


def test_missing_neurokit_gives_a_clear_error(monkeypatch):
    hide_module(monkeypatch, "neurokit2")
    with pytest.raises(ImportError, match=r"median-beat expert needs neurokit2.*pip install enecg_hf\[features\]"):
        make_expert()


@pytest.mark.skipif(not (LUDB / "RECORDS").is_file(), reason=f"LUDB not found at {LUDB} (../shared/data is absent)")
def test_wave_boundaries_agree_with_ludb_annotations():
    """Every 20th LUDB record (10 of 200), z-scored as the model does, all 12 leads: the median beat's QRS onset and
    offset against the cardiologists' per-lead marks (median over their annotated beats, from the same R peaks).
    `bench/median_beat.py` measures every boundary on all 200 records (docs/experts.md)."""
    wfdb = pytest.importorskip("wfdb")
    records = [line.strip() for line in (LUDB / "RECORDS").read_text().split() if line.strip()][::20]
    expert = make_expert(measurements=True)
    errors = {"qrs_on": [], "qrs_off": []}
    for record in records:
        path = str(LUDB / record)
        signal = torch.tensor(wfdb.rdrecord(path).p_signal.T, dtype=torch.float32)
        analysis = expert.analyze(((signal - signal.mean()) / signal.std()).double().numpy())
        for lead in LEADS:
            reference = wave_boundaries(path, lead.lower(), analysis.r_peaks, expert.sampling_rate)
            for name in errors:
                got = analysis.waves.get(lead, {}).get(name, math.nan)
                if math.isfinite(reference[name]):
                    errors[name].append(abs(got - reference[name]) * 1000 if math.isfinite(got) else math.inf)
    for name, values in errors.items():
        values = np.array(values)
        assert len(values) >= 100, name
        assert np.median(values) < 20.0, (name, np.round(values, 1))
        assert np.mean(np.isfinite(values)) >= 0.9, name
