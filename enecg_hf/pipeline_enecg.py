"""A `transformers` pipeline for EnECG models: ECG records in, predictions with each expert's gate weight out.

    from transformers import pipeline
    ecg = pipeline(model="outputs/enecg-tiny-rr_interval", trust_remote_code=True)   # no task name needed
    ecg("ludb/data/1")                                        # a WFDB record (with or without .hea)
    ecg(signal, sampling_rate=250, lead_names=[...])          # a (leads, samples) array or nested list in mV
    ecg(["a.hea", "b.mat", "c.npy"], sampling_rate=500)       # several records, results in order
    ecg(records, batch_size=8)                                # ... through the model 8 at a time
    ecg(open("d.npy", "rb").read(), sampling_rate=500)        # the bytes of a .npy file

Model folders carry this file (flat, next to the model code) and name it in `config.json` under
`custom_pipelines`, so the pipeline loads with `trust_remote_code=True` where `enecg_hf` is not installed. Records go
through the same steps as the training data (`preprocessing_enecg.prepare_signal`: lead matching, interpolation of
short NaN runs, resampling, crop/pad); the model normalises amplitudes itself. Files are checked against
`io_enecg.RecordLimits` (`config.max_input_seconds`, 10 kHz) from their headers before any sample is read.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sized
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from transformers import Pipeline

from .io_enecg import RecordLimits, read_npy, read_record
from .preprocessing_enecg import STANDARD_LEAD_NAMES, ECGInputError, check_sampling_rate, normalize_lead_name, prepare_signal


PIPELINE_TASK = "ecg-analysis"
MIN_SAMPLING_RATE = 100.0  # Hz; below this a diagnostic ECG cannot be represented (as in the dataset builders)
MAX_SAMPLING_RATE = 10_000.0  # Hz; ECG devices record at 100-2000 Hz, anything far above is a unit mistake
LARGE_AMPLITUDE_MV = 20.0  # peak-to-peak; real ECG leads stay under ~10 mV, so this suggests microvolts


def pipeline_entry() -> dict:
    """The `custom_pipelines` entry of `config.json` that makes `pipeline(model=folder)` find this pipeline."""
    return {PIPELINE_TASK: {"impl": "pipeline_enecg.EnECGPipeline", "pt": ["AutoModel"], "type": "multimodal"}}


def record_limits(config) -> RecordLimits:
    """The size limits of inputs to a model with `config`: `config.max_input_seconds`, up to `MAX_SAMPLING_RATE`."""
    return RecordLimits(max_seconds=float(config.max_input_seconds), max_sampling_rate=MAX_SAMPLING_RATE)


@dataclass
class PreparedRecord:
    """One input in the model's layout.

    Attributes:
        signal: (leads, input_length) float32 array in mV, rows in `config.lead_names` order.
        source: the file the record came from, or `"array"`.
        warnings: things the caller should know (cropped, padded, flat leads, dropped non-standard leads...).
    """

    signal: np.ndarray
    source: str = "array"
    warnings: list[str] = field(default_factory=list)


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
        lead_names: names of the rows of arrays, `.npy` and `.csv` inputs (default: the 12 standard leads in order).
        fill_missing_leads: zero-fill standard leads the record lacks instead of rejecting it.

    Raises:
        ValueError: ([`ECGInputError`] with a `reason`) for anything that is not a usable ECG: wrong shape, too few or
            unknown leads, long NaN runs, an absurd sampling rate or amplitude, a record longer than
            `config.max_input_seconds` (for files: found from the header, before reading samples), a file that is not
            an ECG record.
    """
    if not isinstance(fill_missing_leads, (bool, np.bool_)):
        raise ECGInputError("bad_parameters", f"fill_missing_leads must be true or false, got {fill_missing_leads!r}")
    limits = record_limits(config)
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
            recording = read_record(record, sampling_rate=sampling_rate, lead_names=lead_names, limits=limits)
        except ECGInputError as error:
            raise ECGInputError(error.reason, f"{source} is not a readable ECG record: {error.detail}") from error
        signal, rate, names = recording.signal, recording.sampling_rate, recording.lead_names
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
        rate = sampling_rate
        names = list(lead_names) if lead_names is not None else list(STANDARD_LEAD_NAMES)
        if signal.ndim != 2:
            raise ECGInputError("bad_shape", f"expected a 2-D (leads, samples) array, got shape {signal.shape}")
        if signal.shape[0] != len(names) and signal.shape[1] == len(names):
            signal = signal.T  # (samples, leads), as CSV exports often are
        if signal.shape[0] != len(names):
            raise ECGInputError("bad_shape", f"signal of shape {signal.shape} has {signal.shape[0]} rows but "
                                f"{len(names)} lead names {names}; pass `lead_names` for the rows")
    rate = check_sampling_rate(rate, MAX_SAMPLING_RATE)
    if rate < MIN_SAMPLING_RATE:
        raise ECGInputError("bad_sampling_rate", f"sampling rate {rate:g} Hz is not plausible for an ECG "
                            f"(expected {MIN_SAMPLING_RATE:g}-{MAX_SAMPLING_RATE:g} Hz)")
    if signal.size == 0:
        raise ECGInputError("empty_signal", f"the signal of shape {signal.shape} holds no samples")
    finite = np.isfinite(signal)
    if not finite.any():
        raise ECGInputError("not_finite", f"the signal {signal.shape} holds no finite values (all NaN/inf)")
    limits.check(signal.shape[0], signal.shape[1], rate, "the record")

    target_seconds = config.input_length / config.sampling_rate
    prepared = prepare_signal(signal, rate, names, target_rate=config.sampling_rate, seconds=target_seconds,
                              fill_missing_leads=fill_missing_leads)
    warnings = []
    if not finite.all():
        warnings.append(f"{int((~finite).sum())} NaN/inf samples interpolated")
    dropped = [name for name in names if normalize_lead_name(name) is None]
    if dropped:
        warnings.append(f"non-standard leads ignored: {dropped}")
    if prepared.missing_leads:
        warnings.append(f"missing leads zero-filled: {prepared.missing_leads}")
    flat = [lead for lead in prepared.flat_leads if lead not in prepared.missing_leads]
    if flat:
        warnings.append(f"flat leads: {flat}")
    if prepared.original_seconds > target_seconds + 1e-6:
        warnings.append(f"record of {prepared.original_seconds:.1f} s: only its first {target_seconds:g} s were used")
    elif prepared.original_seconds < target_seconds - 1e-6:
        warnings.append(f"record of {prepared.original_seconds:.1f} s zero-padded to {target_seconds:g} s")
    peak_to_peak = float(np.ptp(prepared.signal, axis=1).max())
    if peak_to_peak > LARGE_AMPLITUDE_MV:
        warnings.append(f"peak-to-peak amplitude {peak_to_peak:.0f} mV: inputs must be in millivolts (microvolts?)")
    order = [STANDARD_LEAD_NAMES.index(normalize_lead_name(lead)) for lead in config.lead_names]
    return PreparedRecord(np.ascontiguousarray(prepared.signal[order]), source, warnings)


class EnECGPipeline(Pipeline):
    """Predictions of an EnECG model for ECG records (see the module docstring for the inputs).

    Each result is a dict: for regression `{"value", "unit", "label"}` (the label's name); for classification
    `{"label", "score", "scores": [{"label", "score"}, ... top_k]}`; always `"gate_weights"` `{expert: weight}`,
    `"expert_predictions"` (each expert head's own value, or its top class and score), `"warnings"` and `"source"`.
    A multi-task model's result holds one such prediction per task under `"tasks"` (`{task: {"label", "value",
    "unit", "gate_weights", "expert_predictions", ...}}`), beside the record's `"warnings"` and `"source"`.
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

    def _sanitize_parameters(self, sampling_rate=None, lead_names=None, fill_missing_leads=None, top_k=None, **kwargs):
        if kwargs:
            raise TypeError(f"EnECGPipeline got unknown arguments {sorted(kwargs)}")
        preprocess = {}
        if sampling_rate is not None:
            preprocess["sampling_rate"] = check_sampling_rate(sampling_rate, MAX_SAMPLING_RATE)
        if lead_names is not None:
            preprocess["lead_names"] = _check_lead_names(lead_names)
        if fill_missing_leads is not None:
            if not isinstance(fill_missing_leads, (bool, np.bool_)):
                raise ECGInputError("bad_parameters", f"fill_missing_leads must be true or false, got "
                                    f"{fill_missing_leads!r}")
            preprocess["fill_missing_leads"] = bool(fill_missing_leads)
        if top_k is not None and (isinstance(top_k, (bool, np.bool_)) or not isinstance(top_k, (int, np.integer))
                                  or top_k < 1):
            raise ECGInputError("bad_parameters", f"top_k must be a positive integer, got {top_k!r}")
        postprocess = {"top_k": int(top_k)} if top_k is not None else {}
        return preprocess, {}, postprocess

    def preprocess(self, record, sampling_rate=None, lead_names=None, fill_missing_leads=False):
        prepared = prepare_record(record, self.model.config, sampling_rate, lead_names, fill_missing_leads)
        return {"input_values": torch.from_numpy(prepared.signal)[None], "warnings": prepared.warnings,
                "source": prepared.source}

    def get_iterator(self, inputs, num_workers, batch_size, preprocess_params, forward_params, postprocess_params):
        """Batches of prepared records (`batch_size > 1`): every record is (1, leads, input_length), so a batch is
        their concatenation; transformers' own collation pads with a tokenizer or feature extractor, which an ECG
        pipeline does not have. `PipelineIterator` hands each record its own slice of the outputs (its row of every
        tensor, its item of the `warnings` and `source` lists)."""
        if batch_size == 1:
            return super().get_iterator(inputs, num_workers, batch_size, preprocess_params, forward_params,
                                        postprocess_params)
        from torch.utils.data import DataLoader
        from transformers.pipelines.pt_utils import PipelineDataset, PipelineIterator

        if isinstance(inputs, Sized):
            dataset = PipelineDataset(inputs, self.preprocess, preprocess_params)
        else:
            dataset = PipelineIterator(inputs, self.preprocess, preprocess_params)
            num_workers = 1
        loader = DataLoader(dataset, num_workers=num_workers, batch_size=batch_size, collate_fn=collate_records)
        model_iterator = PipelineIterator(loader, self.forward, forward_params, loader_batch_size=batch_size)
        return PipelineIterator(model_iterator, self.postprocess, postprocess_params)

    def _forward(self, model_inputs):
        output = self.model(input_values=model_inputs["input_values"])
        outputs = {"warnings": model_inputs["warnings"], "source": model_inputs["source"]}
        if not self.model.config.is_multitask:
            return {"logits": output.logits, "expert_logits": output.expert_logits, "gate_weights": output.gate_weights,
                    **outputs}
        # Flat keys of tensors: transformers' batching hands each record its row of every tensor value, not of dicts.
        for key in ("logits", "expert_logits", "gate_weights"):
            outputs.update({f"{key}/{task}": value for task, value in getattr(output, key).items()})
        return outputs

    def postprocess(self, model_outputs, top_k=None):
        config = self.model.config
        result: dict[str, Any] = {}
        if config.is_multitask:
            result["tasks"] = {
                task.label_name: self._task_result(task, *(model_outputs[f"{key}/{task.label_name}"] for key in
                                                           ("logits", "expert_logits", "gate_weights")),
                                                   model_outputs["source"], top_k)
                for task in config.task_configs
            }
        else:
            result.update(self._task_result(config, model_outputs["logits"], model_outputs["expert_logits"],
                                            model_outputs["gate_weights"], model_outputs["source"], top_k))
        result["warnings"] = list(model_outputs["warnings"])
        result["source"] = model_outputs["source"]
        return result

    def _task_result(self, task, logits, expert_logits, gate_weights, source, top_k=None) -> dict[str, Any]:
        """One task's prediction of one record: the value or classes, each expert's gate weight and own prediction.
        `task` is the model config (single task) or one of `config.task_configs`."""
        names = list(self.model.expert_names)
        logits, expert_logits, gate_weights = logits[0].float(), expert_logits[0].float(), gate_weights[0].float()
        if not all(torch.isfinite(tensor).all() for tensor in (logits, expert_logits, gate_weights)):
            raise ECGInputError("non_finite_output", f"the model's output for {source} is NaN or infinite; the input "
                                "is outside what the model can compute with")
        result: dict[str, Any] = {}
        if task.problem_type == "regression":
            result.update(label=task.label_name, value=float(logits[0]), unit=task.label_unit)
            experts = {name: float(expert_logits[i, 0]) for i, name in enumerate(names)}
        else:
            id2label = {int(k): v for k, v in task.id2label.items()}
            multi = task.problem_type == "multi_label_classification"
            scores = torch.sigmoid(logits) if multi else torch.softmax(logits, dim=-1)
            k = len(id2label) if top_k is None else max(1, min(int(top_k), len(id2label)))
            ranked = torch.argsort(scores, descending=True)[:k].tolist()
            result.update(label=id2label[ranked[0]], score=float(scores[ranked[0]]),
                          scores=[{"label": id2label[i], "score": float(scores[i])} for i in ranked])
            expert_scores = torch.sigmoid(expert_logits) if multi else torch.softmax(expert_logits, dim=-1)
            experts = {name: {"label": id2label[int(expert_scores[i].argmax())], "score": float(expert_scores[i].max())}
                       for i, name in enumerate(names)}
        result["gate_weights"] = {name: float(w) for name, w in zip(names, gate_weights.tolist())}
        result["expert_predictions"] = experts
        return result


def collate_records(items: list[dict[str, Any]]) -> dict[str, Any]:
    """One model input from several prepared records: their signals stacked, their warnings and sources as lists."""
    return {"input_values": torch.cat([item["input_values"] for item in items]),
            "warnings": [item["warnings"] for item in items], "source": [item["source"] for item in items]}


__all__ = ["EnECGPipeline", "PIPELINE_TASK", "PreparedRecord", "collate_records", "pipeline_entry", "prepare_record",
           "record_limits"]
