"""Turn an ECG collection into one memory-mapped `datasets.Dataset` with the labels of the five EnECG tasks.

The source's record list is cut into shards; `Dataset.from_generator` runs them (in `num_proc` processes) and writes
examples straight to Arrow files, so memory holds one shard's records at a time however large the collection.
Each worker writes the records it skips, with the reason, to a side file that the report collects, and a hash of
each stored signal: a record id listed twice, or a signal stored twice under two ids (the same recording, which
would sit on both sides of a split), is kept once and the others are reported as skipped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import datasets
import pandas as pd

from ..preprocessing_enecg import ECGInputError, prepare_signal
from . import challenge, jsonl, ludb, mimic, ptbxl, simulate
from .checksums import write_checksums
from .report import BuildReport
from .schema import ecg_features
from .source import BuildOptions, LayoutError


logger = logging.getLogger(__name__)

FORMATS = {
    "mimic-iv-ecg": mimic,
    "ptb-xl": ptbxl,
    "challenge": challenge,
    "ludb": ludb,
    "jsonl": jsonl,
    "simulated": simulate,
}
WRITER_BATCH_SIZE = 32
LABEL_KEYS = ("rr_interval", "age", "sex", "potassium_flag", "arrhythmia")


class DatasetBuildError(RuntimeError):
    """Nothing usable was read (every record was skipped, or the input was empty or not of the format)."""


@dataclass
class DatasetBuild:
    """The result of [`build`]: the dataset and the report of how it was made."""

    dataset: datasets.Dataset
    report: BuildReport


def _example(source: str, record_id: str, subject_id: Any, loaded, options: BuildOptions, extra: dict) -> dict:
    recording = loaded.recording
    prepared = prepare_signal(
        recording.signal,
        recording.sampling_rate,
        recording.lead_names,
        target_rate=options.sampling_rate,
        seconds=options.seconds,
        fill_missing_leads=options.fill_missing_leads,
        max_gap_seconds=options.max_gap_seconds,
        min_sampling_rate=options.min_sampling_rate,
        flat_threshold_mv=options.flat_threshold_mv,
    )
    labels = loaded.labels
    example = {
        "record_id": record_id,
        "subject_id": None if subject_id is None or (isinstance(subject_id, float) and math.isnan(subject_id)) else str(subject_id),
        "source": source,
        "signal": prepared.signal,
        "sampling_rate": options.sampling_rate,
        "source_sampling_rate": recording.sampling_rate,
        **{key: labels.get(key) for key in LABEL_KEYS},
        "diagnoses": [str(item) for item in labels.get("diagnoses") or []],
        "missing_leads": prepared.missing_leads,
        "flat_leads": prepared.flat_leads,
        "original_seconds": prepared.original_seconds,
    }
    example.update({name: labels.get(name) for name in extra})
    return example


def _signal_hash(signal) -> str:
    return hashlib.blake2b(signal.tobytes(), digest_size=16).hexdigest()


def _generate_examples(shards: list[dict], format: str, options: BuildOptions, skip_folder: str,
                       side_folder: str) -> Iterator[dict]:
    """Yield the examples of `shards`; write the skipped records of each shard to `skip_folder/<shard>.jsonl`, and the
    hash of each stored signal and the label notes to `side_folder/<shard>.json`."""
    module = FORMATS[format]
    for shard in shards:
        skips, hashes, notes = [], {}, []
        for row in _rows(shard["rows"]):
            record_id = str(row["record_id"])
            try:
                loaded = module.load_record(row, options)
                example = _example(module.SOURCE, record_id, row.get("subject_id"), loaded, options, module.EXTRA_FEATURES)
            except ECGInputError as error:
                skips.append({"record_id": record_id, "reason": error.reason, "detail": error.detail})
                continue
            except Exception as error:  # a reader bug or an exotic file must not end an 800k-record build
                skips.append({"record_id": record_id, "reason": "read_error", "detail": f"{type(error).__name__}: {error}"})
                continue
            hashes[record_id] = _signal_hash(example["signal"])
            notes.extend({"record_id": record_id, **note} for note in loaded.notes)
            yield example
        with open(Path(skip_folder) / f"{shard['index']:06d}.jsonl", "w") as handle:
            handle.writelines(json.dumps(skip) + "\n" for skip in skips)
        (Path(side_folder) / f"{shard['index']:06d}.json").write_text(json.dumps({"hashes": hashes, "notes": notes}))


def _drop_duplicate_ids(table: pd.DataFrame) -> tuple[pd.DataFrame, list[dict]]:
    """The record table with each record id once (the first listing kept), and a skip entry per repeat."""
    ids = table["record_id"].astype(str)
    repeated = ids.duplicated(keep="first")
    if not repeated.any():
        return table, []
    paths = table["path"].astype(str) if "path" in table.columns else pd.Series([""] * len(table), index=table.index)
    first_path = dict(zip(ids[~repeated], paths[~repeated]))
    skips = []
    for record_id, path in zip(ids[repeated], paths[repeated]):
        where = (f"{path} has the same id as {first_path[record_id]}, which is kept" if path != first_path[record_id]
                 else "listed more than once by the source (e.g. a repeated row in its table); one is kept")
        skips.append({"record_id": record_id, "reason": "duplicate_record_id", "detail": where})
    return table[~repeated.to_numpy()], skips


def _drop_identical_signals(dataset: datasets.Dataset, hashes: dict[str, str]) -> tuple[datasets.Dataset, list[dict]]:
    """The dataset with each stored signal once (the first record kept), and a skip entry per later copy: the same
    recording under two ids would otherwise land on both sides of a subject-wise split."""
    ids = dataset.with_format("arrow")["record_id"].to_pylist()
    first: dict[str, int] = {}
    copies: list[tuple[int, int]] = []
    for row, record_id in enumerate(ids):
        signal_hash = hashes[record_id]
        if signal_hash in first:
            copies.append((row, first[signal_hash]))
        else:
            first[signal_hash] = row
    if not copies:
        return dataset, []
    labels = dataset.select_columns([*LABEL_KEYS, "diagnoses"]).with_format("arrow")
    skips = []
    for row, kept in copies:
        mine, theirs = labels[row].to_pylist()[0], labels[kept].to_pylist()[0]
        differ = sorted(key for key in mine if mine[key] != theirs[key])
        skips.append({"record_id": ids[row], "reason": "duplicate_signal",
                      "detail": f"the same stored signal as {ids[kept]}, which is kept"
                      + (f" (labels that differ: {differ})" if differ else " (same labels)")})
    dropped = {row for row, _ in copies}
    return dataset.select([row for row in range(len(ids)) if row not in dropped]), skips


def _count_skips(skip_folder: Path) -> int:
    return sum(len(path.read_text().splitlines()) for path in skip_folder.glob("*.jsonl"))


def _shards(table: pd.DataFrame, shard_size: int) -> list[dict]:
    """Slices of the record table (kept as DataFrames, far smaller than one dict per record)."""
    return [{"index": i, "rows": table.iloc[start : start + shard_size]} for i, start in enumerate(range(0, len(table), shard_size))]


def _rows(table: pd.DataFrame) -> list[dict]:
    """The records of a shard as dicts, with pandas' NaN/NA as None."""
    return table.astype(object).where(table.notna(), None).to_dict("records")


def _reader(format: str, input: str | Path | None, ptbxl_rate: str | int):
    """The reader module of `format` (one of `FORMATS`), once the arguments every build checks first are valid.

    Raises:
        ValueError: an unknown format or `ptbxl_rate`, or no `input` for a format that reads one.
        LayoutError: `input` does not exist.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; expected one of {sorted(FORMATS)}")
    if format != "simulated":
        if input is None:
            raise ValueError(f"format {format!r} needs an input path")
        if not Path(input).exists():
            raise LayoutError(f"input {input} does not exist")
    if str(ptbxl_rate) not in ptbxl.RATES:
        raise ValueError(f"ptbxl_rate must be one of {ptbxl.RATES}, got {ptbxl_rate!r}")
    return FORMATS[format]


def _listed_records(module, format: str, input: str | Path | None,
                    options: BuildOptions) -> tuple[pd.DataFrame, BuildReport]:
    """The reader's table of records (the first `options.limit` of them) with each record id once, and a new report
    counting them in `records_read` and listing the repeated ids as skipped.

    Raises:
        DatasetBuildError: the reader lists no record.
    """
    table = module.list_records(Path(input) if input is not None else None, options)
    if options.limit is not None:
        table = table.iloc[: options.limit]
    report = BuildReport(format, str(input) if input is not None else None, None, options.sampling_rate, options.seconds)
    report.records_read = len(table)
    if report.records_read == 0:
        raise DatasetBuildError(f"no records found in {input} ({format})")
    table, duplicates = _drop_duplicate_ids(table)
    report.skipped.extend(duplicates)
    return table, report


def _shard_plan(table: pd.DataFrame, num_proc: int | None, shard_size: int) -> tuple[int, list[dict]]:
    """The worker count (at least 1, at most one per shard of `shard_size`) and the shards of `table` they read."""
    num_proc = max(1, min(num_proc or 1, math.ceil(len(table) / shard_size)))
    # Enough shards to balance the workers, each small enough that a worker holds little at once.
    shard_size = max(1, min(shard_size, math.ceil(len(table) / num_proc)))
    return num_proc, _shards(table, shard_size)


def _work_folder(output: Path | None, cache_dir: str | Path | None) -> Path:
    """A new folder for the build's Arrow cache (`cache/`) and the workers' side files (`skipped/`, `side/`): beside
    `output` when the build saves there, else a temporary folder (under `cache_dir` if given)."""
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".enecg-build-", dir=output.parent))
    else:
        # The random fingerprint of `_generate_dataset` is never reused, so the datasets cache would only pile up:
        # use a fresh folder.
        work = Path(tempfile.mkdtemp(prefix="enecg-dataset-", dir=cache_dir))
    (work / "skipped").mkdir()
    (work / "side").mkdir()
    return work


def _generate_dataset(module, shards: list[dict], format: str, options: BuildOptions, work: Path, num_proc: int,
                      to_read: int) -> datasets.Dataset | None:
    """The examples of `shards` (`_generate_examples`, in `num_proc` processes) as a dataset in Arrow files under
    `work/cache`; the workers' side files go to `work/skipped` and `work/side`.

    Returns:
        The dataset, or `None` when all `to_read` records were skipped.
    """
    try:
        return datasets.Dataset.from_generator(
            _generate_examples,
            features=ecg_features(options.num_samples, module.EXTRA_FEATURES),
            gen_kwargs={"shards": shards, "format": format, "options": options, "skip_folder": str(work / "skipped"),
                        "side_folder": str(work / "side")},
            num_proc=num_proc if num_proc > 1 else None,
            cache_dir=str(work / "cache"),
            # A fresh fingerprint: always run the generator, so the skip files match this build.
            fingerprint=uuid.uuid4().hex,
            # Flush to Arrow every few records: a worker's buffer holds writer_batch_size signals.
            writer_batch_size=WRITER_BATCH_SIZE,
        )
    except Exception:
        # `datasets` cannot make a dataset of zero examples; any other failure is not ours to hide.
        if _count_skips(work / "skipped") != to_read:
            raise
        return None


def _collect_side_files(work: Path, report: BuildReport) -> dict[str, str]:
    """Add the records the workers skipped and their label notes to `report`, in shard order.

    Returns:
        Record id -> hash of its stored signal (`_signal_hash`), for every record stored.
    """
    for path in sorted((work / "skipped").glob("*.jsonl")):
        report.skipped.extend(json.loads(line) for line in path.read_text().splitlines() if line.strip())
    hashes = {}
    for path in sorted((work / "side").glob("*.json")):
        side = json.loads(path.read_text())
        hashes.update(side["hashes"])
        report.label_notes.extend(side["notes"])
    return hashes


def _nothing_usable(report: BuildReport, input: str | Path | None, format: str) -> DatasetBuildError:
    """The error of a build that kept no record: the skip reasons with their counts, and the first skipped record."""
    reasons = ", ".join(f"{reason} {count}" for reason, count in report.skipped_by_reason.items())
    first = f"; first: {report.skipped[0]['record_id']}: {report.skipped[0]['detail']}" if report.skipped else ""
    return DatasetBuildError(
        f"nothing usable was read from {input} ({format}): all {report.records_read} records were skipped"
        f" ({reasons}){first}"
    )


def _save(dataset: datasets.Dataset, output: Path) -> datasets.Dataset:
    """`dataset` saved to `output` (replacing what was there) and memory-mapped back from it."""
    if output.exists():
        shutil.rmtree(output)
    dataset.save_to_disk(str(output))
    return datasets.load_from_disk(str(output))


def _remove_work_folder(work: Path, output: Path | None) -> None:
    """Remove the build's work folder; without `output`, only its side files: its Arrow cache is the dataset."""
    if output is not None:
        shutil.rmtree(work, ignore_errors=True)
    else:
        shutil.rmtree(work / "skipped", ignore_errors=True)
        shutil.rmtree(work / "side", ignore_errors=True)


def _complete_report(report: BuildReport, dataset: datasets.Dataset, started: float) -> None:
    """Fill the report's kept count, label counts and speed (`started`: `time.perf_counter()` at the build's start).

    Raises:
        RuntimeError: the kept and skipped records do not add up to the records read (a builder bug).
    """
    report.records_kept = len(dataset)
    if report.records_kept + len(report.skipped) != report.records_read:
        raise RuntimeError(
            f"{report.records_read} records read but {report.records_kept} kept + {len(report.skipped)} skipped"
        )
    report.count_labels(dataset)
    report.seconds_elapsed = time.perf_counter() - started
    report.records_per_second = report.records_read / report.seconds_elapsed


def build(
    format: str,
    input: str | Path | None = None,
    output: str | Path | None = None,
    sampling_rate: int = 500,
    seconds: float = 10.0,
    num_proc: int | None = None,
    limit: int | None = None,
    fill_missing_leads: bool = False,
    max_gap_seconds: float = 0.1,
    min_sampling_rate: float = 100.0,
    labels_csv: str | Path | None = None,
    seed: int = 0,
    shard_size: int = 200,
    cache_dir: str | Path | None = None,
    max_record_seconds: float = 3600.0,
    ptbxl_rate: str | int = "auto",
) -> DatasetBuild:
    """Build the dataset of one ECG collection; see [`build_dataset`] for the arguments.

    Returns:
        A [`DatasetBuild`] with the dataset and its [`BuildReport`].
    """
    module = _reader(format, input, ptbxl_rate)
    options = BuildOptions(
        sampling_rate=int(sampling_rate),
        seconds=float(seconds),
        fill_missing_leads=fill_missing_leads,
        max_gap_seconds=max_gap_seconds,
        min_sampling_rate=min_sampling_rate,
        limit=limit,
        seed=seed,
        labels_csv=str(labels_csv) if labels_csv else None,
        max_record_seconds=float(max_record_seconds),
        ptbxl_rate=str(ptbxl_rate),
    )
    started = time.perf_counter()
    table, report = _listed_records(module, format, input, options)
    to_read = len(table)
    num_proc, shards = _shard_plan(table, num_proc, shard_size)
    del table

    output = Path(output) if output is not None else None
    work = _work_folder(output, cache_dir)
    try:
        dataset = _generate_dataset(module, shards, format, options, work, num_proc, to_read)
        hashes = _collect_side_files(work, report)
        if dataset is not None:
            dataset, copies = _drop_identical_signals(dataset, hashes)
            report.skipped.extend(copies)
        if dataset is None or len(dataset) == 0:
            raise _nothing_usable(report, input, format)
        if output is not None:
            dataset = _save(dataset, output)
            report.output = str(output)
    finally:
        _remove_work_folder(work, output)
    _complete_report(report, dataset, started)
    if output is not None:
        report.save(output)
        write_checksums(output)  # last: it covers every file, and a folder without it is an unfinished build
    return DatasetBuild(dataset, report)


def build_dataset(
    format: str,
    input: str | Path | None = None,
    output: str | Path | None = None,
    sampling_rate: int = 500,
    seconds: float = 10.0,
    num_proc: int | None = None,
    limit: int | None = None,
    fill_missing_leads: bool = False,
    max_gap_seconds: float = 0.1,
    min_sampling_rate: float = 100.0,
    labels_csv: str | Path | None = None,
    seed: int = 0,
    shard_size: int = 200,
    cache_dir: str | Path | None = None,
    max_record_seconds: float = 3600.0,
    ptbxl_rate: str | int = "auto",
) -> datasets.Dataset:
    """Read an ECG collection into a memory-mapped `datasets.Dataset` in the EnECG schema (see `schema.ecg_features`).

    Args:
        format: one of `FORMATS`: `"mimic-iv-ecg"`, `"ptb-xl"`, `"challenge"`, `"ludb"`, `"jsonl"`, `"simulated"`.
        input: the collection's folder (the JSONL file for `"jsonl"`; unused for `"simulated"`).
        output: folder to `save_to_disk` the dataset and `build_report.json` into (replaced if it exists), with
            `checksums.json`, the content hash of every file (`checksums.verify_checksums` detects a file changed
            since); the returned dataset is then memory-mapped from it. Without it the Arrow files stay in a new
            temporary folder (under `cache_dir` if given), which the caller may delete when done.
        sampling_rate: stored rate in Hz; records are resampled to it.
        seconds: stored duration; longer records keep their first `seconds`, shorter ones are zero-padded.
        num_proc: worker processes.
        limit: read only the first `limit` records (for `"simulated"`: the number of records, default 1000).
        fill_missing_leads: zero-fill missing standard leads (listed in `missing_leads`) instead of skipping.
        max_gap_seconds: NaN/inf runs up to this long are interpolated; longer ones skip the record.
        min_sampling_rate: records sampled below this rate are skipped.
        labels_csv: MIMIC-IV-ECG only: CSV of age, sex and potassium per `subject_id` (and `study_id`).
        seed: seed of the simulated data.
        shard_size: records per generator shard (bounds the memory a worker holds).
        cache_dir: parent of the temporary folder used when `output` is not given (default: the system's).
        max_record_seconds: longer records are skipped (`too_long`), decided from their headers before their samples
            are read; records of more than `io_enecg.RecordLimits.max_values` values are skipped as `too_large`.
        ptbxl_rate: PTB-XL only: which record files to read. `"auto"`: `records500/` when the record has it, else
            `records100/` (`records100/` first for builds at 100 Hz or less); `"500"` / `"100"`: only that folder.
            Either way records are resampled to `sampling_rate`; `source_sampling_rate` keeps the file's rate.

    Returns:
        The dataset. `build(...)` returns it together with the [`BuildReport`].

    Raises:
        LayoutError: the input is missing or not laid out as `format` expects.
        DatasetBuildError: no record could be used.
    """
    return build(
        format, input, output, sampling_rate, seconds, num_proc, limit, fill_missing_leads, max_gap_seconds,
        min_sampling_rate, labels_csv, seed, shard_size, cache_dir, max_record_seconds, ptbxl_rate,
    ).dataset
