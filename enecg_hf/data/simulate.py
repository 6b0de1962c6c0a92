"""Simulated 12-lead ECGs with known labels: the package's offline default data for demos, tests and benchmarks.

Each beat is a moving cardiac dipole: the P, Q, R, S and T waves are Gaussian bumps of a 3-D heart vector (X, Y, Z in
millivolts, as in the ECGSYN model that `neurokit2.ecg_simulate` implements), projected onto I, II and V1-V6 with the
Dower matrix; III, aVR, aVL and aVF follow from I and II by Einthoven's and Goldberger's laws, so the 12 leads are
consistent with each other. `neurokit2.ecg_simulate(method="multileads")` takes ~2 s per 10 s record on one CPU core,
too slow for a default dataset; this model takes ~2 ms and its R peaks are placed, not detected, so the RR label is
exact.

Labels:
- `arrhythmia`: drawn from `RHYTHM_WEIGHTS`; it sets the rate range and the rhythm (regular sinus beats with P waves;
  irregular RR with fibrillatory waves and no P for atrial fibrillation; flutter waves at 250-350/min with 2:1-4:1
  conduction for atrial flutter; junctional rhythm or premature ventricular beats for "other").
- `rr_interval`: the mean interval between successive R peaks inside the record, in ms (60000 / rate for regular
  rhythms).
- `age`, `sex`: per subject (two records per subject); age shifts upward for atrial fibrillation/flutter, and QRS
  amplitude falls slightly with age and is higher for men, so both are weakly learnable.
- `potassium_flag`: 1 for ~20 % of records; abnormal records carry hyperkalaemic tall, narrow T waves.
Noise varies per record and is added to I, II and V1-V6 before the other limb leads are derived: white noise (0.005-0.05 mV), baseline wander (0.05-0.5 Hz, up to 0.3 mV) and mains hum
(50 or 60 Hz, up to 0.03 mV).

Record `i` of seed `s` depends only on `(s, i)`, so any sharding of the build gives the same dataset.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..io_enecg import ECGRecording
from ..preprocessing_enecg import STANDARD_LEAD_NAMES
from .source import BuildOptions, SourceRecord


SOURCE = "simulated"
EXTRA_FEATURES: dict = {}
DEFAULT_NUM_RECORDS = 1000
RECORDS_PER_SUBJECT = 2

RHYTHM_WEIGHTS = {
    "sinus_rhythm": 0.40,
    "sinus_bradycardia": 0.15,
    "sinus_tachycardia": 0.15,
    "atrial_fibrillation": 0.15,
    "atrial_flutter": 0.05,
    "other": 0.10,
}
# Heart-rate ranges (beats/min) of the sinus rhythms.
SINUS_RATES = {"sinus_rhythm": (60, 100), "sinus_bradycardia": (40, 59), "sinus_tachycardia": (101, 150)}

# Dower matrix: I, II, V1-V6 from the Frank X, Y, Z heart vector (Dower et al. 1980; Edenbrandt & Pahlm 1988).
DOWER = np.array(
    [
        [0.632, -0.235, 0.059],  # I
        [0.235, 1.066, -0.132],  # II
        [-0.515, 0.157, -0.917],  # V1
        [0.044, 0.164, -1.387],  # V2
        [0.882, 0.098, -1.277],  # V3
        [1.213, 0.127, -0.601],  # V4
        [1.125, 0.127, -0.086],  # V5
        [0.831, 0.076, 0.230],  # V6
    ],
    dtype=np.float64,
)

# Waves of a normal beat: (time of the peak relative to the R peak in s, width in s, X/Y/Z amplitude in mV).
# The QRS vector points left, down and back (+Z is posterior), the T vector left, down and forward.
SINUS_WAVES = {
    "P": (-0.16, 0.022, (0.06, 0.10, -0.02)),
    "Q": (-0.028, 0.009, (-0.08, -0.06, 0.05)),
    "R": (0.0, 0.011, (0.75, 0.85, 0.45)),
    "S": (0.032, 0.011, (-0.30, -0.12, 0.25)),
    "T": (0.30, 0.055, (0.22, 0.18, -0.18)),
}
# A premature ventricular beat: wide, bizarre QRS with a discordant T wave and no P wave.
VENTRICULAR_WAVES = {
    "R": (0.0, 0.035, (-0.6, 0.9, -0.8)),
    "S": (0.07, 0.03, (0.3, -0.3, 0.3)),
    "T": (0.32, 0.07, (0.25, -0.3, 0.3)),
}


def list_records(input_path: Path | None, options: BuildOptions) -> pd.DataFrame:
    count = options.limit if options.limit is not None else DEFAULT_NUM_RECORDS
    index = np.arange(count)
    return pd.DataFrame(
        {
            "record_id": [f"sim-{options.seed}-{i:06d}" for i in index],
            "subject_id": [f"sim-{options.seed}-subject{i // RECORDS_PER_SUBJECT:06d}" for i in index],
            "index": index,
        }
    )


def _beat_times(rhythm: str, seconds: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, bool, float]:
    """R-peak times (s) covering [-1, seconds + 1], whether each beat is ventricular, whether beats have P waves, and
    the flutter cycle (s, atrial flutter only)."""
    ventricular = None
    p_waves = rhythm in SINUS_RATES
    flutter_cycle = float("nan")
    if rhythm in SINUS_RATES:
        rate = rng.uniform(*SINUS_RATES[rhythm])
        intervals = np.full(int((seconds + 2) * rate / 60) + 2, 60.0 / rate)
    elif rhythm == "atrial_fibrillation":
        rate = rng.uniform(70, 140)
        # Irregularly irregular: independent intervals with a ~20 % coefficient of variation.
        intervals = rng.gamma(25.0, 60.0 / rate / 25.0, size=int((seconds + 2) * 4) + 4).clip(0.3, None)
    elif rhythm == "atrial_flutter":
        flutter_cycle = 60.0 / rng.uniform(250, 350)
        conduction = rng.choice([2, 3, 4], p=[0.6, 0.1, 0.3])
        intervals = np.full(int((seconds + 2) / (flutter_cycle * conduction)) + 2, flutter_cycle * conduction)
    else:  # "other": junctional rhythm (no P waves, 40-60/min) or sinus rhythm with premature ventricular beats
        if rng.random() < 0.4:
            rate = rng.uniform(40, 60)
            intervals = np.full(int((seconds + 2) * rate / 60) + 2, 60.0 / rate)
        else:
            p_waves = True
            rate = rng.uniform(60, 95)
            intervals = np.full(int((seconds + 2) * rate / 60) + 4, 60.0 / rate)
            ventricular = rng.random(len(intervals)) < 0.2
            # A premature beat comes early and is followed by a compensatory pause.
            for beat in np.flatnonzero(ventricular[:-1]):
                intervals[beat] *= 0.65
                intervals[beat + 1] *= 1.35
    times = -1.0 + rng.uniform(0, intervals[0]) + np.concatenate(([0.0], np.cumsum(intervals)))
    keep = times <= seconds + 1.0
    if ventricular is None:
        ventricular = np.zeros(len(times), dtype=bool)
    else:
        ventricular = np.concatenate(([False], ventricular))[: len(times)]
    return times[keep], ventricular[keep], p_waves, flutter_cycle


def _add_waves(
    vector: np.ndarray, sampling_rate: float, centres: np.ndarray, waves: dict, gains: dict, widths: dict
) -> None:
    """Add the Gaussian waves of beats at `centres` (s) to `vector` (3, samples) in place.

    Each bump is evaluated only within 5 widths of its peak (beyond that it is < 4e-6 of its height), which makes a
    record ~10x cheaper than evaluating every wave on the whole time axis.
    """
    if len(centres) == 0:
        return
    num_samples = vector.shape[1]
    for name, (offset, width, amplitude) in waves.items():
        width = width * widths.get(name, 1.0)
        half = int(np.ceil(5 * width * sampling_rate))
        peaks = (centres + offset) * sampling_rate
        index = np.round(peaks).astype(int)[:, None] + np.arange(-half, half + 1)[None, :]
        bump = np.exp(-0.5 * ((index - peaks[:, None]) / (width * sampling_rate)) ** 2)
        inside = (index >= 0) & (index < num_samples)
        shape = np.bincount(index[inside], weights=bump[inside], minlength=num_samples)
        vector += np.outer(np.asarray(amplitude) * gains.get(name, 1.0), shape)


def _rotation(rng: np.random.Generator, degrees: float) -> np.ndarray:
    """A random rotation of the heart vector by up to `degrees` about each axis (anatomical variation)."""
    angles = np.deg2rad(rng.uniform(-degrees, degrees, size=3))
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def simulate_record(
    index: int, seed: int = 0, sampling_rate: int = 500, seconds: float = 10.0
) -> tuple[np.ndarray, dict[str, Any]]:
    """Simulate record `index` of the simulated dataset with seed `seed`.

    Returns:
        `(signal, labels)`: (12, sampling_rate * seconds) float32 array in mV, standard lead order; and a dict with
        `rr_interval`, `age`, `sex`, `potassium_flag`, `arrhythmia` and `diagnoses`.
    """
    subject_rng = np.random.default_rng([seed, index // RECORDS_PER_SUBJECT, 1])
    rng = np.random.default_rng([seed, index, 0])
    sex = int(subject_rng.random() < 0.5)
    base_age = subject_rng.uniform(18, 85)
    rhythm = str(rng.choice(list(RHYTHM_WEIGHTS), p=list(RHYTHM_WEIGHTS.values())))
    age = float(np.clip(base_age + (rng.uniform(5, 15) if rhythm in ("atrial_fibrillation", "atrial_flutter") else 0), 18, 95))
    potassium_flag = int(rng.random() < 0.2)

    num_samples = int(round(sampling_rate * seconds))
    time = np.arange(num_samples) / sampling_rate
    beats, ventricular, p_waves, flutter_cycle = _beat_times(rhythm, seconds, rng)
    inside = (beats >= 0) & (beats < seconds)
    rr_interval = float(np.diff(beats[inside]).mean() * 1000.0) if inside.sum() >= 2 else None

    qrs_gain = (1.1 if sex else 0.95) * (1.15 - 0.004 * (age - 18)) * rng.uniform(0.8, 1.2)
    gains = {"Q": qrs_gain, "R": qrs_gain, "S": qrs_gain, "P": rng.uniform(0.7, 1.3), "T": rng.uniform(0.7, 1.2)}
    widths = {}
    if potassium_flag:
        gains["T"] *= 2.2  # hyperkalaemia: tall, narrow, peaked T waves
        widths["T"] = 0.6
    # QT shortens at faster rates (Bazett): scale the T offset with sqrt(RR).
    mean_rr = np.median(np.diff(beats)) if len(beats) > 1 else 1.0
    waves = dict(SINUS_WAVES)
    waves["T"] = (SINUS_WAVES["T"][0] * np.sqrt(mean_rr), *SINUS_WAVES["T"][1:])
    if not p_waves:
        waves.pop("P")

    vector = np.zeros((3, num_samples))
    _add_waves(vector, sampling_rate, beats[~ventricular], waves, gains, widths)
    _add_waves(vector, sampling_rate, beats[ventricular], VENTRICULAR_WAVES, {"R": qrs_gain, "S": qrs_gain}, {})
    if rhythm == "atrial_fibrillation":
        # Fibrillatory waves: a few incoherent 4-9 Hz oscillations of the atrial vector.
        for _ in range(3):
            frequency, phase = rng.uniform(4, 9), rng.uniform(0, 2 * np.pi)
            vector += np.outer(rng.normal(0, 0.02, 3) + [0, 0.02, -0.02], np.sin(2 * np.pi * frequency * time + phase))
    elif rhythm == "atrial_flutter":
        # Flutter waves: a sawtooth at the atrial rate, seen mostly in the inferior leads.
        phase = (time / flutter_cycle + rng.random()) % 1.0
        vector += np.outer([0.02, -0.12, 0.05], phase - 0.5)
    vector = _rotation(rng, 15.0) @ vector

    # Noise goes on the 8 independent leads (I, II, V1-V6); like an ECG machine, derive III, aVR, aVL, aVF after.
    independent = DOWER @ vector
    noise_level = rng.uniform(0.005, 0.05)
    independent += rng.normal(0.0, noise_level, independent.shape)
    wander_frequency = rng.uniform(0.05, 0.5)
    wander_phase = rng.uniform(0, 2 * np.pi, (len(independent), 1))
    independent += rng.uniform(0, 0.3) * np.sin(2 * np.pi * wander_frequency * time + wander_phase)
    mains = rng.choice([50.0, 60.0])
    independent += rng.uniform(0, 0.03) * np.sin(2 * np.pi * mains * time + rng.uniform(0, 2 * np.pi))
    lead_i, lead_ii = independent[0], independent[1]
    limb = np.stack([lead_i, lead_ii, lead_ii - lead_i, -(lead_i + lead_ii) / 2, lead_i - lead_ii / 2, lead_ii - lead_i / 2])
    signal = np.concatenate([limb, independent[2:]])

    labels = {
        "rr_interval": rr_interval,
        "age": round(age, 1),
        "sex": sex,
        "potassium_flag": potassium_flag,
        "arrhythmia": rhythm,
        "diagnoses": [rhythm] + (["premature_ventricular_beats"] if ventricular.any() else []),
    }
    return signal.astype(np.float32), labels


def load_record(row: dict[str, Any], options: BuildOptions) -> SourceRecord:
    signal, labels = simulate_record(int(row["index"]), options.seed, options.sampling_rate, options.seconds)
    return SourceRecord(ECGRecording(signal, float(options.sampling_rate), list(STANDARD_LEAD_NAMES)), labels)
