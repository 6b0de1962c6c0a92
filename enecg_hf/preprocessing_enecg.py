"""Signal transforms shared by the dataset builders and serving: standard lead order, resampling, fixed length,
non-finite samples and flat leads.

Every function takes and returns numpy arrays laid out (leads, samples) in millivolts. Bad input raises
[`ECGInputError`], a `ValueError` whose `reason` is a short machine-readable code (the dataset build report counts
skipped records by it).

This module is copied flat into Hugging Face model folders as remote code, so it imports only numpy, scipy and the
standard library (scipy inside a `try`, so that loading a model folder's code does not require it).
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Sequence

import numpy as np


STANDARD_LEAD_NAMES = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")

# Spellings seen in the wild, keyed by the canonical form `_lead_key` gives (lower case, no spaces, dashes,
# underscores or "lead" prefix). Names of other conventions are mapped only where they name one standard lead
# unambiguously, each for the reason in LEAD_ALIAS_NOTES (shown to the user when a record uses it):
# - MLI/MLII/MLIII (also written ML1/ML2/ML3, e.g. in MIT-BIH-derived databases): the Mason-Likar modified limb leads of
#   Holter and bedside monitoring, the same bipolar limb leads with the limb electrodes moved to the torso (close to
#   the standard leads I-III, not identical: amplitudes and axis shift somewhat).
# - D1-D3 / DI-DIII: Einthoven's "derivations", the names of leads I-III in several European databases and devices.
# - C1-C6: the British (and IEC) names of the chest leads V1-V6.
# Not mapped, because they are not one standard lead: CM5, CC5, CS5 and other bipolar chest leads of Holter records
# (CM5 runs from the manubrium to the V5 position and looks like V5 without being it), ECG1/ECG2, "record 14046,
# signal 0": their rows need names from the caller (`lead_names`, `enecg predict --lead-names`).
_MASON_LIKAR = ("Mason-Likar modified limb lead (limb electrodes on the torso, as in Holter and monitoring records): "
                "close to the standard limb lead, not identical")
_EINTHOVEN = "European name of the limb lead (Einthoven's derivation)"
_CHEST = "British/IEC name of the chest lead"
LEAD_ALIAS_NOTES = {
    **{name: _MASON_LIKAR for name in ("mli", "mlii", "mliii", "ml1", "ml2", "ml3")},
    **{name: _EINTHOVEN for name in ("d1", "d2", "d3", "di", "dii", "diii")},
    **{f"c{i}": _CHEST for i in range(1, 7)},
}
LEAD_ALIASES = {
    **{lead.lower(): lead for lead in STANDARD_LEAD_NAMES},
    **{f"{prefix}{number}": lead for lead, numbers in (("I", ("i", "1")), ("II", ("ii", "2")), ("III", ("iii", "3")))
       for number in numbers for prefix in ("ml", "d")},
    **{f"c{i}": f"V{i}" for i in range(1, 7)},
}


# Peak |amplitude| beyond which a "millivolt" signal cannot be an ECG in any unit (a kilovolt; microvolts mistaken for
# millivolts stay under 1e4). Larger values also overflow float32 statistics (NaN predictions).
MAX_AMPLITUDE_MV = 1e6
MIN_SECONDS = 1.0  # shorter than one heartbeat: nothing to analyse, and resampling a few samples is ill-defined


class ECGInputError(ValueError):
    """A record that cannot be used, with a short `reason` code (e.g. `"missing_leads"`, `"nan_run_too_long"`)."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.detail = message


def check_sampling_rate(value: Any, maximum: float | None = None) -> float:
    """A sampling rate as a float, or `ECGInputError("bad_sampling_rate")`: it must be a real number (not a string or
    a bool), finite, positive and at most `maximum` Hz.

    Args:
        value: the rate as given (`int`, `float` or a numpy number).
        maximum: highest accepted rate in Hz, if any.
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise ECGInputError("bad_sampling_rate", f"sampling rate {value!r} is not a number (Hz)")
    try:
        rate = float(value)
    except OverflowError:  # an int too large for a float, e.g. 10**400
        rate = math.inf
    if not math.isfinite(rate) or rate <= 0:
        shown = str(value) if len(str(value)) <= 24 else f"{str(value)[:12]}... ({len(str(value))} characters)"
        raise ECGInputError("bad_sampling_rate", f"sampling rate {shown} Hz is not a positive finite number")
    if maximum is not None and rate > maximum:
        raise ECGInputError("bad_sampling_rate", f"sampling rate {rate:g} Hz is above {maximum:g} Hz, more than any ECG "
                            "device records at (a unit mistake?)")
    return rate


def _resample_poly():
    """`scipy.signal.resample_poly`, imported in a `try`: `transformers` then does not require scipy just to load a
    model folder's code (it skips imports inside `try` blocks)."""
    try:
        from scipy.signal import resample_poly
    except ImportError as error:
        raise ECGInputError("missing_dependency", "resampling needs scipy: pip install scipy") from error
    return resample_poly


def _lead_key(name: str) -> str:
    key = re.sub(r"[\s_\-.]", "", str(name)).lower()
    return key[4:] if key.startswith("lead") and len(key) > 4 else key


def normalize_lead_name(name: str) -> str | None:
    """The standard name of a lead (`"avr"`, `"AVR"`, `"lead aVR"` -> `"aVR"`), or `None` for a non-standard lead."""
    return LEAD_ALIASES.get(_lead_key(name))


def lead_alias_notes(lead_names: Sequence[str]) -> list[str]:
    """One note for each name of another convention read as a standard lead (`MLII` -> II, `D3` -> III, `C1` -> V1),
    saying why (`LEAD_ALIAS_NOTES`); names that are standard leads in any spelling get none."""
    return [f"lead {name!r} read as {LEAD_ALIASES[_lead_key(name)]}: {LEAD_ALIAS_NOTES[_lead_key(name)]}"
            for name in lead_names if _lead_key(name) in LEAD_ALIAS_NOTES]


def match_leads(signal: np.ndarray, lead_names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Reorder the rows of a record into `STANDARD_LEAD_NAMES`, whatever the source's spelling and order.

    Leads that are not among the 12 standard ones (e.g. Frank leads vx/vy/vz) are dropped; standard leads the record
    lacks are zero rows, marked in the returned mask. A lead given twice is an error (which one to keep is unknown).

    Args:
        signal: (leads, samples) array, one row per entry of `lead_names`.
        lead_names: names of the rows of `signal`.

    Returns:
        `(standard, missing)`: (12, samples) float32 array in standard order, and a (12,) bool mask of the leads
        absent from the record.
    """
    signal = np.asarray(signal)
    if signal.ndim != 2 or signal.shape[0] != len(lead_names):
        raise ECGInputError(
            "bad_shape", f"signal of shape {signal.shape} does not match {len(lead_names)} lead names {list(lead_names)}"
        )
    standard = np.zeros((len(STANDARD_LEAD_NAMES), signal.shape[1]), dtype=np.float32)
    missing = np.ones(len(STANDARD_LEAD_NAMES), dtype=bool)
    for row, name in enumerate(lead_names):
        lead = normalize_lead_name(name)
        if lead is None:
            continue
        index = STANDARD_LEAD_NAMES.index(lead)
        if not missing[index]:
            raise ECGInputError("duplicate_lead", f"lead {lead} appears twice in {list(lead_names)}")
        standard[index] = signal[row]
        missing[index] = False
    return standard, missing


def resample(signal: np.ndarray, sampling_rate: float, target_rate: float) -> np.ndarray:
    """Resample the last axis from `sampling_rate` to `target_rate` Hz with a polyphase filter.

    `resample_poly` needs an integer ratio: non-integer rates (e.g. 257 Hz) are approximated by the closest fraction
    with denominator <= 1000, well under 0.1 % off. `padtype="line"` keeps edge artefacts small on baseline offsets.

    Args:
        signal: (..., samples) array.
        sampling_rate: rate of `signal` in Hz.
        target_rate: wanted rate in Hz.

    Returns:
        (..., round(samples * target_rate / sampling_rate)) float32 array.
    """
    sampling_rate = check_sampling_rate(sampling_rate)
    if sampling_rate == target_rate:
        return np.asarray(signal, dtype=np.float32)
    ratio = Fraction(float(target_rate) / float(sampling_rate)).limit_denominator(1000)
    resampled = _resample_poly()(signal, ratio.numerator, ratio.denominator, axis=-1, padtype="line")
    return resampled.astype(np.float32, copy=False)


def crop_or_pad(signal: np.ndarray, length: int) -> np.ndarray:
    """Keep the first `length` samples of the last axis, or pad the end with zeros up to `length`.

    Args:
        signal: (..., samples) array.
        length: wanted number of samples.

    Returns:
        (..., length) array.
    """
    samples = signal.shape[-1]
    if samples >= length:
        return signal[..., :length]
    padding = [(0, 0)] * (signal.ndim - 1) + [(0, length - samples)]
    return np.pad(signal, padding)


def _nonfinite_runs(row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start indices and lengths of the runs of non-finite values of a 1-D array."""
    bad = np.concatenate(([False], ~np.isfinite(row), [False]))
    edges = np.flatnonzero(np.diff(bad.astype(np.int8)))
    starts, stops = edges[::2], edges[1::2]
    return starts, stops - starts


def fill_nonfinite(signal: np.ndarray, max_gap: int) -> tuple[np.ndarray, np.ndarray]:
    """Linearly interpolate runs of NaN/inf up to `max_gap` samples long in each lead.

    A lead with no finite sample at all is returned as zeros and reported as empty (the caller treats it as a missing
    lead); a longer run anywhere else makes the record unusable.

    Args:
        signal: (leads, samples) array.
        max_gap: longest run of non-finite samples, in samples, that may be interpolated.

    Returns:
        `(filled, empty)`: (leads, samples) float32 array with only finite values, and a (leads,) bool mask of the
        leads that had no finite sample.
    """
    filled = np.array(signal, dtype=np.float32)
    empty = np.zeros(filled.shape[0], dtype=bool)
    if np.isfinite(filled).all():
        return filled, empty
    positions = np.arange(filled.shape[1])
    for index, row in enumerate(filled):
        finite = np.isfinite(row)
        if finite.all():
            continue
        if not finite.any():
            empty[index] = True
            row[:] = 0.0
            continue
        starts, lengths = _nonfinite_runs(row)
        if lengths.max() > max_gap:
            raise ECGInputError(
                "nan_run_too_long",
                f"lead {index} has {lengths.max()} consecutive non-finite samples at sample {starts[lengths.argmax()]}"
                f" (at most {max_gap} are interpolated)",
            )
        row[~finite] = np.interp(positions[~finite], positions[finite], row[finite])
    return filled, empty


def flat_leads(signal: np.ndarray, threshold_mv: float = 0.05) -> np.ndarray:
    """Leads whose peak-to-peak amplitude is under `threshold_mv`: disconnected electrodes or zero-filled leads.

    Even the smallest standard lead of a real ECG shows QRS complexes of a few tenths of a millivolt.

    Args:
        signal: (leads, samples) array in millivolts.
        threshold_mv: peak-to-peak amplitude under which a lead counts as flat.

    Returns:
        (leads,) bool mask.
    """
    return np.ptp(signal, axis=-1) < threshold_mv


@dataclass
class PreparedSignal:
    """A record in the model's input layout.

    Attributes:
        signal: (12, target_rate * seconds) float32 array in millivolts, rows in `STANDARD_LEAD_NAMES` order.
        missing_leads: standard leads the record lacked (zero rows).
        flat_leads: standard leads that are flat after preparation (includes zero-filled missing leads).
        original_seconds: duration of the source record before cropping or padding.
    """

    signal: np.ndarray
    missing_leads: list[str] = field(default_factory=list)
    flat_leads: list[str] = field(default_factory=list)
    original_seconds: float = 0.0


def prepare_signal(
    signal: np.ndarray,
    sampling_rate: float,
    lead_names: Sequence[str],
    target_rate: int = 500,
    seconds: float = 10.0,
    fill_missing_leads: bool = False,
    max_gap_seconds: float = 0.1,
    min_sampling_rate: float = 100.0,
    flat_threshold_mv: float = 0.05,
    min_seconds: float = MIN_SECONDS,
    max_amplitude_mv: float = MAX_AMPLITUDE_MV,
) -> PreparedSignal:
    """Bring one record into the standard layout: 12 leads in standard order, `target_rate` Hz, `seconds` long.

    Steps: match lead names to `STANDARD_LEAD_NAMES`; interpolate short runs of NaN/inf (run before resampling, which
    would smear them); resample; keep the first `seconds` (or zero-pad the end); flag flat leads. Amplitudes are left
    in millivolts: normalisation belongs to the model.

    Args:
        signal: (leads, samples) array in millivolts.
        sampling_rate: rate of `signal` in Hz.
        lead_names: names of the rows of `signal`, in any common spelling.
        target_rate: output rate in Hz.
        seconds: output duration.
        fill_missing_leads: zero-fill standard leads the record lacks instead of rejecting it.
        max_gap_seconds: longest run of non-finite samples that is interpolated; longer runs reject the record.
        min_sampling_rate: records sampled below this rate cannot hold a diagnostic ECG and are rejected.
        flat_threshold_mv: peak-to-peak amplitude under which a lead is flagged flat.
        min_seconds: shorter records are rejected (`too_short`).
        max_amplitude_mv: records with a larger absolute value are rejected (`implausible_amplitude`).

    Returns:
        A [`PreparedSignal`] whose `signal` is (12, round(target_rate * seconds)) float32.

    Raises:
        ECGInputError: with `reason` one of `bad_shape`, `duplicate_lead`, `missing_leads`, `bad_sampling_rate`,
            `sampling_rate_too_low`, `empty_signal`, `too_short`, `nan_run_too_long`, `implausible_amplitude`.
    """
    signal = np.asarray(signal, dtype=np.float32)
    if signal.ndim != 2 or signal.shape[1] == 0:
        raise ECGInputError("empty_signal" if signal.size == 0 else "bad_shape", f"signal of shape {signal.shape}")
    sampling_rate = check_sampling_rate(sampling_rate)
    if sampling_rate < min_sampling_rate:
        raise ECGInputError(
            "sampling_rate_too_low", f"{sampling_rate} Hz is below the minimum of {min_sampling_rate} Hz"
        )
    duration = signal.shape[1] / sampling_rate
    if duration < min_seconds:
        raise ECGInputError("too_short", f"the record has {signal.shape[1]} sample(s), {duration:.3g} s at "
                            f"{sampling_rate:g} Hz; at least {min_seconds:g} s is needed")
    standard, missing = match_leads(signal, lead_names)
    max_gap = max(1, int(round(max_gap_seconds * sampling_rate)))
    standard, empty = fill_nonfinite(standard, max_gap)
    missing |= empty
    if missing.all():
        raise ECGInputError("missing_leads", f"none of the 12 standard leads in {list(lead_names)}")
    if missing.any() and not fill_missing_leads:
        absent = [lead for lead, gone in zip(STANDARD_LEAD_NAMES, missing) if gone]
        raise ECGInputError("missing_leads", f"record lacks {absent} (lead names {list(lead_names)})")
    peak = float(np.abs(standard).max())
    if peak > max_amplitude_mv:
        raise ECGInputError("implausible_amplitude", f"a sample of {peak:.3g} mV: no ECG reaches {max_amplitude_mv:g} mV "
                            "in any unit (inputs must be in millivolts)")
    standard = resample(standard, sampling_rate, target_rate)
    standard = crop_or_pad(standard, int(round(target_rate * seconds)))
    flat = flat_leads(standard, flat_threshold_mv)
    return PreparedSignal(
        signal=np.ascontiguousarray(standard, dtype=np.float32),
        missing_leads=[lead for lead, gone in zip(STANDARD_LEAD_NAMES, missing) if gone],
        flat_leads=[lead for lead, is_flat in zip(STANDARD_LEAD_NAMES, flat) if is_flat],
        original_seconds=signal.shape[1] / float(sampling_rate),
    )


__all__ = [
    "STANDARD_LEAD_NAMES",
    "LEAD_ALIASES",
    "LEAD_ALIAS_NOTES",
    "ECGInputError",
    "MAX_AMPLITUDE_MV",
    "PreparedSignal",
    "check_sampling_rate",
    "normalize_lead_name",
    "lead_alias_notes",
    "match_leads",
    "resample",
    "crop_or_pad",
    "fill_nonfinite",
    "flat_leads",
    "prepare_signal",
]
