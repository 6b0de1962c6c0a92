"""The records of a run: loaded or built once, checked against the config, split into subject-wise folds."""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from pathlib import Path

import numpy as np

from ..configuration_enecg import EnECGConfig
from ..data.checksums import CHECKSUMS_FILE, CorruptFolder, verify_checksums
from .arguments import TrainScriptArguments
from .errors import TrainingSetupError
from .files import hash_json

logger = logging.getLogger(__name__)


def load_training_dataset(args: TrainScriptArguments, accelerator, cache_dir: Path):
    """The dataset of the run: loaded from `--dataset`, or built once (main process first) and cached on disk.

    Folders built by `enecg_hf.data` carry `checksums.json`: a `--dataset` folder whose files no longer match it is
    refused, a cached build is built again (`_cached_build`)."""
    if args.dataset:
        parts = [_load_dataset_folder(Path(folder)) for folder in args.dataset]
        dataset = parts[0] if len(parts) == 1 else _concatenate_sources(parts, args.dataset)
    else:
        key = hash_json({"format": args.data_format, "path": args.data_path and str(Path(args.data_path).resolve()),
                          "num_records": args.num_records, "limit": args.limit, "seed": args.seed})
        folder = cache_dir / f"dataset-{args.data_format}-{key}"
        with accelerator.main_process_first():
            if accelerator.is_main_process:
                _cached_build(args, folder)
            elif not folder.exists():
                raise RuntimeError(f"{folder} should have been written by the main process")
            dataset = _load_from_disk(folder, f"the cached dataset build {folder}")  # memory-mapped
    if args.limit is not None and args.limit < len(dataset):
        dataset = dataset.select(range(args.limit))
    if len(dataset) == 0:
        raise TrainingSetupError("The dataset has no records")
    return dataset


def _cached_build(args: TrainScriptArguments, folder: Path) -> None:
    """Make `folder` hold the checked build of `args`' data, building it when it is absent or damaged.

    Runs sharing the cache build it once: the builder holds a file lock (`.<folder>.lock`), and a second run waits
    for it and reads its build. The build goes to a temporary folder of its own, renamed into place when complete, so
    a killed build never looks finished (the next build removes its left-over). A build whose files no longer match
    their `checksums.json` is moved aside as `<folder>.corrupt`, with a warning, and built again."""
    from filelock import FileLock, Timeout  # installed with datasets and huggingface_hub

    folder.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder.with_name(f".{folder.name}.lock")))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        logger.info("Dataset: another run is building %s; waiting for it", folder)
        lock.acquire()
    try:
        if folder.exists():
            start = time.perf_counter()
            try:
                if verify_checksums(folder):
                    logger.info("Dataset: using the cached build %s (checksums verified in %.1f s)", folder,
                                time.perf_counter() - start)
                    return
                logger.warning("Dataset: the cached build %s has no %s (an unfinished build, or one of an earlier "
                               "release): it is built again", folder, CHECKSUMS_FILE)
                shutil.rmtree(folder)
            except CorruptFolder as error:
                aside = folder.with_name(f"{folder.name}.corrupt")
                logger.warning("Dataset: the cached build %s is corrupt (%s); it is moved aside as %s and built again",
                               folder, error, aside.name)
                shutil.rmtree(aside, ignore_errors=True)
                os.replace(folder, aside)
        for stale in folder.parent.glob(f".{folder.name}.tmp-*"):  # a killed build's (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = folder.with_name(f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}")
        _build_dataset(args, tmp)
        os.replace(tmp, folder)
    finally:
        lock.release()


def _load_from_disk(folder: Path, what: str):
    """`datasets.load_from_disk`, with an unreadable folder (a truncated Arrow file...) as a `TrainingSetupError`."""
    import datasets

    try:
        return datasets.load_from_disk(str(folder))
    except (OSError, ValueError, KeyError) as error:  # pyarrow's ArrowInvalid is a ValueError, its IO errors OSErrors
        raise TrainingSetupError(f"{what} cannot be read: {type(error).__name__}: {error}") from error


def _load_dataset_folder(path: Path):
    import datasets

    if not path.exists():
        raise TrainingSetupError(f"--dataset {path} does not exist")
    try:
        verify_checksums(path)
    except CorruptFolder as error:
        raise TrainingSetupError(f"--dataset {path} is corrupt ({error}): build it again (python -m enecg_hf.data)"
                                 ) from None
    dataset = _load_from_disk(path, f"--dataset {path}")
    if isinstance(dataset, datasets.DatasetDict):
        if "train" not in dataset:
            raise TrainingSetupError(f"--dataset {path} is a DatasetDict without a 'train' split: {list(dataset)}")
        dataset = dataset["train"]
    return dataset


def _concatenate_sources(parts: list, folders: list[str]):
    """Several built datasets as one: the columns they share (a source's extra columns, e.g. PTB-XL's `strat_fold`,
    are dropped). Their signals must have the same shape. Equal subject ids of different sources fall in the same
    fold (never split across train and test: a conservative grouping)."""
    import datasets

    common = [name for name in parts[0].column_names if all(name in part.column_names for part in parts)]
    dropped = sorted({name for part in parts for name in part.column_names} - set(common))
    if dropped:
        logger.info("--dataset: columns not in every dataset are left out: %s", dropped)
    parts = [part.select_columns(common) for part in parts]
    shapes = {folder: part.features["signal"].shape for folder, part in zip(folders, parts) if "signal" in common}
    if len(set(shapes.values())) > 1:
        raise TrainingSetupError(f"--dataset: the signals differ in shape (leads, samples): {shapes}")
    try:
        combined = datasets.concatenate_datasets(parts)
    except ValueError as error:
        raise TrainingSetupError(f"--dataset: the datasets cannot be combined: {error}") from error
    return _drop_copies_across_sources(combined, np.repeat(np.arange(len(parts)), [len(part) for part in parts]),
                                       folders)


def _drop_copies_across_sources(dataset, part_of_row: np.ndarray, folders: list[str], batch_size: int = 128):
    """The dataset with each recording once when several `--dataset` folders hold it (the first folder's copy kept):
    public collections re-publish each other's records under new ids and sometimes another gain (the Challenge 2020
    `HR*` records are PTB-XL records whose headers say 200 units/mV, so their signal is PTB-XL's times 5). Such a copy
    would sit in both the training and the test fold. A copy is a record of another folder whose signal is a positive
    multiple of a kept one: the same sample of largest magnitude in every lead, then equal to that multiple within
    float32 rounding (relative residual < 1e-4; a resampled or refiltered copy is not recognised).
    Each dropped record is logged with the one kept; within one folder the builder already drops identical signals."""
    if "signal" not in dataset.column_names:
        return dataset
    signals = dataset.select_columns(["signal"]).with_format("numpy")
    candidates: dict[tuple, list[int]] = {}
    copies: list[tuple[int, int, float]] = []
    for start in range(0, len(dataset), batch_size):
        batch = np.asarray(signals[start : start + batch_size]["signal"], dtype=np.float64)
        for offset, signal in enumerate(batch):
            row = start + offset
            key = tuple(np.abs(signal).argmax(axis=-1))
            for kept in candidates.get(key, []):
                if part_of_row[kept] == part_of_row[row]:
                    continue
                other = np.asarray(signals[kept]["signal"], dtype=np.float64).ravel()
                scale = float(signal.ravel() @ other) / max(float(other @ other), 1e-300)
                residual = np.linalg.norm(signal.ravel() - scale * other) / max(np.linalg.norm(signal), 1e-300)
                if scale > 0 and residual < 1e-4:  # float32 rounding of the same ADC values, nothing more
                    copies.append((row, kept, scale))
                    break
            else:
                candidates.setdefault(key, []).append(row)
    if not copies:
        return dataset
    ids = dataset.select_columns(["record_id"])["record_id"]
    for row, kept, scale in copies:
        logger.warning("--dataset: record %s of %s is the recording of %s of %s (%.2fx its amplitude): kept once, "
                       "from %s", ids[row], folders[part_of_row[row]], ids[kept], folders[part_of_row[kept]], scale,
                       folders[part_of_row[kept]])
    dropped = {row for row, _, _ in copies}
    logger.warning("--dataset: %d record(s) dropped as copies of records in an earlier folder", len(dropped))
    return dataset.select([row for row in range(len(dataset)) if row not in dropped])


def _build_dataset(args: TrainScriptArguments, output: Path):
    try:
        from ..data import build_dataset
    except ImportError as err:
        raise TrainingSetupError(f"--data_format needs enecg_hf.data.build_dataset, which failed to import: {err}") from err
    # For simulated data `limit` is the number of records to make; --num_records is the clearer spelling of it.
    limit = args.num_records if args.num_records is not None else args.limit
    logger.info("Building the %r dataset from %s (limit %s)", args.data_format, args.data_path, limit)
    start = time.perf_counter()
    try:
        dataset = build_dataset(args.data_format, args.data_path, output=output, limit=limit, seed=args.seed)
    except (ValueError, FileNotFoundError) as err:
        raise TrainingSetupError(f"--data_format {args.data_format} --data_path {args.data_path}: {err}") from err
    logger.info("Built %d records in %.1f s", len(dataset), time.perf_counter() - start)
    return dataset


def check_signal_compatibility(dataset, config: EnECGConfig) -> None:
    """Fail before training when records do not match what the config's model reads."""
    if "signal" not in dataset.column_names:
        raise TrainingSetupError(f"The dataset has no 'signal' column (columns: {dataset.column_names})")
    expected = (len(config.lead_names), config.input_length)
    shape = getattr(dataset.features["signal"], "shape", None)
    if shape is None:
        shape = np.asarray(dataset[0]["signal"]).shape
    if tuple(shape) != expected:
        raise TrainingSetupError(
            f"Records are {tuple(shape)} (leads x samples) but the config expects {expected} "
            f"({config.input_length} samples at {config.sampling_rate} Hz). Rebuild the dataset at "
            f"{config.sampling_rate} Hz / {config.input_length / config.sampling_rate:g} s, or use a config for this data."
        )
    if "sampling_rate" in dataset.column_names:
        rates = sorted({int(r) for r in dataset.unique("sampling_rate")})
        if rates != [config.sampling_rate]:
            raise TrainingSetupError(
                f"The dataset's sampling rate is {rates} Hz but the config expects {config.sampling_rate} Hz; rebuild "
                f"the dataset at {config.sampling_rate} Hz or use a config for this data"
            )


def drop_unusable_signals(dataset, keep, labels: np.ndarray, batch_size: int = 64) -> tuple[list[int], np.ndarray]:
    """Leave out (and name in a warning) the labelled records whose stored signal holds NaN/inf or an amplitude over
    `MAX_AMPLITUDE_MV`: the model cannot compute with them (a NaN would end feature caching or make the loss NaN).

    Args:
        dataset: the run's dataset (`record_id` and `signal` columns).
        keep: dataset rows of the labelled records; `labels` are their labels.

    Returns:
        `(keep, labels)` without the unusable records.
    """
    from ..preprocessing_enecg import MAX_AMPLITUDE_MV

    keep = np.asarray(keep, dtype=np.int64)
    signals = dataset.select(keep, keep_in_memory=True).select_columns(["signal"]).with_format("numpy")
    usable = np.ones(len(keep), dtype=bool)
    for start in range(0, len(keep), batch_size):
        batch = np.asarray(signals[start : start + batch_size]["signal"], dtype=np.float32)
        usable[start : start + batch_size] = (np.isfinite(batch).all(axis=(1, 2))
                                              & (np.abs(np.nan_to_num(batch)).max(axis=(1, 2)) <= MAX_AMPLITUDE_MV))
    if usable.all():
        return keep.tolist(), labels
    record_ids = dataset.select(keep[~usable]).with_format("arrow")["record_id"].to_pylist()
    logger.warning("%d records have a signal with NaN/inf values or an amplitude over %g mV; they are left out: %s%s",
                   len(record_ids), MAX_AMPLITUDE_MV, record_ids[:20], " ..." if len(record_ids) > 20 else "")
    if not usable.any():
        raise TrainingSetupError("No record has a usable signal (all hold NaN/inf or absurd amplitudes)")
    return keep[usable].tolist(), labels[usable]


def make_folds(dataset, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    from ..data import subject_kfold

    subjects = len(set(dataset["subject_id"])) if "subject_id" in dataset.column_names else len(dataset)
    if k > subjects:
        raise TrainingSetupError(f"--folds {k} needs at least {k} subjects; the dataset has {subjects}")
    folds = [(np.asarray(tr, dtype=np.int64), np.asarray(te, dtype=np.int64)) for tr, te in subject_kfold(dataset, k, seed)]
    for i, (train_idx, test_idx) in enumerate(folds):
        if len(train_idx) == 0 or len(test_idx) == 0:
            raise TrainingSetupError(f"Fold {i + 1} has an empty train or test split ({len(train_idx)}/{len(test_idx)} records)")
    return folds


