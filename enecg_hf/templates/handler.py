"""Hugging Face Inference Endpoint handler for an EnECG model folder (written by `enecg_hf`; needs no `enecg_hf`).

Request (JSON):
    {"inputs": {"signal": [[...], ...], "sampling_rate": 500, "lead_names": ["I", "II", ...]},
     "parameters": {"top_k": 3, "fill_missing_leads": false}}
    {"inputs": {"npy_base64": "<base64 of a .npy file>", "sampling_rate": 500}}
    {"inputs": [<record>, <record>, ...]}                      (a batch, at most MAX_RECORDS)
    {"inputs": {...}, "parameters": {"window_seconds": 10, "hop_seconds": 5, "max_windows": 100}}
                                                    (a record longer than the model takes, window by window)

Response: a list with one result per record (the pipeline's dicts: prediction, gate weights, each expert's
prediction, warnings; with `window_seconds`, each record's windows and a summary per task), or {"error": "...",
"reason": "..."} for a request that cannot be answered. Every field is type-checked: a string rate, a lead_names that
is not a list of strings, a non-boolean fill_missing_leads, a window_seconds/hop_seconds that is not a number, a
max_windows that is not a positive integer, an .npz archive or an object array in npy_base64 are refused with a
reason, as is a non-finite model output.
"""

from __future__ import annotations

import base64
import binascii
import importlib
import io
from typing import Any

import numpy as np


MAX_RECORDS = 32  # records per request
MAX_SAMPLES = 12 * 500 * 120  # values per record: 12 leads x 2 minutes at 500 Hz
MAX_NPY_BYTES = 8 * MAX_SAMPLES + 1024  # a float64 .npy of MAX_SAMPLES values, plus its header
# window_seconds, hop_seconds and max_windows are type- and range-checked by the pipeline (`bad_parameters`).
ALLOWED_PARAMETERS = {"top_k", "fill_missing_leads", "window_seconds", "hop_seconds", "max_windows"}


class RequestError(ValueError):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class EndpointHandler:
    def __init__(self, path: str = ""):
        from transformers import pipeline

        self.pipeline = pipeline(model=path or ".", trust_remote_code=True)
        # The .npy reader of the model folder's pipeline module (io_enecg.read_npy): one implementation of the checks.
        self.read_npy = importlib.import_module(type(self.pipeline).__module__).read_npy

    def __call__(self, data: dict[str, Any]) -> list[dict[str, Any]] | dict[str, Any]:
        try:
            records, parameters = self._parse(data)
            results = [self.pipeline(record, **parameters) for record in records]
        except RequestError as error:
            return {"error": str(error), "reason": error.reason}
        except ValueError as error:  # the pipeline's input errors (ECGInputError is a ValueError)
            return {"error": str(error), "reason": getattr(error, "reason", "bad_input")}
        return results

    def _parse(self, data: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        if not isinstance(data, dict) or "inputs" not in data:
            raise RequestError("bad_request", 'the request must be a JSON object with "inputs"')
        parameters = data.get("parameters")
        parameters = {} if parameters is None else parameters
        if not isinstance(parameters, dict) or set(parameters) - ALLOWED_PARAMETERS:
            raise RequestError("bad_parameters", f"parameters must be an object with keys among "
                               f"{sorted(ALLOWED_PARAMETERS)}; got {parameters!r}"[:300])
        if "top_k" in parameters and (type(parameters["top_k"]) is not int or parameters["top_k"] < 1):
            raise RequestError("bad_parameters", f'"top_k" must be a positive integer, got {parameters["top_k"]!r}'[:300])
        if "fill_missing_leads" in parameters and not isinstance(parameters["fill_missing_leads"], bool):
            raise RequestError("bad_parameters", f'"fill_missing_leads" must be true or false, got '
                               f'{parameters["fill_missing_leads"]!r}'[:300])
        inputs = data["inputs"]
        batch = inputs if isinstance(inputs, list) else [inputs]
        if not batch:
            raise RequestError("bad_request", '"inputs" holds no records')
        if len(batch) > MAX_RECORDS:
            raise RequestError("too_many_records", f"{len(batch)} records in one request; the limit is {MAX_RECORDS}")
        return [self._record(item) for item in batch], parameters

    def _record(self, item: Any) -> dict[str, Any]:
        if not isinstance(item, dict):
            raise RequestError("bad_request", 'each input must be an object with "signal" or "npy_base64"')
        unknown = set(item) - {"signal", "npy_base64", "sampling_rate", "lead_names"}
        if unknown:
            raise RequestError("bad_request", f"unknown input keys {sorted(unknown)}")
        if ("signal" in item) == ("npy_base64" in item):
            raise RequestError("bad_request", 'give exactly one of "signal" and "npy_base64"')
        rate = item.get("sampling_rate")
        if rate is None:
            raise RequestError("bad_sampling_rate", '"sampling_rate" (Hz) is required')
        if isinstance(rate, bool) or not isinstance(rate, (int, float)):  # its value is checked by the pipeline
            raise RequestError("bad_sampling_rate", f'"sampling_rate" must be a number (Hz), got {str(rate)[:40]}')
        names = item.get("lead_names")
        if "lead_names" in item and (not isinstance(names, list) or not all(isinstance(n, str) for n in names)):
            raise RequestError("bad_lead_names", f'"lead_names" must be a list of strings, got {str(names)[:100]}')
        if "npy_base64" in item:
            signal = self._decode_npy(item["npy_base64"])
        else:
            signal = _numeric_matrix(item["signal"])
        if signal.size > MAX_SAMPLES:
            raise RequestError("too_large", f"the record has {signal.size} values; the limit is {MAX_SAMPLES}")
        record = {"signal": signal, "sampling_rate": rate}
        if "lead_names" in item:
            record["lead_names"] = names
        return record

    def _decode_npy(self, text: Any) -> np.ndarray:
        if not isinstance(text, str):
            raise RequestError("bad_npy", '"npy_base64" must be a base64 string')
        if len(text) > MAX_NPY_BYTES * 4 // 3 + 4:
            raise RequestError("too_large", f"the .npy payload is larger than {MAX_NPY_BYTES} bytes")
        try:
            raw = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as error:
            raise RequestError("bad_npy", f"npy_base64 is not base64: {error}") from None
        try:  # header checked before the data is read; never unpickles
            signal = self.read_npy(io.BytesIO(raw), source="npy_base64")
        except ValueError as error:
            reason = getattr(error, "reason", "bad_npy")
            raise RequestError("bad_npy" if reason == "unreadable_signal" else reason,
                               getattr(error, "detail", str(error))) from None
        return signal.astype(np.float32)


def _numeric_matrix(value: Any) -> np.ndarray:
    """A JSON list of lists of numbers as a float32 array (strings, booleans, ragged rows and nulls refused)."""
    try:
        array = np.asarray(value)
    except (TypeError, ValueError, OverflowError):
        array = None
    if array is None or array.ndim != 2 or array.dtype.kind not in "iuf":
        raise RequestError("bad_shape", '"signal" must be a (leads, samples) list of lists of numbers')
    return array.astype(np.float32)
