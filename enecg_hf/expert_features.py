"""ECG-features expert: interpretable measurements (RR, heart rate, PR, QRS, QT, QTc) from R-peak detection and wave
delineation with `neurokit2`, plus a flag for every value that could not be measured.

It has no weights and is not differentiable: the measurements run in numpy on the CPU. It gives the gate a physiology
expert next to the foundation models (RR interval is directly measurable from R peaks).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from .configuration_enecg import EnECGExpertConfig
from .expert_base import EnECGExpert, check_record_seconds
from .neurokit_enecg import (
    DELINEATION_METHODS, check_indices, delineator, find_r_peaks, import_neurokit, quiet_neurokit,
)


if TYPE_CHECKING:
    from .configuration_enecg import EnECGConfig


# Per lead, in this order: values in seconds (heart rate in beats per minute / 100), so all are of order 0.1-2.
FEATURE_NAMES = ("rr_mean", "rr_std", "heart_rate", "pr", "qrs", "qt", "qtc")
# Plausible ranges (same units); a measurement outside its range counts as not measured.
FEATURE_RANGES = {
    "rr_mean": (0.2, 3.0), "rr_std": (0.0, 1.5), "heart_rate": (0.2, 3.0), "pr": (0.04, 0.45),
    "qrs": (0.02, 0.3), "qt": (0.12, 0.8), "qtc": (0.15, 0.9),
}
MIN_SECONDS = 2.0  # shorter signals are not analysed: every value is flagged missing
def _median_duration(waves: dict[str, Any], start: str, end: str, sampling_rate: float) -> float:
    """Median over beats of (end - start) in seconds, ignoring beats where either mark is missing; NaN if none."""
    a = np.asarray(waves.get(start, []), dtype=float)
    b = np.asarray(waves.get(end, []), dtype=float)
    if a.size == 0 or a.size != b.size:
        return math.nan
    durations = (b - a) / sampling_rate
    durations = durations[np.isfinite(durations) & (durations > 0)]
    return float(np.median(durations)) if durations.size else math.nan


class EnECGFeaturesExpert(EnECGExpert):
    """Interpretable ECG measurements as a frozen EnECG expert (no learnable weights, not differentiable).

    Input (batch, leads, input_length) covering `record_seconds` seconds (the sampling rate is
    `input_length / record_seconds`; 10 s records at 500 Hz need `input_length` 5000, or 2500 at 250 Hz). For each lead
    (default lead II): `nk.ecg_clean`, R peaks as `nk.ecg_peaks` finds them, P/QRS/T onsets and offsets as
    `nk.ecg_delineate(method=settings["delineation"])` finds them (both without their pandas output).
    Output per lead: the 7 values of `FEATURE_NAMES` (mean and standard deviation of RR in s, heart rate in bpm / 100,
    median PR, QRS, QT in s, QTc by Bazett in s), then 7 flags, 1.0 where the value could not be measured (its value is
    then 0.0). Flat, noisy, non-finite or short (< 2 s) signals give flagged values, never an exception.
    Output (batch, leads * 14), detached: gradients do not flow through this expert.
    """

    expert_type = "features"
    DIFFERENTIABLE = False
    NOT_DIFFERENTIABLE_REASON = "measured with neurokit2 in numpy: no gradient flows from its embedding to the input"
    DEFAULT_PRESET = "default"
    # Every preset keeps `dwt`: saved folders store `{"preset": ...}`, not these values, so a change here would change
    # what they compute. `"delineation": "prominence"` is more accurate on LUDB intervals (docs/experts.md).
    PRESETS = {
        "default": {"record_seconds": 10.0, "delineation": "dwt"},
        "tiny": {"record_seconds": 10.0, "delineation": "dwt"},
    }

    @classmethod
    def validate_config(cls, expert_config: EnECGExpertConfig, config: EnECGConfig) -> None:
        """The expert measures intervals in seconds, so `record_seconds` must be the record's length in the model."""
        settings = cls.resolve_settings(expert_config.settings)
        check_record_seconds(expert_config, config, settings["record_seconds"], purpose="to measure intervals in seconds")

    def __init__(self, config: EnECGExpertConfig, lead_names: Sequence[str]):
        super().__init__(config, lead_names)
        self._nk = import_neurokit()
        if not float(self.settings["record_seconds"]) > 0:
            raise ValueError(f"Expert {config.name!r}: record_seconds must be positive")
        method = self.settings["delineation"]
        if not isinstance(method, str) or method.lower() not in DELINEATION_METHODS:
            raise ValueError(
                f"Expert {config.name!r}: delineation must be one of neurokit2's methods "
                f"{sorted(set(DELINEATION_METHODS))}, got {method!r}"
            )
        self._delineator = delineator(method)
        self.sampling_rate = config.input_length / float(self.settings["record_seconds"])
        self.embedding_dim = self.num_leads * 2 * len(FEATURE_NAMES)

    @property
    def feature_names(self) -> list[str]:
        """Names of the embedding's columns, e.g. `II.rr_mean`, ..., `II.rr_mean_missing`, ..."""
        per_lead = list(FEATURE_NAMES) + [f"{name}_missing" for name in FEATURE_NAMES]
        return [f"{lead}.{name}" for lead in self.expert_config.leads for name in per_lead]

    @property
    def missing_indicators(self) -> list[tuple[int, int]]:
        """Each value's column and its `_missing` flag's column, per lead (a missing value is stored as 0.0)."""
        per_lead, count = 2 * len(FEATURE_NAMES), len(FEATURE_NAMES)
        return [(lead * per_lead + i, lead * per_lead + count + i) for lead in range(self.num_leads) for i in range(count)]

    def measure(self, signal: np.ndarray) -> dict[str, float]:
        """One lead (samples,) -> {feature name: value in the units above, NaN if not measured}."""
        values = dict.fromkeys(FEATURE_NAMES, math.nan)
        fs = self.sampling_rate
        if signal.size < MIN_SECONDS * fs or not np.all(np.isfinite(signal)) or np.ptp(signal) < 1e-6:
            return values
        nk = self._nk
        with quiet_neurokit():
            cleaned, found = find_r_peaks(nk, signal, fs)
            if cleaned is None:
                return values
            peaks = found.astype(float)
            if peaks.size >= 2:
                rr = np.diff(peaks) / fs
                values["rr_mean"] = float(rr.mean())
                values["heart_rate"] = 60.0 / values["rr_mean"] / 100.0
                if rr.size >= 2:
                    values["rr_std"] = float(rr.std())
            if peaks.size >= 3:
                try:
                    waves = self._delineate(cleaned, peaks.astype(int))
                except Exception:
                    waves = {}
                values["pr"] = _median_duration(waves, "ECG_P_Onsets", "ECG_R_Onsets", fs)
                values["qrs"] = _median_duration(waves, "ECG_R_Onsets", "ECG_R_Offsets", fs)
                values["qt"] = _median_duration(waves, "ECG_R_Onsets", "ECG_T_Offsets", fs)
        if math.isfinite(values["qt"]) and math.isfinite(values["rr_mean"]):
            values["qtc"] = values["qt"] / math.sqrt(values["rr_mean"])  # Bazett, RR in seconds
        for name, (low, high) in FEATURE_RANGES.items():
            if not low <= values[name] <= high:  # also False for NaN
                values[name] = math.nan
        return values

    def _delineate(self, cleaned: np.ndarray, rpeaks: np.ndarray) -> dict[str, list]:
        """What `nk.ecg_delineate(cleaned, rpeaks, sampling_rate, method)` returns as its `waves`, exactly, without the
        per-sample pandas DataFrame it also builds (its `signals`: half of the expert's time with `prominence`).

        Runs neurokit2's delineator for the method, then `ecg_delineate`'s own post-processing: the last mark of a wave
        at or past the signal's end becomes NaN, an index that `signal_formatpeaks` would reject raises as it would,
        and marks at sample 0 or below are dropped. Falls back to `nk.ecg_delineate` if the private function is gone.
        """
        fs, method = self.sampling_rate, self.settings["delineation"].lower()
        if self._delineator is None:
            return self._nk.ecg_delineate(cleaned, rpeaks, sampling_rate=fs, method=method)[1]
        waves = self._delineator(cleaned, rpeaks, sampling_rate=fs)
        for value in waves.values():
            if value[-1] >= len(cleaned):
                value[-1] = np.nan
        for value in waves.values():
            check_indices([int(x) for x in value if ~np.isnan(x) and x > 0], len(cleaned))
        return {name: [x for x in value if x > 0 or np.isnan(x)] for name, value in waves.items()}

    def embed(self, inputs: torch.Tensor) -> torch.Tensor:
        """(batch, leads, input_length) -> (batch, leads * 14): values then missing flags per lead. Not differentiable:
        the input is detached and measured in numpy."""
        array = inputs.detach().to("cpu", torch.float64).numpy()
        rows = []
        for record in array:
            row = []
            for signal in record:
                values = self.measure(signal)
                measured = np.array([values[name] for name in FEATURE_NAMES])
                missing = ~np.isfinite(measured)
                row.append(np.concatenate([np.where(missing, 0.0, measured), missing.astype(float)]))
            rows.append(np.concatenate(row))
        return torch.tensor(np.stack(rows), dtype=torch.float32, device=inputs.device)


__all__ = ["EnECGFeaturesExpert", "FEATURE_NAMES"]
