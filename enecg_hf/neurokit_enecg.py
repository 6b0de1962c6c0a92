"""neurokit2 as the experts use it: imported on demand (an optional dependency), silenced one thread at a time, its
R-peak detector without its pandas output, and its wave delineators. The ECG-features and median-beat experts and beat
pooling read R peaks and waves through this module.
"""

from __future__ import annotations

import contextlib
import importlib
import threading
import warnings
from typing import Any

import numpy as np


# neurokit2 warns on degenerate signals; the expert silences that with `warnings.catch_warnings`, which saves and
# restores the process-wide filter list. Two threads inside it at once restore each other's lists, and an "ignore
# everything" filter can outlive both (every later warning of the process is lost). One measurement at a time holds
# the filters; it costs little, as neurokit2's measurements hold the GIL most of the time anyway. Re-entrant: a
# measurement calls `find_r_peaks`, which silences them too (and so do the median-beat expert and beat pooling).
_WARNINGS_LOCK = threading.RLock()


@contextlib.contextmanager
def quiet_neurokit():
    """neurokit2's warnings and numpy's floating-point warnings silenced, one thread at a time (`_WARNINGS_LOCK`)."""
    with _WARNINGS_LOCK, warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        yield


def import_neurokit(expert: str = "The ECG-features expert"):
    try:
        import neurokit2
    except ImportError as err:
        raise ImportError(
            f"{expert} needs neurokit2, an optional dependency: pip install enecg_hf[features] "
            "(or pip install neurokit2)"
        ) from err
    return neurokit2


# neurokit2's wave delineation methods (`nk.ecg_delineate(method=...)`, with its aliases) and the private function
# behind each, which the experts call directly (the features expert's `_delineate`, the median-beat expert).
DELINEATION_METHODS = {
    "dwt": "_dwt_ecg_delineator", "discrete wavelet transform": "_dwt_ecg_delineator",
    "prominence": "_prominence_ecg_delineator", "peak-prominence": "_prominence_ecg_delineator",
    "emrich": "_prominence_ecg_delineator", "emrich2024": "_prominence_ecg_delineator",
    "peak": "_ecg_delineator_peak", "peaks": "_ecg_delineator_peak", "derivative": "_ecg_delineator_peak",
    "gradient": "_ecg_delineator_peak", "cwt": "_ecg_delineator_cwt", "continuous wavelet transform": "_ecg_delineator_cwt",
}


def delineator(method: str):
    """neurokit2's own delineator function for `method`, or None if this neurokit2 has no such private function."""
    try:
        module = importlib.import_module("neurokit2.ecg.ecg_delineate")
    except ImportError:
        return None
    return getattr(module, DELINEATION_METHODS[method.lower()], None)


def check_indices(indices: Any, length: int) -> None:
    """Raise where neurokit2's `signal_formatpeaks` (the pandas output of `ecg_peaks` / `ecg_delineate`, which the
    expert skips) would raise: an index at or past the end of the signal, or a negative one."""
    for index in indices:
        if not 0 <= index < length:
            raise IndexError(f"index {index} outside a signal of {length} samples")


def find_r_peaks(nk: Any, signal: np.ndarray, sampling_rate: float) -> tuple[np.ndarray | None, np.ndarray]:
    """`nk.ecg_peaks` without its pandas output: `nk.ecg_clean`, then neurokit2's detector and its output's index
    check. Returns the cleaned signal and the R peaks (samples); `(None, no peaks)` when neurokit2 cannot process the
    signal (it raises on degenerate signals in many ways; all mean "not measured")."""
    with quiet_neurokit():
        try:
            cleaned = nk.ecg_clean(signal, sampling_rate=sampling_rate)
            found = nk.ecg_findpeaks(cleaned, sampling_rate=sampling_rate, method="neurokit")["ECG_R_Peaks"]
            check_indices(found, cleaned.size)
        except Exception:
            return None, np.zeros(0, dtype=np.int64)
    return cleaned, np.asarray(found, dtype=np.int64)


__all__ = ["DELINEATION_METHODS", "check_indices", "delineator", "find_r_peaks", "import_neurokit", "quiet_neurokit"]
