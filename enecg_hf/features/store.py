"""The record-level feature store: what the frozen experts compute from a record, computed once and kept on disk.

Layout (see docs/training.md, "The feature store"):

    <root>/<kind>-<fingerprint>/info.json             what the fingerprint covers (written once)
    <root>/<kind>-<fingerprint>/shard-<digest>.arrow  Arrow IPC stream files: `key` (string), `values` (float32[dim])

One folder per *column* of the model's frozen pass (`EnECGModel.frozen_columns`): each expert's embedding
(`<expert type>-<fingerprint>`) and the gate's input (`gate-<fingerprint>`). A column's fingerprint covers what the
model says its values are computed from - the config fields its code declares it reads (an expert's entry without its
name, the fields that pick, resample and normalise its leads), the precision it runs at unless float32
(`model.set_expert_precision`) and its computation version from 2 on - and the dtype, shape and bytes of its float32
weights; so `--experts a,b`, adding or renaming an expert, or another label or task reuse every column that exists.
The values are what `model.compute_frozen_columns` returns, the same function `EnECGModel.compute_features` runs, run
by `compute.compute_feature_batch` as for `FeatureTable.from_model` (`table`). A row's key is the record's identity:
`source`, `record_id` and a hash of its stored float32 signal (so an edited record is recomputed); never the dataset's
fingerprint, the number of processes, the label or the subset.

A shard is serialised in memory, written under a temporary name (`.tmp-…`) and renamed to `shard-<digest>.arrow`
where the digest is a hash of the file's bytes: a killed writer leaves at most a temporary file that readers ignore,
and a shard whose bytes no longer match its name (truncated, overwritten) is reported, moved aside as
`<name>.corrupt` and its records are computed again. Shards are memory-mapped when read.

Missing values are computed in batches of records in dataset order (the batches one process would compute); with
several processes the batches are dealt round-robin, so N processes compute exactly the batches of one process and the
store holds bit-identical values. Each process writes a column's shard every `shard_size` records or every
`shard_seconds` seconds of computing, whichever comes first, so a kill loses at most that much work (a minute, for an
expert that takes seconds per record) and a rerun computes only what is still missing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..data.checksums import content_digest, file_digest
from ..modeling_enecg import embedding_column  # the names of the columns training reads (re-exported)
from .compute import compute_feature_batch


logger = logging.getLogger(__name__)

# Bump when the meaning of stored values changes without any fingerprinted input changing (e.g. an expert's code).
STORE_FORMAT = 1
CACHE_ENV = "ENECG_HF_CACHE"
SHARD_PREFIX = "shard-"
SHARD_SUFFIX = ".arrow"
TMP_PREFIX = ".tmp-"
# Temporary files older than this are left-overs of killed writers; the main process removes them when it scans.
STALE_TMP_SECONDS = 24 * 3600


def default_cache_root() -> Path:
    """`$ENECG_HF_CACHE`, else `$XDG_CACHE_HOME/enecg_hf`, else `~/.cache/enecg_hf`."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = Path(os.environ["XDG_CACHE_HOME"]).expanduser() if os.environ.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base / "enecg_hf"


def feature_store_dir(cache_dir: str | Path | None = None) -> Path:
    """The store's folder: `<cache_dir>/features`, with `cache_dir` defaulting to `default_cache_root()`."""
    return Path(cache_dir).expanduser() / "features" if cache_dir else default_cache_root() / "features"


def _hash(*parts: bytes) -> str:
    hasher = hashlib.blake2b(digest_size=16)
    for part in parts:
        hasher.update(part)
    return hasher.hexdigest()


def _json_bytes(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, default=str).encode()


# --------------------------------------------------------------------------------------------------- fingerprints
def weights_digest(module: torch.nn.Module) -> str:
    """Hash of a module's state dict: names, dtypes, shapes and bytes."""
    return tensors_digest(module.state_dict())


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """Hash of named tensors: names, dtypes, shapes and bytes (also what a training checkpoint's job file is checked
    against, `training.jobs`)."""
    hasher = hashlib.blake2b(digest_size=16)
    for key, tensor in sorted(tensors.items()):
        tensor = tensor.detach().cpu().contiguous()
        hasher.update(_json_bytes([key, str(tensor.dtype), list(tensor.shape)]))
        hasher.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return hasher.hexdigest()


@dataclass
class Column:
    """One stored column: its name in the table handed to training (the model's name of the frozen column), its store
    folder and what its fingerprint covers."""

    column: str
    folder: str                     # "<kind>-<fingerprint>"
    dim: int
    description: dict[str, Any]


def model_columns(model) -> list[Column]:
    """The columns of `model`'s frozen part, as `model.frozen_columns()` lists them (each expert's embedding in the
    model's order, then the gate input), with their fingerprints: a hash of what each is computed from, of its weights
    (hashed as float32: an int8 expert is a runtime copy of them), of the store format and of the package version."""
    from .. import __version__

    columns = []
    for frozen in model.frozen_columns():
        description = {"store_format": STORE_FORMAT, "enecg_hf": __version__, **frozen.depends_on}
        if frozen.weights is not None:
            description["weights"] = weights_digest(frozen.weights)
        columns.append(Column(frozen.name, f"{frozen.kind}-{_hash(_json_bytes(description))[:16]}", frozen.dim,
                              description))
    return columns


def column_fingerprints(model) -> dict[str, str]:
    """`{column: "<kind>-<fingerprint>"}` of every expert embedding and of the gate input."""
    return {c.column: c.folder for c in model_columns(model)}


def expert_fingerprint(model) -> str:
    """One hash of the whole frozen part: the fingerprints of every expert's embedding and of the gate input
    (`column_fingerprints`; each covers that column's config, weights and the global config fields it reads)."""
    folders = column_fingerprints(model)
    return hashlib.sha256("\n".join(f"{k}={v}" for k, v in folders.items()).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------- record keys
def signal_digest(signal: np.ndarray) -> str:
    signal = np.ascontiguousarray(signal, dtype=np.float32)
    return _hash(_json_bytes(list(signal.shape)), signal.tobytes())


def record_keys(dataset, rows: Sequence[int] | None = None, batch_size: int = 64) -> list[str]:
    """`source|record_id|<hash of the float32 signal>` of each row (all rows, or `rows`), in order."""
    rows = list(range(len(dataset))) if rows is None else list(rows)
    names = dataset.column_names
    ids = dataset.select_columns([c for c in ("source", "record_id") if c in names])
    signals = dataset.select_columns(["signal"]).with_format("numpy")
    keys = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        batch = np.asarray(signals[chunk]["signal"], dtype=np.float32)
        meta = ids[chunk] if ids.column_names else {}
        for i, signal in enumerate(batch):
            source = meta["source"][i] if "source" in meta else ""
            record_id = meta["record_id"][i] if "record_id" in meta else ""
            keys.append(f"{source or ''}|{record_id if record_id is not None else ''}|{signal_digest(signal)}")
    return keys


# --------------------------------------------------------------------------------------------------- the store
class CorruptShard(Exception):
    pass


class FeatureStore:
    """Arrow shards of `(key, values)` rows under `root/<column folder>/` (module docstring)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def folder(self, column: Column) -> Path:
        return self.root / column.folder

    def prepare(self, column: Column) -> None:
        folder = self.folder(column)
        folder.mkdir(parents=True, exist_ok=True)
        info = folder / "info.json"
        if not info.exists():
            tmp = folder / f"{TMP_PREFIX}info-{uuid.uuid4().hex}.json"
            tmp.write_text(json.dumps({"column": column.column, "dim": column.dim, **column.description},
                                      indent=2, sort_keys=True, default=str) + "\n")
            os.replace(tmp, info)

    def shards(self, column: Column) -> list[Path]:
        folder = self.folder(column)
        if not folder.is_dir():
            return []
        return sorted(p for p in folder.iterdir() if p.name.startswith(SHARD_PREFIX) and p.name.endswith(SHARD_SUFFIX))

    def remove_stale_tmp(self, column: Column) -> None:
        folder = self.folder(column)
        if not folder.is_dir():
            return
        for path in folder.glob(f"{TMP_PREFIX}*"):
            try:
                if time.time() - path.stat().st_mtime > STALE_TMP_SECONDS:
                    path.unlink()
            except OSError:
                pass

    @staticmethod
    def _open(path: Path, dim: int, verify: bool):
        """The shard's table (memory-mapped) and its keys. Raises `CorruptShard` with the reason."""
        import pyarrow as pa

        expected = path.name[len(SHARD_PREFIX) : -len(SHARD_SUFFIX)]
        if verify:
            digest = file_digest(path)
            if digest != expected:
                raise CorruptShard(f"its content hash {digest} is not the one in its name")
        try:
            table = pa.ipc.open_stream(pa.memory_map(str(path))).read_all()
        except (pa.ArrowException, OSError) as error:
            raise CorruptShard(f"unreadable Arrow stream: {error}") from error
        values_type = pa.list_(pa.float32(), dim)
        if table.column_names != ["key", "values"] or table.schema.field("values").type != values_type:
            raise CorruptShard(f"schema {table.schema} is not key: string, values: {values_type}")
        try:
            table.validate(full=True)
            keys = table.column("key").to_pylist()
        except (pa.ArrowException, UnicodeDecodeError) as error:
            raise CorruptShard(f"invalid content: {error}") from error
        return table, keys

    def _quarantine(self, path: Path, reason: str, records: str) -> None:
        logger.warning("Feature store: shard %s is corrupt (%s); it is moved aside as %s.corrupt and %s", path, reason,
                       path.name, records)
        try:
            os.replace(path, path.with_name(path.name + ".corrupt"))
        except OSError:  # another process moved it first
            pass

    def index(self, column: Column, wanted: set[str] | None = None, verify: bool = True,
              quarantine: bool = True) -> tuple[dict[str, tuple[int, int]], list]:
        """`{key: (shard number, row)}` of the stored rows (the first shard in name order wins) and the shard tables.

        Only shards holding a key of `wanted` (all, if None) are kept and, with `verify`, checked against the hash in
        their name. A corrupt shard is moved aside (`quarantine`) with a warning and its keys count as missing, or
        with `quarantine=False` raises `CorruptShard`."""
        locations: dict[str, tuple[int, int]] = {}
        tables = []
        for path in self.shards(column):
            try:
                table, keys = self._open(path, column.dim, verify=False)
                if wanted is not None and not wanted.intersection(keys):
                    continue
                if verify:
                    table, keys = self._open(path, column.dim, verify=True)
            except CorruptShard as error:
                if not quarantine:
                    raise CorruptShard(f"Feature store shard {path} is corrupt: {error}") from None
                self._quarantine(path, str(error), "its records are computed again")
                continue
            number = len(tables)
            tables.append(table)
            for row, key in enumerate(keys):
                locations.setdefault(key, (number, row))
        return locations, tables

    def write_shard(self, column: Column, keys: list[str], values: np.ndarray) -> Path:
        """Write one shard atomically: serialised in memory, written to a temporary file, renamed to its hash."""
        import pyarrow as pa

        values = np.ascontiguousarray(values, dtype=np.float32)
        if values.shape != (len(keys), column.dim):
            raise ValueError(f"{column.column}: values {values.shape} for {len(keys)} keys of dim {column.dim}")
        array = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), type=pa.float32()), column.dim)
        table = pa.table({"key": pa.array(keys, type=pa.string()), "values": array})
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        data = sink.getvalue().to_pybytes()
        folder = self.folder(column)
        path = folder / f"{SHARD_PREFIX}{content_digest(data)}{SHARD_SUFFIX}"
        tmp = folder / f"{TMP_PREFIX}{path.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return path


# --------------------------------------------------------------------------------------------------- building
def _compute(model, columns: list[Column], signal: np.ndarray) -> list[np.ndarray]:
    """The values of `columns` for a batch of raw records, as float32 arrays (`compute.compute_feature_batch`: the
    frozen pass of `EnECGModel.compute_features`, without gradients and without touching the global RNG)."""
    signal = np.array(signal, dtype=np.float32)
    # Records with NaN/inf are left out of training (training.records.drop_unusable_signals): their values are never
    # read, so they are computed on zeros rather than ending the run.
    signal[~np.isfinite(signal).all(axis=(1, 2))] = 0.0
    device = next(model.parameters()).device
    values = compute_feature_batch(model, torch.as_tensor(signal, device=device), [c.column for c in columns])
    return [values[c.column].cpu().numpy() for c in columns]


def _plan(keys: list[str], missing: list[set[str]], batch_size: int) -> list[tuple[list[int], list[int]]]:
    """Batches `(columns, rows)` of the missing values: each key once (its first row), grouped by which columns it
    lacks, in dataset order, `batch_size` rows a batch."""
    groups: dict[tuple[int, ...], list[int]] = {}
    seen = set()
    for row, key in enumerate(keys):
        if key in seen:
            continue
        seen.add(key)
        lacking = tuple(i for i, m in enumerate(missing) if key in m)
        if lacking:
            groups.setdefault(lacking, []).append(row)
    return [(list(cols), rows[s : s + batch_size]) for cols, rows in groups.items()
            for s in range(0, len(rows), batch_size)]


def build_features(dataset, model, state=None, store_dir: str | Path | None = None, batch_size: int = 16,
                   shard_size: int = 256, progress: bool = True, shard_seconds: float = 60.0):
    """Every record's expert embeddings and gate input, from the store, computing (and storing) only what is missing.

    Args:
        dataset: `datasets.Dataset` with a `signal` column (and `source`, `record_id` when it has them).
        model: the `EnECGModel` whose frozen part to run.
        state: an `accelerate.Accelerator` or `PartialState` (processes that share the work), or None (one process).
        store_dir: the store's folder (default `feature_store_dir()`).
        batch_size: records per forward pass of the experts.
        shard_size: a process writes a shard file every this many records of a column...
        shard_seconds: ... or when this many seconds have passed since the column's last shard (a killed run of a
            slow expert loses at most this much work), whichever comes first.

    Returns:
        `(table, stats)`: a `datasets.Dataset` with a column per expert (`embedding_<name>`) and `gate_inputs`, one
        row per dataset row in the dataset's order; and `{column: {"folder", "found", "computed"}}`.
    """
    start = time.perf_counter()
    store = FeatureStore(store_dir if store_dir is not None else feature_store_dir())
    index, count = (state.process_index, state.num_processes) if state is not None else (0, 1)
    main = index == 0
    columns = model_columns(model)
    keys = _all_record_keys(dataset, index, count)
    plan, stats = _plan_missing(store, columns, keys, batch_size, main, count)
    # Each process computes every count-th batch of the plan.
    mine = plan[index::count]
    if mine:
        description = f"Expert features (process 1 of {count}: its share)" if count > 1 else "Expert features"
        writer = _ShardWriter(store, columns, shard_size, shard_seconds)
        _compute_share(dataset, model, columns, keys, mine, writer, description if main and progress else None)
    if state is not None:
        state.wait_for_everyone()
    table = _read_table(store, columns, keys)
    if main:
        _log_summary(store, columns, keys, stats, count, time.perf_counter() - start)
    return table, stats


def build_feature_cache(dataset, model, accelerator, cache_dir: Path, batch_size: int, shard_size: int = 256):
    """`build_features`'s table (every record's expert embeddings and gate input, in dataset order) with the model's
    `expert_fingerprint`, as `train.py` reads them: `cache_dir` is the store's folder, `accelerator` the processes
    that share the missing batches."""
    features, _ = build_features(dataset, model, accelerator, cache_dir, batch_size=batch_size, shard_size=shard_size)
    return features, expert_fingerprint(model)


def _all_record_keys(dataset, index: int, count: int) -> list[str]:
    """Every row's record key: process `index` of `count` hashes a contiguous part of the records, then all get all."""
    bounds = np.linspace(0, len(dataset), count + 1).astype(int)
    keys = record_keys(dataset, range(bounds[index], bounds[index + 1]))
    if count > 1:
        from accelerate.utils import gather_object

        keys = gather_object(keys)
    return keys


def _plan_missing(store: FeatureStore, columns: list[Column], keys: list[str], batch_size: int, main: bool,
                  count: int) -> tuple[list[tuple[list[int], list[int]]], dict[str, dict[str, Any]]]:
    """`(plan, stats)`: the batches of missing values (`_plan`) and `{column: {"folder", "found", "computed"}}`. The
    main process looks up what is stored (preparing each column's folder) and plans; the others follow its plan."""
    plan_and_stats: list[Any] = [None]
    if main:
        unique = set(keys)
        missing, stats = [], {}
        for column in columns:
            store.prepare(column)
            store.remove_stale_tmp(column)
            found, _ = store.index(column, wanted=unique)
            lacking = unique.difference(found)
            missing.append(lacking)
            n_missing = sum(1 for k in keys if k in lacking)
            stats[column.column] = {"folder": column.folder, "found": len(keys) - n_missing, "computed": n_missing}
        plan_and_stats = [(_plan(keys, missing, batch_size), stats)]
    if count > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(plan_and_stats, from_process=0)
    return plan_and_stats[0]


class _ShardWriter:
    """Computed values of each column, written as a shard every `shard_size` records or `shard_seconds` seconds
    since the column's last shard, whichever comes first (so a kill loses at most that much work)."""

    def __init__(self, store: FeatureStore, columns: list[Column], shard_size: int, shard_seconds: float):
        self.store, self.columns = store, columns
        self.shard_size, self.shard_seconds = shard_size, shard_seconds
        self.pending: dict[int, tuple[list[str], list[np.ndarray]]] = {i: ([], []) for i in range(len(columns))}
        self.last_written = {i: time.monotonic() for i in range(len(columns))}

    def add(self, i: int, keys: list[str], values: np.ndarray) -> None:
        self.pending[i][0].extend(keys)
        self.pending[i][1].append(values)
        if len(self.pending[i][0]) >= self.shard_size or time.monotonic() - self.last_written[i] >= self.shard_seconds:
            self.flush(i)

    def flush(self, i: int) -> None:
        keys, values = self.pending[i]
        if keys:
            self.store.write_shard(self.columns[i], keys, np.concatenate(values))
            self.pending[i] = ([], [])
        self.last_written[i] = time.monotonic()

    def flush_all(self) -> None:
        for i in range(len(self.columns)):
            self.flush(i)


def _compute_share(dataset, model, columns: list[Column], keys: list[str], batches: list[tuple[list[int], list[int]]],
                   writer: _ShardWriter, progress: str | None) -> None:
    """Compute `batches` (`(column numbers, rows)`) of the plan with `model` in eval mode, handing every column's
    values to `writer`; `progress` is the progress bar's title (None: no bar)."""
    from tqdm.auto import tqdm

    signals = dataset.select_columns(["signal"]).with_format("numpy")
    was_training = model.training
    model.eval()
    bar = tqdm(total=sum(len(rows) for _, rows in batches), unit="record", disable=progress is None, desc=progress)
    for column_ids, rows in batches:
        values = _compute(model, [columns[i] for i in column_ids], signals[rows]["signal"])
        for i, v in zip(column_ids, values):
            writer.add(i, [keys[r] for r in rows], v)
        bar.update(len(rows))
    writer.flush_all()
    bar.close()
    model.train(was_training)


def _read_table(store: FeatureStore, columns: list[Column], keys: list[str]):
    """The stored values of `keys` as a `datasets.Dataset`, a column per store column, a row per key in order."""
    import datasets
    import pyarrow as pa

    unique = set(keys)
    arrays = {}
    for column in columns:
        locations, tables = store.index(column, wanted=unique, quarantine=False)
        absent = [k for k in unique if k not in locations]
        if absent:
            raise RuntimeError(f"Feature store {store.folder(column)}: {len(absent)} records are missing after they "
                               f"were computed (e.g. {absent[0]!r}); was the store changed during the run?")
        if not tables:
            arrays[column.column] = pa.FixedSizeListArray.from_arrays(pa.array([], pa.float32()), column.dim)
            continue
        offsets = np.cumsum([0] + [len(t) for t in tables])
        rows = np.fromiter((offsets[locations[k][0]] + locations[k][1] for k in keys), dtype=np.int64, count=len(keys))
        values = pa.chunked_array([c for t in tables for c in t.column("values").chunks])
        arrays[column.column] = values.take(pa.array(rows)).combine_chunks()
    return datasets.Dataset(datasets.table.InMemoryTable(pa.table(arrays)))


def _log_summary(store: FeatureStore, columns: list[Column], keys: list[str], stats: dict[str, dict[str, Any]],
                 count: int, seconds: float) -> None:
    for column in columns:
        s = stats[column.column]
        logger.info("Feature store: %s (%s): %d records: %d found in the store, %d computed", column.column,
                    column.folder, len(keys), s["found"], s["computed"])
    logger.info("Expert features of %d records ready in %.1f s: %d of %d columns computed for some records "
                "(%d processes; store %s)", len(keys), seconds, sum(1 for s in stats.values() if s["computed"]),
                len(columns), count, store.root)
