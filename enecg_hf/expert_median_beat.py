"""Median-beat expert: the representative heartbeat of every lead, the 12-lead morphology that cardiologists and the
classic measurement programs read, as a frozen, parameter-free expert.

R peaks are found with `neurokit2` on one lead (lead II by default, another when it is flat or yields too few beats);
every lead is cut into windows around those peaks, the median over beats is the lead's median beat, its baseline is
the flattest stretch of the PR segment, and it is averaged down to a few points per lead. Optionally the classic
per-lead measurements are read off the median beats, delineated with neurokit2. No weights; not differentiable (numpy
on the CPU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from .beats_enecg import beats_in_window, bin_matrix, detect_beats, edge_names, flat_leads, window_edges
from .configuration_enecg import EnECGExpertConfig
from .expert_base import EnECGExpert, check_record_seconds
from .neurokit_enecg import DELINEATION_METHODS, delineator, import_neurokit, quiet_neurokit


if TYPE_CHECKING:
    from .configuration_enecg import EnECGConfig


ISOELECTRIC_MS = 20.0  # the baseline is the mean of the flattest stretch this long inside `baseline_window_ms`
# Wave boundaries read from neurokit2's delineation of each lead's median beat (its names, ours).
WAVE_MARKS = {"p_on": "ECG_P_Onsets", "p_off": "ECG_P_Offsets", "qrs_on": "ECG_R_Onsets", "qrs_off": "ECG_R_Offsets",
              "t_on": "ECG_T_Onsets", "t_off": "ECG_T_Offsets"}
# Per-lead measurements (`measurements: true`): amplitudes in the input's unit (z-scored record units inside the
# model), ST level at J + 60 ms, durations in seconds (QTc by Bazett).
LEAD_MEASUREMENTS = ("p_amp", "q_amp", "r_amp", "s_amp", "t_amp", "st_j60", "p_dur", "pr", "qrs", "qt", "qtc")
# Record measurements: frontal axes as cosine and sine (an angle wraps at +-180 degrees), and the R-wave transition
# zone (the first precordial lead V1..V6 whose QRS is mostly positive: R at least the deepest Q or S; 7: none).
RECORD_MEASUREMENTS = ("p_axis_cos", "p_axis_sin", "qrs_axis_cos", "qrs_axis_sin", "t_axis_cos", "t_axis_sin",
                       "r_transition")
DURATION_RANGES = {"p_dur": (0.02, 0.25), "pr": (0.04, 0.45), "qrs": (0.02, 0.3), "qt": (0.12, 0.8), "qtc": (0.15, 0.9)}
ST_OFFSET_S = 0.06
PRECORDIAL = ("V1", "V2", "V3", "V4", "V5", "V6")
AXIS_WAVES = {"p": ("p_on", "p_off"), "qrs": ("qrs_on", "qrs_off"), "t": ("t_on", "t_off")}


@dataclass
class MedianBeatAnalysis:
    """What the median-beat expert found in one record (`EnECGMedianBeatExpert.analyze`).

    Attributes:
        median_beat: (leads, points) the binned, baseline-corrected median beats; zeros where not measured.
        rr_mean: mean RR interval in seconds on the detection lead (NaN: fewer than 2 R peaks).
        detection_lead: the lead the R peaks come from, or None when no lead gave `min_beats` beats.
        r_peaks: sample indices of the R peaks on that lead.
        beats: how many beats the median is taken over (those whose whole window lies inside the record).
        flat_leads: leads that are flat or not finite (a missing lead is zero-filled, hence flat); their beat is 0.
        reason: why the median beat is missing (all zeros), or None.
        notes: what happened on the way, e.g. why the detection lead is not the first choice.
        waves: with measurements, every lead's wave boundaries (`WAVE_MARKS`) in seconds from the R peak, NaN where
            neurokit2 found none.
        measurements: with measurements, `{lead}.{name}` and record-level values (see `feature_names`), NaN where not
            measured.
    """

    median_beat: np.ndarray
    rr_mean: float
    detection_lead: str | None
    r_peaks: np.ndarray
    beats: int
    flat_leads: list[str]
    reason: str | None
    notes: list[str] = field(default_factory=list)
    waves: dict[str, dict[str, float]] = field(default_factory=dict)
    measurements: dict[str, float] = field(default_factory=dict)


def isoelectric_level(beat: np.ndarray, first: int, last: int, width: int) -> np.ndarray:
    """Per lead of (leads, samples), the mean over the `width` samples between positions `first` and `last` where the
    leads together vary least (the summed peak-to-peak range): the PR segment's isoelectric stretch."""
    first, last = max(first, 0), min(last, beat.shape[1])
    region = beat[:, first:last]
    if region.shape[1] < width or width < 1:
        return np.zeros(len(beat))
    stretches = np.lib.stride_tricks.sliding_window_view(region, width, axis=1)  # (leads, starts, width)
    flattest = int(np.argmin(np.ptp(stretches, axis=2).sum(axis=0)))
    return stretches[:, flattest].mean(axis=1)


class EnECGMedianBeatExpert(EnECGExpert):
    """The per-lead median beat (and optionally the classic measurements read from it) as a frozen EnECG expert.

    Input (batch, leads, input_length) covering `record_seconds` seconds (the sampling rate is
    `input_length / record_seconds`). Per record:

    1. R peaks: `nk.ecg_clean` and neurokit2's detector (`nk.ecg_peaks` without its pandas output) on the first
       usable lead of `detection_leads` (default II, then V5, then I): one that is not flat and gives at least
       `min_beats` beats. The `detected_on_<lead>` columns say which one did.
    2. Every lead cut `window_ms` around each R peak (beats whose window leaves the record are left out); the median
       over beats, minus its baseline (the mean of the flattest 20 ms inside `baseline_window_ms`, the PR segment),
       area-averaged to `points` values: `{lead}.beat_{t}ms`, the time of the point's centre from the R peak.
    3. `rr_mean`: mean RR interval on the detection lead, in seconds.
    4. With `measurements: true`, each lead's median beat over one RR interval is delineated with neurokit2
       (`delineation`), and `LEAD_MEASUREMENTS` per lead and `RECORD_MEASUREMENTS` are read from it.

    Flags (1.0 = true): `{lead}.flat` (flat or not finite, its beat is 0), `rr_mean_missing`, `beat_missing` (no lead
    gave `min_beats` beats: every beat value is 0), `detected_on_<lead>`, and one `<name>_missing` per measurement. A
    value that could not be measured is 0.0 with its flag set: never NaN, never an exception.
    Output (batch, embedding_dim) float32, detached: gradients do not flow through this expert.
    """

    expert_type = "median_beat"
    DIFFERENTIABLE = False
    NOT_DIFFERENTIABLE_REASON = ("R peaks found and median beats taken with neurokit2 and numpy: no gradient flows from "
                                 "its embedding to the input")
    DEFAULT_PRESET = "default"
    PRESETS = {
        "default": {
            "record_seconds": 10.0, "detection_leads": ["II", "V5", "I"], "window_ms": [-250.0, 450.0],
            "points": 50, "baseline_window_ms": [-120.0, -40.0], "min_beats": 3, "measurements": False,
            "delineation": "prominence",
        },
        "tiny": {
            "record_seconds": 10.0, "detection_leads": ["II", "V5", "I"], "window_ms": [-250.0, 450.0],
            "points": 50, "baseline_window_ms": [-120.0, -40.0], "min_beats": 3, "measurements": False,
            "delineation": "prominence",
        },
    }

    @classmethod
    def validate_config(cls, expert_config: EnECGExpertConfig, config: EnECGConfig) -> None:
        """The expert measures time in seconds, so `record_seconds` must be the record's length in the model."""
        settings = cls.resolve_settings(expert_config.settings)
        check_record_seconds(expert_config, config, settings["record_seconds"],
                             purpose="to place its windows in milliseconds")

    def __init__(self, config: EnECGExpertConfig, lead_names: Sequence[str]):
        super().__init__(config, lead_names)
        self._nk = import_neurokit("The median-beat expert")
        s = self.settings
        where = f"Expert {config.name!r} (median_beat)"
        if not float(s["record_seconds"]) > 0:
            raise ValueError(f"{where}: record_seconds must be positive")
        self.sampling_rate = config.input_length / float(s["record_seconds"])
        start_ms, stop_ms = (float(v) for v in s["window_ms"])
        if not start_ms < 0 < stop_ms:
            raise ValueError(f"{where}: window_ms must run from before to after the R peak, got {s['window_ms']}")
        first_ms, last_ms = (float(v) for v in s["baseline_window_ms"])
        if not start_ms <= first_ms < last_ms <= 0:
            raise ValueError(f"{where}: baseline_window_ms must lie before the R peak inside window_ms "
                             f"{s['window_ms']}, got {s['baseline_window_ms']}")
        points = s["points"]
        if not isinstance(points, int) or isinstance(points, bool) or not 1 <= points <= stop_ms - start_ms:
            raise ValueError(f"{where}: points must be an integer from 1 to the window's length in ms, got {points!r}")
        if not isinstance(s["min_beats"], int) or s["min_beats"] < 1:
            raise ValueError(f"{where}: min_beats must be a positive integer, got {s['min_beats']!r}")
        leads = list(config.leads)
        self.detection_leads = [lead for lead in s["detection_leads"] if lead in leads]
        if not self.detection_leads:
            raise ValueError(f"{where}: none of detection_leads {s['detection_leads']} is among the expert's leads "
                             f"{leads}")
        method = s["delineation"]
        if not isinstance(method, str) or method.lower() not in DELINEATION_METHODS:
            raise ValueError(f"{where}: delineation must be one of neurokit2's methods "
                             f"{sorted(set(DELINEATION_METHODS))}, got {method!r}")
        self._delineator = delineator(method)
        fs = self.sampling_rate
        # Window in samples from the R peak (sample k covers [k, k+1)), and the map averaging it into the points.
        self.window = (math.floor(start_ms * fs / 1000), math.ceil(stop_ms * fs / 1000))
        edges = window_edges(s["window_ms"], points) * fs / 1000 - self.window[0]
        self.binning = bin_matrix(self.window[1] - self.window[0], edges)
        self.measured_names = self._measurement_names() if s["measurements"] else []
        self.embedding_dim = len(self.feature_names)

    # ------------------------------------------------------------------------------------------------ names
    def _measurement_names(self) -> list[str]:
        return [f"{lead}.{name}" for lead in self.expert_config.leads for name in LEAD_MEASUREMENTS] + list(
            RECORD_MEASUREMENTS)

    @property
    def feature_names(self) -> list[str]:
        """Names of the embedding's columns: `{lead}.beat_{t:+d}ms` (lead after lead), `rr_mean`, the measurements
        (`II.st_j60`, `qrs_axis_cos`, ...), then the flags (`{lead}.flat`, `rr_mean_missing`, `beat_missing`,
        `detected_on_II`, ..., `II.st_j60_missing`, ...)."""
        leads = self.expert_config.leads
        times = edge_names(self.settings["window_ms"], self.settings["points"])
        beat = [f"{lead}.beat_{t}" for lead in leads for t in times]
        flags = [f"{lead}.flat" for lead in leads] + ["rr_mean_missing", "beat_missing"]
        flags += [f"detected_on_{lead}" for lead in self.detection_leads]
        return [*beat, "rr_mean", *self.measured_names, *flags, *(f"{n}_missing" for n in self.measured_names)]

    # ------------------------------------------------------------------------------------------------ analysis
    def median_beat(self, record: np.ndarray, peaks: np.ndarray, start: int, stop: int) -> tuple[np.ndarray, int]:
        """The median over beats of every lead of (leads, samples) from `start` to `stop` samples around each peak,
        baseline-corrected, (leads, stop - start); and how many beats it took (those whose window fits)."""
        fits = beats_in_window(peaks, (start, stop), record.shape[1])
        if not len(fits):
            return np.zeros((len(record), stop - start)), 0
        beat = np.median(record[:, fits[:, None] + np.arange(start, stop)], axis=1)
        fs = self.sampling_rate
        first, last = (round(ms * fs / 1000) - start for ms in self.settings["baseline_window_ms"])
        return beat - isoelectric_level(beat, first, last, max(1, round(ISOELECTRIC_MS * fs / 1000)))[:, None], len(fits)

    def analyze(self, record: np.ndarray) -> MedianBeatAnalysis:
        """One record (leads, samples) in the expert's leads -> its [`MedianBeatAnalysis`]."""
        leads, s, fs = list(self.expert_config.leads), self.settings, self.sampling_rate
        record = np.asarray(record, dtype=np.float64)
        flat = flat_leads(record)
        record = np.where(flat[:, None], 0.0, record)
        flat_names = [lead for lead, f in zip(leads, flat) if f]
        beats = detect_beats(self._nk, record, leads, self.detection_leads, fs, self.window, s["min_beats"], flat)
        rr = beats.rr_mean / fs
        if beats.lead is None:
            reason = "no detection lead usable: " + "; ".join(beats.notes)
            return MedianBeatAnalysis(np.zeros((len(leads), s["points"])), rr, None, beats.peaks, 0, flat_names,
                                      reason, beats.notes, measurements=dict.fromkeys(self.measured_names, math.nan))
        beat, count = self.median_beat(record, beats.peaks, *self.window)
        binned = np.where(flat[:, None], 0.0, beat @ self.binning)
        analysis = MedianBeatAnalysis(binned, rr, beats.lead, beats.peaks, count, flat_names, None, beats.notes)
        if s["measurements"]:
            self._measure(analysis, record, flat)
        return analysis

    # ------------------------------------------------------------------------------------------------ measurements
    def _measure(self, analysis: MedianBeatAnalysis, record: np.ndarray, flat: np.ndarray) -> None:
        """Delineate every lead's median beat over one RR interval (at most 400 ms before and 700 ms after the R peak)
        and fill `analysis.waves` and `analysis.measurements`."""
        fs, leads = self.sampling_rate, list(self.expert_config.leads)
        values = dict.fromkeys(self.measured_names, math.nan)
        analysis.measurements = values
        rr = float(np.median(np.diff(analysis.r_peaks))) / fs if len(analysis.r_peaks) >= 2 else 1.0
        before = min(0.4 * rr, 0.4)
        start, stop = -round(before * fs), round(min(rr - before, 0.7) * fs)
        beat, beats = self.median_beat(record, analysis.r_peaks, start, stop)
        if beats < self.settings["min_beats"]:
            analysis.notes.append(f"measurements: {beats} beats fit a whole RR interval")
            return
        for i, lead in enumerate(leads):
            if flat[i]:
                continue
            marks = self._delineate_beat(beat[i], -start)
            analysis.waves[lead] = {name: mark / fs for name, mark in marks.items()}
            values.update({f"{lead}.{k}": v for k, v in self._lead_measurements(beat[i], -start, marks,
                                                                                analysis.rr_mean).items()})
        self._record_measurements(values, beat, -start, analysis.waves, leads, flat)

    def _delineate_beat(self, beat: np.ndarray, r: int) -> dict[str, float]:
        """Wave boundaries of one median beat (samples from the R peak at index `r`; NaN where none was found).

        neurokit2's delineators read a sequence of beats: the beat is repeated three times (a perfectly regular
        rhythm of the median beat) and the middle one read. A lead whose QRS is mostly negative (aVR, often V1) is
        turned over first: the delineators look for the R wave as a positive peak."""
        q = max(1, round(0.06 * self.sampling_rate))
        around = beat[max(0, r - q): r + q]
        sign = 1.0 if around.max() >= -around.min() else -1.0
        length = len(beat)
        signal = np.tile(sign * beat, 3)
        rpeaks = np.array([r, r + length, r + 2 * length])
        fs = self.sampling_rate
        with quiet_neurokit():
            try:
                if self._delineator is not None:
                    waves = self._delineator(signal, rpeaks, sampling_rate=fs)
                else:
                    waves = self._nk.ecg_delineate(signal, rpeaks, sampling_rate=fs,
                                                   method=self.settings["delineation"].lower())[1]
            except Exception:  # a beat neurokit2 cannot delineate has no boundaries
                return dict.fromkeys(WAVE_MARKS, math.nan)
        def middle(key: str) -> float:  # the middle beat's mark, in samples from its R peak
            found = list(waves.get(key, []))
            mark = float(found[1]) - length - r if len(found) == 3 and found[1] is not None else math.nan
            return mark if math.isfinite(mark) and -r <= mark < length - r else math.nan

        marks = {name: middle(key) for name, key in WAVE_MARKS.items()}
        with quiet_neurokit():  # scipy warns of troughs with no prominence: they do not count
            self._extend_qrs(signal, length + r, marks, middle("ECG_Q_Peaks"), middle("ECG_S_Peaks"))
        return marks

    def _extend_qrs(self, signal: np.ndarray, r: int, marks: dict[str, float], q_peak: float, s_peak: float) -> None:
        """Move the QRS onset to the start of a Q wave and its offset to the end of an S wave.

        neurokit2's `prominence` method bounds the QRS by the bases of the R wave's prominence, which are the Q and S
        troughs when there are such waves, not the complex's ends (on LUDB: QRS 28 ms too short). The bases of the Q
        and S troughs' own prominence, found the same way (`scipy.signal.peak_prominences`, 100 ms windows), are; a
        trough counts when its prominence is at least a tenth of the R wave's (on 40 LUDB records x 12 leads, the QRS
        onset's MAE went from 19 to 16 ms, the offset's from 24 to 17 ms, and both biases to within 2 ms)."""
        from scipy.signal import peak_prominences

        window = max(3, round(0.1 * self.sampling_rate))
        near = max(1, round(0.02 * self.sampling_rate))
        top = r - near + int(np.argmax(signal[r - near: r + near + 1]))
        threshold = 0.1 * peak_prominences(signal, [top], wlen=window)[0][0]
        for trough, name, side in ((q_peak, "qrs_on", 1), (s_peak, "qrs_off", 2)):
            if not (math.isfinite(trough) and math.isfinite(marks[name])):
                continue
            result = peak_prominences(-signal, [int(trough) + r], wlen=window)
            if result[0][0] >= threshold:
                base = float(result[side][0]) - r
                marks[name] = min(marks[name], base) if side == 1 else max(marks[name], base)

    def _lead_measurements(self, beat: np.ndarray, r: int, marks: dict[str, float], rr_mean: float
                           ) -> dict[str, float]:
        """`LEAD_MEASUREMENTS` of one median beat (R peak at index `r`) from its boundaries `marks`."""
        fs = self.sampling_rate
        at = {name: (int(round(m)) + r if math.isfinite(m) else None) for name, m in marks.items()}
        out = dict.fromkeys(LEAD_MEASUREMENTS, math.nan)

        def extreme(first: int | None, last: int | None) -> float:
            """The signed value of the largest deflection between two boundaries."""
            if first is None or last is None or last <= first:
                return math.nan
            part = beat[first: last + 1]
            return float(part[np.argmax(np.abs(part))])

        out["p_amp"], out["t_amp"] = extreme(at["p_on"], at["p_off"]), extreme(at["t_on"], at["t_off"])
        if at["qrs_on"] is not None and at["qrs_off"] is not None and at["qrs_off"] > at["qrs_on"]:
            qrs = beat[at["qrs_on"]: at["qrs_off"] + 1]
            peak = int(np.argmax(qrs))
            out["r_amp"] = max(float(qrs[peak]), 0.0)
            out["q_amp"] = min(float(qrs[: peak + 1].min()), 0.0)
            out["s_amp"] = min(float(qrs[peak:].min()), 0.0)
            j60 = at["qrs_off"] + round(ST_OFFSET_S * fs)
            if j60 < len(beat):
                out["st_j60"] = float(beat[j60])
        span = lambda a, b: (marks[b] - marks[a]) / fs  # NaN if either is missing
        out.update(p_dur=span("p_on", "p_off"), pr=span("p_on", "qrs_on"), qrs=span("qrs_on", "qrs_off"),
                   qt=span("qrs_on", "t_off"))
        out["qtc"] = out["qt"] / math.sqrt(rr_mean) if math.isfinite(rr_mean) and rr_mean > 0 else math.nan
        for name, (low, high) in DURATION_RANGES.items():
            if not low <= out[name] <= high:  # also False for NaN
                out[name] = math.nan
        return out

    def _record_measurements(self, values: dict[str, float], beat: np.ndarray, r: int,
                             waves: dict[str, dict[str, float]], leads: list[str], flat: np.ndarray) -> None:
        """Frontal P, QRS and T axes (net areas of leads I and aVF between the boundaries' medians over leads) and the
        R-wave transition zone, into `values`."""
        fs = self.sampling_rate
        usable = {lead: i for i, lead in enumerate(leads) if not flat[i]}
        if "I" in usable and "aVF" in usable:
            for wave, (on, off) in AXIS_WAVES.items():
                found = [[w[name] for w in waves.values() if math.isfinite(w[name])] for name in (on, off)]
                if not all(found):
                    continue
                bounds = [float(np.median(marks)) for marks in found]
                first, last = (int(round(b * fs)) + r for b in bounds)
                if last <= first:
                    continue
                x, y = (float(beat[usable[lead], first: last + 1].sum()) for lead in ("I", "aVF"))
                if math.hypot(x, y) > 0:
                    angle = math.atan2(y, x)
                    values[f"{wave}_axis_cos"], values[f"{wave}_axis_sin"] = math.cos(angle), math.sin(angle)
        if "r_transition" in values and all(lead in usable for lead in PRECORDIAL):
            r_amps = [values[f"{lead}.r_amp"] for lead in PRECORDIAL]
            # Q and S are measured together (both NaN when the QRS has no boundaries).
            deepest = [min(values[f"{lead}.q_amp"], values[f"{lead}.s_amp"]) for lead in PRECORDIAL]
            if all(math.isfinite(v) for v in r_amps + deepest):
                values["r_transition"] = float(next(
                    (k + 1 for k, (r_amp, low) in enumerate(zip(r_amps, deepest)) if r_amp >= -low), 7))

    # ------------------------------------------------------------------------------------------------ embedding
    def vector(self, analysis: MedianBeatAnalysis) -> np.ndarray:
        """An analysis as the embedding row (embedding_dim,), in the order of `feature_names`; NaN-free."""
        leads = self.expert_config.leads
        measured = np.array([analysis.measurements.get(n, math.nan) for n in self.measured_names], dtype=np.float64)
        missing = ~np.isfinite(measured)
        rr_missing = not math.isfinite(analysis.rr_mean)
        flags = [float(lead in analysis.flat_leads) for lead in leads]
        flags += [float(rr_missing), float(analysis.detection_lead is None)]
        flags += [float(lead == analysis.detection_lead) for lead in self.detection_leads]
        return np.concatenate([analysis.median_beat.ravel(), [0.0 if rr_missing else analysis.rr_mean],
                               np.where(missing, 0.0, measured), flags, missing.astype(np.float64)])

    def embed(self, inputs: torch.Tensor) -> torch.Tensor:
        """(batch, leads, input_length) -> (batch, embedding_dim), see the class docstring. Not differentiable: the
        input is detached and analysed in numpy, record by record."""
        array = inputs.detach().to("cpu", torch.float64).numpy()
        rows = [self.vector(self.analyze(record)) for record in array]
        return torch.tensor(np.stack(rows), dtype=torch.float32, device=inputs.device)


__all__ = ["EnECGMedianBeatExpert", "MedianBeatAnalysis", "LEAD_MEASUREMENTS", "RECORD_MEASUREMENTS", "WAVE_MARKS"]
