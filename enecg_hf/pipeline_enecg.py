"""A `transformers` pipeline for EnECG models: ECG records in, predictions with each expert's gate weight out.

    from transformers import pipeline
    ecg = pipeline(model="outputs/enecg-tiny-rr_interval", trust_remote_code=True)   # no task name needed
    ecg("ludb/data/1")                                        # a WFDB record (with or without .hea)
    ecg(signal, sampling_rate=250, lead_names=[...])          # a (leads, samples) array or nested list in mV
    ecg(["a.hea", "b.mat", "c.npy"], sampling_rate=500)       # several records, results in order
    ecg(records, batch_size=8)                                # ... through the model 8 at a time
    ecg(open("d.npy", "rb").read(), sampling_rate=500)        # the bytes of a .npy file
    ecg("holter/100", window_seconds=10)                      # a long record, window by window (hop_seconds=,
                                                              # max_windows=): one result per window and a summary

Model folders carry this file (flat, next to the model code) and name it in `config.json` under
`custom_pipelines`, so the pipeline loads with `trust_remote_code=True` where `enecg_hf` is not installed. Records go
through the same steps as the training data (`preprocessing_enecg.prepare_signal`: lead matching, interpolation of
short NaN runs, resampling, crop/pad); the model normalises amplitudes itself. Files are checked against
`io_enecg.RecordLimits` (`config.max_input_seconds`, 10 kHz) from their headers before any sample is read.

Records longer than `config.max_input_seconds` are predicted window by window (`window_seconds`, as the speech
pipeline's `chunk_length_s`): a `ChunkPipeline` whose `preprocess` yields one model input per window, reading each
window of a WFDB `.dat` record from disk when it is needed, so memory stays bounded by one batch of windows
(`batch_size`) whatever the record's length; `postprocess` gathers a record's windows into one result.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from transformers.pipelines.base import ChunkPipeline

from .io_enecg import ECGRecordReader, RecordLimits, open_record, read_npy
from .preprocessing_enecg import (MIN_SECONDS, STANDARD_LEAD_NAMES, ECGInputError, check_sampling_rate,
                                  lead_alias_notes, normalize_lead_name, prepare_signal)


logger = logging.getLogger(__name__)


PIPELINE_TASK = "ecg-analysis"
MIN_SAMPLING_RATE = 100.0  # Hz; below this a diagnostic ECG cannot be represented (as in the dataset builders)
MAX_SAMPLING_RATE = 10_000.0  # Hz; ECG devices record at 100-2000 Hz, anything far above is a unit mistake
LARGE_AMPLITUDE_MV = 20.0  # peak-to-peak; real ECG leads stay under ~10 mV, so this suggests microvolts
WINDOW_ADVICE = ("Pass window_seconds to predict window by window (the pipeline's window_seconds=10, "
                 "`enecg predict --window-seconds 10`, the endpoint's parameters.window_seconds)")


def pipeline_entry() -> dict:
    """The `custom_pipelines` entry of `config.json` that makes `pipeline(model=folder)` find this pipeline."""
    return {PIPELINE_TASK: {"impl": "pipeline_enecg.EnECGPipeline", "pt": ["AutoModel"], "type": "multimodal"}}


def record_limits(config) -> RecordLimits:
    """The size limits of inputs to a model with `config`: `config.max_input_seconds`, up to `MAX_SAMPLING_RATE`."""
    return RecordLimits(max_seconds=float(config.max_input_seconds), max_sampling_rate=MAX_SAMPLING_RATE,
                        too_long_advice=WINDOW_ADVICE)


@dataclass
class PreparedRecord:
    """One input in the model's layout.

    Attributes:
        signal: (leads, input_length) float32 array in mV, rows in `config.lead_names` order.
        source: the file the record came from, or `"array"`.
        warnings: things the caller should know (cropped, padded, flat leads, dropped non-standard leads...).
        missing_leads: standard leads the input lacked (zero-filled).
        flat_leads: standard leads that are flat after preparation (zero-filled ones included).
    """

    signal: np.ndarray
    source: str = "array"
    warnings: list[str] = field(default_factory=list)
    missing_leads: list[str] = field(default_factory=list)
    flat_leads: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class WindowPlan:
    """How a long record is cut into windows: `seconds` long, starting every `hop_seconds`, at most `max_windows`.

    Windows lie wholly inside the record; a tail shorter than a window is left out (and reported). A record shorter
    than one window is one window (zero-padded to the model's input, as without windows)."""

    seconds: float
    hop_seconds: float
    max_windows: int | None = None

    def spans(self, num_samples: int, sampling_rate: float) -> tuple[range, int, list[str]]:
        """(start samples of the windows, samples per window, notes on what the windows leave out)."""
        size = max(1, round(self.seconds * sampling_rate))
        hop = max(1, round(self.hop_seconds * sampling_rate))
        if num_samples <= size:
            return range(0, 1), num_samples, []
        starts = range(0, num_samples - size + 1, hop)
        notes = []
        if self.max_windows is not None and len(starts) > self.max_windows:
            starts = starts[: self.max_windows]
            notes.append(f"max_windows={self.max_windows}: only the first {self.max_windows} of the record's windows "
                         f"were predicted (up to {(starts[-1] + size) / sampling_rate:.1f} s of "
                         f"{num_samples / sampling_rate:.1f} s)")
        else:
            tail = num_samples - (starts[-1] + size)
            if tail > 0:
                notes.append(f"the last {tail / sampling_rate:.1f} s of the record do not fill a {self.seconds:g} s "
                             "window and were not predicted")
        return starts, size, notes


@dataclass(frozen=True)
class WindowedRecord:
    """What the windows of one record share; handed along with each window (as one object, never copied) to
    `postprocess`, which gathers them into the record's result."""

    source: str
    warnings: list[str]
    plan: WindowPlan


@dataclass(frozen=True)
class Window:
    """One window of a [`WindowedRecord`]: its start, and why it was skipped (`(reason, detail)`), if it was."""

    record: WindowedRecord
    start_seconds: float
    skipped: tuple[str, str] | None = None


def _is_signal_matrix(value: Any) -> bool:
    """A nested list that is ONE record (leads x samples of numbers), not a batch of inputs."""
    return (
        isinstance(value, (list, tuple))
        and len(value) > 0
        and isinstance(value[0], (list, tuple))
        and len(value[0]) > 0
        and isinstance(value[0][0], (int, float))
    )


def _check_lead_names(lead_names: Any) -> list[str]:
    if isinstance(lead_names, np.ndarray):
        lead_names = lead_names.tolist()
    if not isinstance(lead_names, (list, tuple)) or not all(isinstance(name, str) for name in lead_names):
        raise ECGInputError("bad_lead_names", f"lead_names must be a list of strings, got {str(lead_names)[:100]}")
    names = list(lead_names)
    unknown = [name for name in names if normalize_lead_name(name) is None]
    if unknown:
        raise ECGInputError(
            "unknown_lead", f"unknown lead name(s) {unknown}; expected names of the 12 standard leads "
            f"{list(STANDARD_LEAD_NAMES)} in any common spelling"
        )
    return names


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ECGInputError("bad_parameters", f"{name} must be true or false, got {value!r}")
    return bool(value)


def _check_seconds(name: str, value: Any, low: float, high: float) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ECGInputError("bad_parameters", f"{name} must be a number of seconds, got {value!r}"[:200])
    try:
        seconds = float(value)
    except OverflowError:  # an int too large for a float
        seconds = math.inf
    if not (math.isfinite(seconds) and low <= seconds <= high):
        allowed = f"at least {low:g} s" if high == math.inf else f"between {low:g} and {high:g} s"
        raise ECGInputError("bad_parameters", f"{name} must be {allowed}, got {value!r}"[:200])
    return seconds


def window_plan(config, window_seconds: Any = None, hop_seconds: Any = None,
                max_windows: Any = None) -> WindowPlan | None:
    """The [`WindowPlan`] of a call's `window_seconds`, `hop_seconds` (default: `window_seconds`, windows side by
    side) and `max_windows` (default: all), checked for a model with `config`; `None` without `window_seconds`.

    Raises:
        ECGInputError: `bad_parameters` for a window outside 1 s to `config.max_input_seconds`, a hop that is not a
            positive number of seconds, a `max_windows` that is not a positive integer, or hop or max without a window.
    """
    if window_seconds is None:
        if hop_seconds is not None or max_windows is not None:
            raise ECGInputError("bad_parameters", "hop_seconds and max_windows apply to windowed prediction: pass "
                                "window_seconds too")
        return None
    seconds = _check_seconds("window_seconds", window_seconds, MIN_SECONDS, float(config.max_input_seconds))
    hop = seconds if hop_seconds is None else _check_seconds("hop_seconds", hop_seconds, 1e-3, math.inf)
    if max_windows is not None and (isinstance(max_windows, (bool, np.bool_))
                                    or not isinstance(max_windows, (int, np.integer)) or max_windows < 1):
        raise ECGInputError("bad_parameters", f"max_windows must be a positive integer, got {max_windows!r}"[:200])
    return WindowPlan(seconds, hop, None if max_windows is None else int(max_windows))


def open_input(record: Any, config, sampling_rate: float | None = None, lead_names: Sequence[str] | None = None,
               lazy: bool = False) -> tuple[ECGRecordReader, str]:
    """Open one pipeline input for a model with `config`: read and check what describes the record as a whole (its
    rate, lead names and size), leaving its samples to be read whole or window by window.

    Args:
        record: see [`prepare_record`].
        sampling_rate: rate in Hz of arrays, `.npy` and `.csv` inputs (WFDB headers carry their own).
        lead_names: names of the rows, in order (default: the WFDB header's names, the CSV header row, or the 12
            standard leads for arrays).
        lazy: for windowed prediction: WFDB `.dat` records are read window by window from disk, and no record length
            limit applies (files loaded whole, `.mat`/`.npy`/`.csv`, keep the 2**24-value limit).

    Returns:
        (the record's reader, its source: the file, `".npy bytes"` or `"array"`).
    """
    limits = record_limits(config)
    if lazy:
        limits = dataclasses.replace(limits, max_seconds=math.inf)
    source = "array"
    if isinstance(record, dict):
        unknown_keys = set(record) - {"signal", "sampling_rate", "lead_names"}
        if "signal" not in record or unknown_keys:
            raise ECGInputError("bad_input", f"a dict input needs 'signal' (and 'sampling_rate', 'lead_names'); "
                                f"got keys {sorted(record)}")
        sampling_rate = record.get("sampling_rate", sampling_rate)
        lead_names = record.get("lead_names", lead_names)
        record = record["signal"]
    if lead_names is not None:
        lead_names = _check_lead_names(lead_names)
    if sampling_rate is not None:
        sampling_rate = check_sampling_rate(sampling_rate, MAX_SAMPLING_RATE)
    if isinstance(record, (str, os.PathLike)):
        source = str(record)
        try:
            reader = open_record(record, sampling_rate=sampling_rate, lead_names=lead_names, limits=limits, lazy=lazy)
        except ECGInputError as error:
            raise ECGInputError(error.reason, f"{source} is not a readable ECG record: {error.detail}") from error
        if not any(normalize_lead_name(name) for name in reader.lead_names):
            raise ECGInputError("unknown_lead", f"{source}: none of its lead names {reader.lead_names} is a standard "
                                "lead (I, II, III, aVR, aVL, aVF, V1-V6 in any common spelling, or MLII, D2, C1...). "
                                "Name its rows in order with lead_names (enecg predict --lead-names II,V5; a record "
                                "that lacks standard leads also needs fill_missing_leads, --fill-missing-leads)")
    else:
        if isinstance(record, (bytes, bytearray, memoryview)):
            source = ".npy bytes"
            record = read_npy(io.BytesIO(record), limits, source)
        try:
            signal = np.asarray(record, dtype=np.float32)
        except (TypeError, ValueError, OverflowError) as error:
            raise ECGInputError("bad_input", f"cannot read the input as a numeric (leads, samples) array: {error}")
        if sampling_rate is None:
            raise ECGInputError("bad_sampling_rate", "arrays carry no sampling rate: pass `sampling_rate` (Hz)")
        names = list(lead_names) if lead_names is not None else list(STANDARD_LEAD_NAMES)
        if signal.ndim != 2:
            raise ECGInputError("bad_shape", f"expected a 2-D (leads, samples) array, got shape {signal.shape}")
        if signal.shape[0] != len(names) and signal.shape[1] == len(names):
            signal = signal.T  # (samples, leads), as CSV exports often are
        if signal.shape[0] != len(names):
            raise ECGInputError("bad_shape", f"signal of shape {signal.shape} has {signal.shape[0]} rows but "
                                f"{len(names)} lead names {names}; pass `lead_names` for the rows")
        reader = ECGRecordReader.from_signal(signal, sampling_rate, names)
    rate = check_sampling_rate(reader.sampling_rate, MAX_SAMPLING_RATE)
    if rate < MIN_SAMPLING_RATE:
        raise ECGInputError("bad_sampling_rate", f"sampling rate {rate:g} Hz is not plausible for an ECG "
                            f"(expected {MIN_SAMPLING_RATE:g}-{MAX_SAMPLING_RATE:g} Hz)")
    if reader.num_samples == 0 or not reader.lead_names:
        raise ECGInputError("empty_signal", f"the signal of {len(reader.lead_names)} leads x {reader.num_samples} "
                            "samples holds no samples")
    if not lazy:
        limits.check(len(reader.lead_names), reader.num_samples, rate, "the record")
    return reader, source


def lead_name_warnings(lead_names: Sequence[str]) -> list[str]:
    """What the caller should know about a record's lead names: names of other conventions read as standard leads
    (`MLII` -> II, with why) and non-standard leads left out. Logged too."""
    warnings = lead_alias_notes(lead_names)
    dropped = [name for name in lead_names if normalize_lead_name(name) is None]
    if dropped:
        warnings.append(f"non-standard leads ignored: {dropped}")
    for warning in warnings:
        logger.info(warning)
    return warnings


def _missing_leads_warning(missing: Sequence[str]) -> str:
    return f"missing leads zero-filled: {list(missing)}"


def prepare_input(signal: np.ndarray, sampling_rate: float, lead_names: Sequence[str], config,
                  fill_missing_leads: bool = False, length_warnings: bool = True) -> PreparedRecord:
    """A (leads, samples) array in mV (a record or one window of it) in the model's layout, with the warnings its
    samples call for (NaN interpolated, missing and flat leads, cropped or padded, microvolts?).

    Args:
        length_warnings: warn when the input is cropped or padded to the model's length (windowed prediction says
            it once for all windows).

    Raises:
        ECGInputError: `not_finite` (no finite sample), and whatever `prepare_signal` refuses.
    """
    finite = np.isfinite(signal)
    if not finite.any():
        raise ECGInputError("not_finite", f"the signal {signal.shape} holds no finite values (all NaN/inf)")
    target_seconds = config.input_length / config.sampling_rate
    prepared = prepare_signal(signal, sampling_rate, lead_names, target_rate=config.sampling_rate,
                              seconds=target_seconds, fill_missing_leads=fill_missing_leads)
    warnings = []
    if not finite.all():
        warnings.append(f"{int((~finite).sum())} NaN/inf samples interpolated")
    if prepared.missing_leads:
        warnings.append(_missing_leads_warning(prepared.missing_leads))
    flat = [lead for lead in prepared.flat_leads if lead not in prepared.missing_leads]
    if flat:
        warnings.append(f"flat leads: {flat}")
    if length_warnings and prepared.original_seconds > target_seconds + 1e-6:
        warnings.append(f"record of {prepared.original_seconds:.1f} s: only its first {target_seconds:g} s were used")
    elif length_warnings and prepared.original_seconds < target_seconds - 1e-6:
        warnings.append(f"record of {prepared.original_seconds:.1f} s zero-padded to {target_seconds:g} s")
    peak_to_peak = float(np.ptp(prepared.signal, axis=1).max())
    if peak_to_peak > LARGE_AMPLITUDE_MV:
        warnings.append(f"peak-to-peak amplitude {peak_to_peak:.0f} mV: inputs must be in millivolts (microvolts?)")
    order = [STANDARD_LEAD_NAMES.index(normalize_lead_name(lead)) for lead in config.lead_names]
    return PreparedRecord(np.ascontiguousarray(prepared.signal[order]), warnings=warnings,
                          missing_leads=prepared.missing_leads, flat_leads=prepared.flat_leads)


def prepare_record(
    record: Any,
    config,
    sampling_rate: float | None = None,
    lead_names: Sequence[str] | None = None,
    fill_missing_leads: bool = False,
) -> PreparedRecord:
    """Read and prepare one pipeline input for a model with `config` (an `EnECGConfig`).

    Args:
        record: a path (WFDB record with or without `.hea`, Challenge `.mat`/`.hea`, `.npy`, `.csv`), the bytes of a
            `.npy` file, a (leads, samples) numpy array or nested list in mV, or a dict `{"signal", "sampling_rate",
            "lead_names"}`.
        sampling_rate: rate in Hz of arrays, `.npy` and `.csv` inputs (WFDB headers carry their own).
        lead_names: names of the rows, in order: of arrays, `.npy` and `.csv` inputs (default: the 12 standard leads
            in order, or the CSV header), and of WFDB records (replacing the header's names).
        fill_missing_leads: zero-fill standard leads the record lacks instead of rejecting it.

    Raises:
        ValueError: ([`ECGInputError`] with a `reason`) for anything that is not a usable ECG: wrong shape, too few or
            unknown leads, long NaN runs, an absurd sampling rate or amplitude, a record longer than
            `config.max_input_seconds` (for files: found from the header, before reading samples), a file that is not
            an ECG record.
    """
    fill_missing_leads = _check_bool("fill_missing_leads", fill_missing_leads)
    reader, source = open_input(record, config, sampling_rate, lead_names)
    prepared = prepare_input(reader.read(), reader.sampling_rate, reader.lead_names, config, fill_missing_leads)
    prepared.source = source
    prepared.warnings = [*reader.warnings, *lead_name_warnings(reader.lead_names), *prepared.warnings]
    return prepared


def _scores(task, logits: torch.Tensor) -> torch.Tensor:
    """What a task's logits (last axis: its outputs) say: the value (regression) or class probabilities (softmax;
    sigmoid for multi-label)."""
    if task.is_regression:
        return logits
    return torch.sigmoid(logits) if task.problem_type == "multi_label_classification" else torch.softmax(logits, -1)


def _task_values(task, scores: torch.Tensor, top_k: int | None = None) -> dict[str, Any]:
    """A task's prediction from its (num_labels,) scores: `{"label", "value", "unit"}` (the label's name) for
    regression, `{"label", "score", "scores": [{"label", "score"}, ... top_k]}` for classification."""
    if task.is_regression:
        return {"label": task.label_name, "value": float(scores[0]), "unit": task.label_unit}
    id2label = {int(k): v for k, v in task.id2label.items()}
    k = len(id2label) if top_k is None else max(1, min(int(top_k), len(id2label)))
    ranked = torch.argsort(scores, descending=True)[:k].tolist()
    return {"label": id2label[ranked[0]], "score": float(scores[ranked[0]]),
            "scores": [{"label": id2label[i], "score": float(scores[i])} for i in ranked]}


class EnECGPipeline(ChunkPipeline):
    """Predictions of an EnECG model for ECG records (see the module docstring for the inputs).

    Each result is a dict: for regression `{"value", "unit", "label"}` (the label's name); for classification
    `{"label", "score", "scores": [{"label", "score"}, ... top_k]}`; always `"gate_weights"` `{expert: weight}`,
    `"expert_predictions"` (each expert head's own value, or its top class and score), `"warnings"` and `"source"`.
    A model with several tasks gives one such prediction per task under `"tasks"` (`{task: {"label", "value",
    "unit", "gate_weights", "expert_predictions", ...}}`), beside the record's `"warnings"` and `"source"`.

    With `window_seconds` (and `hop_seconds`, `max_windows`), the result of a record is `{"windows": [...],
    "summary": {task: ...}, "window_seconds", "hop_seconds", "warnings", "source"}`: each window is
    `{"start_seconds", ...}` with the prediction a record gets (and its own `"warnings"`, if any), or `{"start_seconds",
    "skipped": {"reason", "detail"}}` for a window that cannot be used (flat, NaN, ...); the summary gives per task the
    median value (regression) or the mean class probabilities and their argmax class (classification), with
    `windows_used`, `windows_skipped` and `skipped_reasons` (a count per reason).
    """

    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False

    def __call__(self, inputs, **kwargs):
        if _is_signal_matrix(inputs):  # a nested list is one record, not a batch of rows
            inputs = np.asarray(inputs, dtype=np.float32)
        if isinstance(inputs, (list, tuple)) and len(inputs) == 0:
            raise ECGInputError("bad_input", "no records given")
        return super().__call__(inputs, **kwargs)

    def _sanitize_parameters(self, sampling_rate=None, lead_names=None, fill_missing_leads=None, top_k=None,
                             window_seconds=None, hop_seconds=None, max_windows=None, **kwargs):
        if kwargs:
            raise TypeError(f"EnECGPipeline got unknown arguments {sorted(kwargs)}")
        preprocess = {}
        if sampling_rate is not None:
            preprocess["sampling_rate"] = check_sampling_rate(sampling_rate, MAX_SAMPLING_RATE)
        if lead_names is not None:
            preprocess["lead_names"] = _check_lead_names(lead_names)
        if fill_missing_leads is not None:
            preprocess["fill_missing_leads"] = _check_bool("fill_missing_leads", fill_missing_leads)
        plan = window_plan(self.model.config, window_seconds, hop_seconds, max_windows)
        if plan is not None:
            preprocess["window"] = plan
        if top_k is not None and (isinstance(top_k, (bool, np.bool_)) or not isinstance(top_k, (int, np.integer))
                                  or top_k < 1):
            raise ECGInputError("bad_parameters", f"top_k must be a positive integer, got {top_k!r}")
        postprocess = {"top_k": int(top_k)} if top_k is not None else {}
        return preprocess, {}, postprocess

    def preprocess(self, record, sampling_rate=None, lead_names=None, fill_missing_leads=False,
                   window: WindowPlan | None = None) -> Iterator[dict[str, Any]]:
        """The model inputs of one record: one for the whole record, or one per window (`window`), each
        `{"input_values": (1, leads, input_length), "warnings", "source", "window", "is_last"}`."""
        if window is not None:
            yield from self._windows(record, sampling_rate, lead_names, fill_missing_leads, window)
            return
        prepared = prepare_record(record, self.model.config, sampling_rate, lead_names, fill_missing_leads)
        yield {"input_values": torch.from_numpy(prepared.signal)[None], "warnings": prepared.warnings,
               "source": prepared.source, "window": None, "is_last": True}

    def _windows(self, record, sampling_rate, lead_names, fill_missing_leads, plan: WindowPlan):
        """One model input per window of `record`, each read from disk (WFDB `.dat`) or cut from memory when it is
        needed. A window that cannot be used (its samples are flat, NaN, implausible...) goes through the model as
        zeros, marked skipped with the reason (`postprocess` leaves it out of the summary)."""
        config = self.model.config
        reader, source = open_input(record, config, sampling_rate, lead_names, lazy=True)
        rate, names = reader.sampling_rate, reader.lead_names
        starts, size, notes = plan.spans(reader.num_samples, rate)
        model_seconds = config.input_length / config.sampling_rate
        full = size == round(plan.seconds * rate)  # else the record is shorter than a window: warn of its padding
        if full and abs(plan.seconds - model_seconds) > 1e-6:
            notes.append(f"windows of {plan.seconds:g} s are " + ("cropped" if plan.seconds > model_seconds
                                                                   else "zero-padded")
                         + f" to the model's {model_seconds:g} s input")
        # Leads the names lack are missing from every window: refused, or zero-filled and said once, here.
        named = {normalize_lead_name(name) for name in names}
        missing = [lead for lead in STANDARD_LEAD_NAMES if lead not in named]
        if missing and not fill_missing_leads:
            raise ECGInputError("missing_leads", f"{source} lacks {missing} (lead names {names}); pass "
                                "fill_missing_leads=True (--fill-missing-leads) to zero-fill them")
        if missing:
            notes.insert(0, _missing_leads_warning(missing))
        shared = WindowedRecord(source, [*reader.warnings, *lead_name_warnings(names), *notes], plan)
        for index, start in enumerate(starts):
            values, warnings, skipped = None, [], None
            try:
                prepared = prepare_input(reader.read(start, start + size), rate, names, config, fill_missing_leads,
                                         length_warnings=not full)
                present = [lead for lead in STANDARD_LEAD_NAMES if lead not in prepared.missing_leads]
                if all(lead in prepared.flat_leads for lead in present):
                    raise ECGInputError("flat_signal", f"every lead is flat (peak-to-peak under 0.05 mV): {present}")
                values = torch.from_numpy(prepared.signal)[None]
                warnings = [warning for warning in prepared.warnings if warning not in shared.warnings]
            except ECGInputError as error:
                skipped = (error.reason, error.detail)
                values = torch.zeros(1, len(config.lead_names), config.input_length)
            yield {"input_values": values, "warnings": warnings, "source": source,
                   "window": Window(shared, round(start / rate, 6), skipped), "is_last": index == len(starts) - 1}

    def get_iterator(self, inputs, num_workers, batch_size, preprocess_params, forward_params, postprocess_params):
        """Batches of model inputs (`batch_size > 1`), windows of one record or of several: every input is (1, leads,
        input_length), so a batch is their concatenation; transformers' own collation pads with a tokenizer or
        feature extractor, which an ECG pipeline does not have. `PipelinePackIterator` hands each input its own slice
        of the outputs (its row of every tensor, its item of every list) and gathers a record's inputs up to
        `is_last` for `postprocess`."""
        if batch_size == 1:
            return super().get_iterator(inputs, num_workers, batch_size, preprocess_params, forward_params,
                                        postprocess_params)
        from torch.utils.data import DataLoader
        from transformers.pipelines.pt_utils import PipelineChunkIterator, PipelineIterator, PipelinePackIterator

        dataset = PipelineChunkIterator(inputs, self.preprocess, preprocess_params)
        loader = DataLoader(dataset, num_workers=min(num_workers, 1), batch_size=batch_size,
                            collate_fn=collate_records)
        model_iterator = PipelinePackIterator(loader, self.forward, forward_params, loader_batch_size=batch_size)
        return PipelineIterator(model_iterator, self.postprocess, postprocess_params)

    def _forward(self, model_inputs):
        task_outputs = self.model.forward_tasks(input_values=model_inputs["input_values"])
        # Flat keys of arrays, one per task: transformers' batching hands each input its row of every array value,
        # not of dicts. Numpy, not tensors: a record's outputs are held until its last window, and a tensor costs
        # ~1 kB of bookkeeping per window, an array a tenth of that.
        outputs = {}
        for key in ("logits", "expert_logits", "gate_weights"):
            for task, output in task_outputs.items():
                outputs[f"{key}/{task}"] = getattr(output, key).float().numpy().copy()
        outputs.update({key: model_inputs[key] for key in ("warnings", "source", "window", "is_last")})
        return outputs

    def postprocess(self, model_outputs: list[dict[str, Any]], top_k=None):
        """The result of one record from its model outputs: one for the whole record, or one per window."""
        first = model_outputs[0]
        if first["window"] is None:
            return {**self._prediction(first, top_k), "warnings": list(first["warnings"]), "source": first["source"]}
        return self._windowed_result(model_outputs, top_k)

    def _prediction(self, output: dict[str, Any], top_k=None) -> dict[str, Any]:
        """The prediction of one model input: `{"tasks": {task: result}}`, or a single-task model's task result."""
        config = self.model.config
        results = {task.label_name: self._task_result(task, *(output[f"{key}/{task.label_name}"] for key in
                                                              ("logits", "expert_logits", "gate_weights")),
                                                      output["source"], top_k)
                   for task in config.task_configs}
        return {"tasks": results} if len(results) > 1 else next(iter(results.values()))

    def _windowed_result(self, model_outputs: list[dict[str, Any]], top_k=None) -> dict[str, Any]:
        """A record's windows (each window's prediction, or why it was skipped) and the summary per task."""
        config = self.model.config
        shared: WindowedRecord = model_outputs[0]["window"].record
        windows, skipped = [], Counter()
        scores = {task.label_name: [] for task in config.task_configs}
        for output in model_outputs:
            window: Window = output["window"]
            entry: dict[str, Any] = {"start_seconds": window.start_seconds}
            reason = window.skipped
            if reason is None:
                try:
                    entry.update(self._prediction(output, top_k))
                except ECGInputError as error:  # a non-finite output: this window is outside what the model computes
                    reason = (error.reason, error.detail)
            if reason is not None:
                skipped[reason[0]] += 1
                windows.append({"start_seconds": window.start_seconds,
                                "skipped": {"reason": reason[0], "detail": reason[1]}})
                continue
            for task in config.task_configs:
                logits = torch.from_numpy(output[f"logits/{task.label_name}"][0])
                scores[task.label_name].append(_scores(task, logits).numpy())
            if output["warnings"]:
                entry["warnings"] = list(output["warnings"])
            windows.append(entry)
        if not any(scores.values()):
            raise ECGInputError("no_usable_window", f"{shared.source}: none of its {len(windows)} windows could be "
                                f"used (skipped: {dict(skipped)}); see each reason's meaning in docs/serving.md")
        counts = {"windows_used": len(windows) - sum(skipped.values()), "windows_skipped": sum(skipped.values()),
                  "skipped_reasons": dict(skipped)}
        summary = {}
        for task in config.task_configs:
            stacked = torch.from_numpy(np.stack(scores[task.label_name]))
            summary[task.label_name] = {
                **_task_values(task, stacked.quantile(0.5, dim=0) if task.is_regression
                               else stacked.mean(dim=0), top_k),
                **counts,
            }
        return {"windows": windows, "summary": summary, "window_seconds": shared.plan.seconds,
                "hop_seconds": shared.plan.hop_seconds, "warnings": list(shared.warnings), "source": shared.source}

    def _task_result(self, task, logits, expert_logits, gate_weights, source, top_k=None) -> dict[str, Any]:
        """One task's prediction of one record: the value or classes, each expert's gate weight and own prediction.
        `task` is one of `config.task_configs`."""
        names = list(self.model.expert_names)
        logits, expert_logits, gate_weights = (torch.as_tensor(value[0]).float()
                                               for value in (logits, expert_logits, gate_weights))
        if not all(torch.isfinite(tensor).all() for tensor in (logits, expert_logits, gate_weights)):
            raise ECGInputError("non_finite_output", f"the model's output for {source} is NaN or infinite; the input "
                                "is outside what the model can compute with")
        result = _task_values(task, _scores(task, logits), top_k)
        expert_scores = _scores(task, expert_logits)
        if task.is_regression:
            experts = {name: float(expert_scores[i, 0]) for i, name in enumerate(names)}
        else:
            id2label = {int(k): v for k, v in task.id2label.items()}
            experts = {name: {"label": id2label[int(expert_scores[i].argmax())], "score": float(expert_scores[i].max())}
                       for i, name in enumerate(names)}
        result["gate_weights"] = {name: float(w) for name, w in zip(names, gate_weights.tolist())}
        result["expert_predictions"] = experts
        return result


def collate_records(items: list[dict[str, Any]]) -> dict[str, Any]:
    """One model input from several prepared inputs: their signals stacked, every other value as a list."""
    return {key: torch.cat([item[key] for item in items]) if key == "input_values" else [item[key] for item in items]
            for key in items[0]}


__all__ = ["EnECGPipeline", "PIPELINE_TASK", "PreparedRecord", "WindowPlan", "collate_records", "lead_name_warnings",
           "open_input", "pipeline_entry", "prepare_input", "prepare_record", "record_limits", "window_plan"]
