"""Heartbeats for the experts: R peaks with neurokit2 on the first usable detection lead, windows around them, and
beat-aligned pooling of a sequence (the median over beats of each point of the window).

Shared by the median-beat expert (the median beat of the signal itself) and the sequence experts (DeepFADE's latent,
openecg's per-sample features), so that all of them align on the same beats. A flat sibling of the model code, so
saved model folders carry it (`trust_remote_code`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from .expert_base import check_record_seconds
from .neurokit_enecg import find_r_peaks, import_neurokit


FLAT_RANGE = 1e-6  # a lead whose peak-to-peak range is below this (or that is not finite) is flat / missing
DEFAULT_DETECTION_LEADS = ("II", "V5", "I")


def flat_leads(record: np.ndarray) -> np.ndarray:
    """(leads, samples) -> (leads,) True where a lead is flat or not finite (a missing lead is zero-filled)."""
    finite = np.isfinite(record).all(axis=1)
    return ~finite | (np.ptp(np.where(finite[:, None], record, 0.0), axis=1) < FLAT_RANGE)


def beats_in_window(peaks: np.ndarray, window: tuple[int, int], length: int) -> np.ndarray:
    """The peaks whose window (`start`, `stop` samples around the peak) lies inside a signal of `length` samples."""
    return peaks[(peaks + window[0] >= 0) & (peaks + window[1] <= length)]


@dataclass
class EnECGBeats:
    """The R peaks of one record (`detect_beats`).

    Attributes:
        lead: the detection lead the peaks come from, or None when no lead gave `min_beats` beats.
        peaks: sample indices of the R peaks on that lead (without a lead: on the one that gave most, maybe none).
        notes: why earlier detection leads were passed over.
    """

    lead: str | None
    peaks: np.ndarray
    notes: list[str] = field(default_factory=list)

    @property
    def rr_mean(self) -> float:
        """Mean RR interval in samples (NaN with fewer than 2 peaks)."""
        return float(np.diff(self.peaks).mean()) if len(self.peaks) >= 2 else math.nan


def detect_beats(nk: Any, record: np.ndarray, leads: Sequence[str], detection_leads: Sequence[str],
                 sampling_rate: float, window: tuple[int, int], min_beats: int,
                 flat: np.ndarray | None = None) -> EnECGBeats:
    """R peaks of a record (leads, samples) from the first of `detection_leads` that is not flat and gives at least
    `min_beats` beats whose `window` fits in the record."""
    flat = flat_leads(record) if flat is None else flat
    notes, tried = [], []
    for lead in detection_leads:
        index = list(leads).index(lead)
        if flat[index]:
            notes.append(f"{lead} is flat or missing")
            continue
        peaks = find_r_peaks(nk, record[index], sampling_rate)[1]
        usable = len(beats_in_window(peaks, window, record.shape[1]))
        if usable >= min_beats:
            return EnECGBeats(lead, peaks, notes)
        tried.append((usable, len(peaks), peaks))
        notes.append(f"{lead} gave {usable} beats (min_beats {min_beats})")
    best = max(tried, key=lambda t: t[:2], default=None)
    return EnECGBeats(None, best[2] if best else np.zeros(0, dtype=np.int64), notes)


def bin_matrix(length: int, edges: np.ndarray) -> np.ndarray:
    """(length, points): the linear map that averages a sequence of `length` steps (step k covering [k, k+1)) over the
    bins between fractional positions `edges` (points + 1). An exact area average: 350 samples into 50 points is the
    mean of every 7; a bin narrower than a step takes the step's value."""
    steps = np.arange(length, dtype=np.float64)[:, None]
    overlap = np.clip(np.minimum(steps + 1, edges[None, 1:]) - np.maximum(steps, edges[None, :-1]), 0.0, None)
    return overlap / np.diff(edges)[None, :]


def window_edges(window_ms: Sequence[float], points: int) -> np.ndarray:
    """Bin edges in ms from the R peak: `points` equal bins over `window_ms`."""
    return np.linspace(float(window_ms[0]), float(window_ms[1]), points + 1)


def edge_names(window_ms: Sequence[float], points: int) -> list[str]:
    """`{t:+d}ms`, the time of each bin's centre from the R peak."""
    edges = window_edges(window_ms, points)
    return [f"{round(t):+d}ms" for t in (edges[:-1] + edges[1:]) / 2]


# The beat-aligned pooling of a sequence expert (`settings["beat_pooling"]`): None, or these keys (defaults filled in).
BEAT_POOLING_DEFAULTS = {"mode": "beside", "window_ms": [-250.0, 450.0], "points": 9, "record_seconds": 10.0,
                         "detection_leads": list(DEFAULT_DETECTION_LEADS), "min_beats": 3}
BEAT_POOLING_MODES = ("beside", "only")


def validate_beat_pooling(expert_config, config) -> None:
    """A sequence expert's `beat_pooling` places its windows in milliseconds: its `record_seconds` must be the
    record's length in the model (`EnECGExpert.validate_config` of the experts that offer it)."""
    settings = expert_config.settings.get("beat_pooling")
    if settings is None:
        return
    check_record_seconds(expert_config, config, {**BEAT_POOLING_DEFAULTS, **settings}["record_seconds"],
                         "beat_pooling.record_seconds", "to place its windows in milliseconds")


class EnECGBeatPooling:
    """Beat-aligned pooling of a sequence expert's output, as an option of its settings (`"beat_pooling": {...}`).

    The R peaks of each record are found on the expert's own input (the first usable of `detection_leads` among the
    leads it reads, else its first lead), and the sequence (batch, leads, channels, steps) is averaged over `points`
    bins of `window_ms` around each peak, then the median over beats is taken for every (lead, channel, point): what
    the median-beat expert does to the signal, done to the expert's features. Output (batch, leads * channels * points
    + 1): the pooled values lead after lead (channels, then points), then `beat_missing` (1.0 when fewer than
    `min_beats` beats fit: the values are then 0), in float32. Differentiable in the sequence (the peaks are fixed
    numbers)."""

    def __init__(self, settings: dict[str, Any], expert_name: str, leads: Sequence[str], input_length: int):
        unknown = set(settings) - set(BEAT_POOLING_DEFAULTS)
        if unknown:
            raise ValueError(f"Expert {expert_name!r}: unknown beat_pooling settings {sorted(unknown)}; known: "
                             f"{sorted(BEAT_POOLING_DEFAULTS)}")
        s = {**BEAT_POOLING_DEFAULTS, **settings}
        if s["mode"] not in BEAT_POOLING_MODES:
            raise ValueError(f"Expert {expert_name!r}: beat_pooling mode must be one of {BEAT_POOLING_MODES}, got "
                             f"{s['mode']!r}")
        start_ms, stop_ms = (float(v) for v in s["window_ms"])
        if not start_ms < 0 < stop_ms:
            raise ValueError(f"Expert {expert_name!r}: beat_pooling window_ms must run from before to after the R "
                             f"peak, got {s['window_ms']}")
        if not isinstance(s["points"], int) or s["points"] < 1:
            raise ValueError(f"Expert {expert_name!r}: beat_pooling points must be a positive integer, got "
                             f"{s['points']!r}")
        self.settings = s
        self._nk = import_neurokit(f"Beat pooling (expert {expert_name!r})")
        self.leads = list(leads)
        self.detection_leads = [lead for lead in s["detection_leads"] if lead in self.leads] or self.leads[:1]
        self.sampling_rate = input_length / float(s["record_seconds"])
        fs = self.sampling_rate
        self.window = (math.floor(start_ms * fs / 1000), math.ceil(stop_ms * fs / 1000))
        self.edges_ms = window_edges(s["window_ms"], s["points"])

    def feature_names(self, channels: Sequence[str]) -> list[str]:
        """`{lead}.{channel}_beat_{t}ms` for every lead, channel and point, then `beat_missing`."""
        times = edge_names(self.settings["window_ms"], self.settings["points"])
        return [f"{lead}.{c}_beat_{t}" for lead in self.leads for c in channels for t in times] + ["beat_missing"]

    def pool(self, inputs: torch.Tensor, sequence: torch.Tensor, samples_per_step: float) -> torch.Tensor:
        """`inputs` (batch, leads, samples), the expert's input (for the R peaks); `sequence` (batch, leads, channels,
        steps), step k covering input samples [k, k + 1) * `samples_per_step` -> (batch, leads * channels * points + 1)."""
        batch, leads, channels, steps = sequence.shape
        points = self.settings["points"]
        records = inputs.detach().to("cpu", torch.float64).numpy()
        rows = []
        for record, features in zip(records, sequence):
            beats = detect_beats(self._nk, record, self.leads, self.detection_leads, self.sampling_rate, self.window,
                                 self.settings["min_beats"])
            fits = beats_in_window(beats.peaks, self.window, record.shape[1]) if beats.lead else beats.peaks[:0]
            if not len(fits):
                rows.append(torch.cat([features.new_zeros(leads * channels * points, dtype=torch.float32),
                                       features.new_ones(1, dtype=torch.float32)]))
                continue
            # Bin edges of every beat, in steps of the sequence: (beats, points + 1).
            edges = (fits[:, None] + self.edges_ms[None, :] * self.sampling_rate / 1000) / samples_per_step
            maps = torch.from_numpy(np.stack([bin_matrix(steps, e) for e in edges])).to(features)  # (beats, steps, points)
            per_beat = torch.einsum("lcs,bsp->blcp", features, maps)
            # As np.median (the mean of the middle two of an even count), in float32: quantile has no bfloat16 kernel.
            median = torch.quantile(per_beat.float(), 0.5, dim=0)
            rows.append(torch.cat([median.flatten(), median.new_zeros(1)]))
        return torch.stack(rows)


__all__ = ["EnECGBeats", "EnECGBeatPooling", "validate_beat_pooling", "detect_beats", "flat_leads", "bin_matrix",
           "beats_in_window", "window_edges", "edge_names", "BEAT_POOLING_DEFAULTS", "FLAT_RANGE"]
