"""The record-level feature store (`enecg_hf.features`): values equal the model's own computation, a second run,
another label or a subset hit the store for every record, adding an expert computes only that expert, a killed run
or a half-written shard is completed by a rerun, a corrupt shard is recomputed with a logged reason, and two
processes store exactly what one process stores. The end-to-end ones run `train.py` and `python -m enecg_hf.features`
in subprocesses."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import accelerate_two_cpu_processes


REPO = Path(__file__).resolve().parents[1]
TINY = json.loads((REPO / "hub_configs" / "tiny.json").read_text())


def tiny_model(experts: list[str], seed: int = 0, **overrides):
    from enecg_hf import EnECGConfig, EnECGModel

    config = {k: v for k, v in TINY.items() if k != "model_type"}
    config["experts"] = [next(e for e in TINY["experts"] if e["name"] == name) for name in experts]
    config.update(overrides)
    torch.manual_seed(seed)
    return EnECGModel(EnECGConfig(**config)).eval()


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    from enecg_hf.data import build_dataset

    return build_dataset("simulated", None, output=tmp_path_factory.mktemp("sim") / "sim12", limit=12)


def build(dataset, model, store, **kwargs):
    from enecg_hf.features import build_features

    kwargs.setdefault("batch_size", 4)
    return build_features(dataset, model, None, store, progress=False, **kwargs)


def columns_of(table) -> dict[str, np.ndarray]:
    data = table.with_format("numpy")[:]
    return {name: np.asarray(data[name]) for name in table.column_names}


def assert_bit_identical(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype == np.float32 and a[name].shape == b[name].shape, name
        assert a[name].tobytes() == b[name].tobytes(), name


def computed(stats) -> dict[str, int]:
    return {column: s["computed"] for column, s in stats.items()}


# ------------------------------------------------------------------------------------------------ values and keys
def test_store_values_are_the_models_own_features_in_dataset_order(records, tmp_path):
    """A fresh store computes in the batches the model would, so the table is bit-identical to
    `model.compute_features` on those batches, with the columns and types training reads."""
    from enecg_hf.features import compute_features

    model = tiny_model(["dlinear", "timesnet", "tempo"])
    table, stats = build(records, model, tmp_path / "store")
    assert table.column_names == ["embedding_dlinear", "embedding_timesnet", "embedding_tempo", "gate_inputs"]
    assert str(table.features["gate_inputs"]) == "List(Value('float32'), length=500)"
    assert computed(stats) == dict.fromkeys(table.column_names, 12)
    signals = torch.from_numpy(np.asarray(records.with_format("numpy")["signal"], dtype=np.float32))
    got = columns_of(table)
    for start in range(0, 12, 4):
        embeddings, gate = compute_features(model, signals[start : start + 4])
        for name, e in zip(model.expert_names, embeddings):
            assert got[f"embedding_{name}"][start : start + 4].tobytes() == e.numpy().tobytes(), name
        assert got["gate_inputs"][start : start + 4].tobytes() == gate.numpy().tobytes()


def test_a_feature_table_from_the_model_holds_the_stores_values(records, tmp_path, monkeypatch):
    """`FeatureTable.from_model` (records in memory) and the store (records of a dataset) run the same frozen pass:
    computed in the same batches, the table's embeddings and gate inputs are bit-identical to the store's. The pass
    leaves the global RNG as it was, even with an expert that draws random numbers (so dropout masks downstream do
    not depend on where the features came from)."""
    from enecg_hf.features import FeatureTable

    model = tiny_model(["dlinear", "timesnet", "tempo"])
    table, _ = build(records, model, tmp_path / "store")
    expert = model.experts["timesnet"]
    monkeypatch.setattr(expert, "forward", lambda x, forward=expert.forward: (torch.rand(1), forward(x))[1])
    signals = torch.from_numpy(np.asarray(records.with_format("numpy")["signal"], dtype=np.float32))
    torch.manual_seed(3)
    from_model = FeatureTable.from_model(model, signals, torch.zeros(12), batch_size=4)
    after = torch.rand(4)
    torch.manual_seed(3)
    assert torch.equal(after, torch.rand(4))
    stored = FeatureTable.from_columns(table.with_format("torch")[:], model.expert_names, torch.zeros(12))
    assert [e.dtype for e in from_model.expert_embeddings] == [torch.float32] * 3
    for name, a, b in zip(model.expert_names, from_model.expert_embeddings, stored.expert_embeddings):
        assert a.numpy().tobytes() == b.numpy().tobytes(), name
    assert from_model.gate_inputs.numpy().tobytes() == stored.gate_inputs.numpy().tobytes()


def test_record_keys_follow_the_records_not_the_dataset(records):
    """Keys are source, record id and a hash of the signal: a new dataset fingerprint (a no-op map) or another row
    order keeps them; an edited signal changes its record's key."""
    from enecg_hf.features import record_keys

    keys = record_keys(records)
    assert len(set(keys)) == 12 and keys[0].startswith("simulated|")
    remapped = records.map(lambda row: row, features=records.features)
    assert remapped._fingerprint != records._fingerprint and record_keys(remapped) == keys
    assert record_keys(records.select([5, 2])) == [keys[5], keys[2]]

    def edit(row, index):
        if index == 3:
            signal = np.asarray(row["signal"], dtype=np.float32)
            signal[0, 0] += 0.001
            row["signal"] = signal.tolist()
        return row

    edited = record_keys(records.map(edit, with_indices=True, features=records.features))
    assert edited[3] != keys[3] and edited[:3] == keys[:3] and edited[4:] == keys[4:]


def test_fingerprints_are_per_expert_and_cover_weights_and_the_fields_it_reads():
    from enecg_hf.features import column_fingerprints

    base = column_fingerprints(tiny_model(["dlinear", "timesnet"]))
    assert base == column_fingerprints(tiny_model(["dlinear", "timesnet"]))  # deterministic
    assert set(base) == {"embedding_dlinear", "embedding_timesnet", "gate_inputs"}
    assert base["embedding_dlinear"].startswith("dlinear-") and base["gate_inputs"].startswith("gate-")
    other_weights = column_fingerprints(tiny_model(["dlinear", "timesnet"], seed=1))
    assert other_weights["embedding_dlinear"] != base["embedding_dlinear"]
    assert other_weights["gate_inputs"] == base["gate_inputs"]  # the gate input has no weights
    # Heads, gate, label and task are not read by the experts.
    regression = column_fingerprints(tiny_model(["dlinear", "timesnet"], head_hidden_size=8, label_name="age"))
    assert regression == base
    per_lead = column_fingerprints(tiny_model(["dlinear", "timesnet"], normalization="lead"))
    assert not set(per_lead.values()) & set(base.values())
    gate_length = column_fingerprints(tiny_model(["dlinear", "timesnet"], gate_input_length=250))
    assert gate_length["gate_inputs"] != base["gate_inputs"]
    assert {k: v for k, v in gate_length.items() if k != "gate_inputs"} == {
        k: v for k, v in base.items() if k != "gate_inputs"}



def test_a_new_computation_of_an_expert_gets_a_new_fingerprint(monkeypatch):
    """An expert whose code computes differently from the same weights (DeepFADE's compiled plan: version 2) does not
    reuse the values of its old code; the other columns keep their folders."""
    from enecg_hf.expert_dlinear import EnECGDLinearExpert
    from enecg_hf.features import column_fingerprints, model_columns

    base = column_fingerprints(tiny_model(["dlinear", "timesnet"]))
    monkeypatch.setattr(EnECGDLinearExpert, "COMPUTATION_VERSION", 2)
    bumped = column_fingerprints(tiny_model(["dlinear", "timesnet"]))
    assert bumped["embedding_dlinear"] != base["embedding_dlinear"]
    assert {k: v for k, v in bumped.items() if k != "embedding_dlinear"} == {
        k: v for k, v in base.items() if k != "embedding_dlinear"}
    deepfade = next(c for c in model_columns(tiny_model(["deepfade"])) if c.column == "embedding_deepfade")
    assert deepfade.description["computation"] == 2


def test_random_experts_do_not_depend_on_the_task_so_every_label_shares_the_store():
    """Every expert of the default tiny config - ECG-FM nests a transformers model that `post_init` re-initialises -
    gets the same random weights, and so the same store columns, whatever the task's heads are: a regression, a
    2-class, a 6-class and a multi-task model, as train.py configures them."""
    from enecg_hf import EnECGModel
    from enecg_hf.data import TASKS
    from enecg_hf.features import column_fingerprints
    from enecg_hf.training import TrainScriptArguments
    from enecg_hf.training.configs import build_config

    def fingerprints(task):
        torch.manual_seed(0)
        return column_fingerprints(EnECGModel(build_config(TrainScriptArguments(), task, TINY)))

    regression = fingerprints(TASKS["rr_interval"])
    assert len(regression) == len(TINY["experts"]) + 1
    for task in (TASKS["sex"], TASKS["arrhythmia"], [TASKS["age"], TASKS["sex"], TASKS["arrhythmia"]]):
        assert fingerprints(task) == regression, task


# ------------------------------------------------------------------------------------------------ reuse
def test_second_run_another_label_and_a_subset_hit_the_store_for_every_record(records, tmp_path, caplog):
    store = tmp_path / "store"
    first, stats = build(records, tiny_model(["dlinear", "timesnet"]), store)
    assert set(computed(stats).values()) == {12}
    full = columns_of(first)

    # Another task (a classification label) builds another model with the same experts: every value is found.
    caplog.clear()  # the first build's lines are captured too once an in-process train.py run set enecg_hf to INFO
    with caplog.at_level(logging.INFO, logger="enecg_hf.features"):
        again, stats = build(records, tiny_model(["dlinear", "timesnet"], label_name="sex", num_labels=2,
                                                 problem_type="single_label_classification"), store)
    assert set(computed(stats).values()) == {0}
    lines = [r.getMessage() for r in caplog.records if "Feature store:" in r.getMessage()]
    assert len(lines) == 3 and all(line.endswith("12 records: 12 found in the store, 0 computed") for line in lines)
    assert_bit_identical(columns_of(again), full)

    # A subset (records lacking a label left out), in another order, with another batch size.
    rows = [9, 1, 4, 5, 11]
    subset, stats = build(records.select(rows), tiny_model(["dlinear", "timesnet"]), store, batch_size=2)
    assert set(computed(stats).values()) == {0}
    assert_bit_identical(columns_of(subset), {k: v[rows] for k, v in full.items()})


def test_adding_records_or_an_expert_computes_only_what_is_missing(records, tmp_path):
    store = tmp_path / "store"
    build(records.select(range(8)), tiny_model(["dlinear", "features"]), store)
    # Four new records: only they are computed.
    _, stats = build(records, tiny_model(["dlinear", "features"]), store)
    assert computed(stats) == {"embedding_dlinear": 4, "embedding_features": 4, "gate_inputs": 4}
    # An expert appended to the config (the earlier ones keep their weights): only its column is computed.
    _, stats = build(records, tiny_model(["dlinear", "features", "timesnet"]), store)
    assert computed(stats) == {"embedding_dlinear": 0, "embedding_features": 0, "embedding_timesnet": 12,
                               "gate_inputs": 0}
    # --experts features: the features expert has no weights, so its column is found whatever else the model holds.
    _, stats = build(records, tiny_model(["features"], seed=7), store)
    assert computed(stats) == {"embedding_features": 0, "gate_inputs": 0}


# ------------------------------------------------------------------------------------------------ failures
def test_a_killed_run_and_a_half_written_shard_are_completed_by_a_rerun(records, tmp_path, monkeypatch):
    """The run dies after its first shard (as a SIGKILL would: no clean-up), leaving a half-written temporary file;
    the rerun ignores the temporary file, keeps the finished shard and computes only the rest."""
    from enecg_hf.features import FeatureStore

    model = tiny_model(["timesnet"])
    reference, _ = build(records, model, tmp_path / "reference")

    store = tmp_path / "store"
    original = FeatureStore.write_shard
    writes = []

    def dying_write(self, column, keys, values):
        if writes:
            (self.folder(column) / ".tmp-shard-half.arrow-1-abc").write_bytes(b"ARROW1 half a file")
            raise KeyboardInterrupt("killed")
        writes.append(len(keys))
        return original(self, column, keys, values)

    monkeypatch.setattr(FeatureStore, "write_shard", dying_write)
    with pytest.raises(KeyboardInterrupt):
        build(records, model, store, shard_size=4)
    monkeypatch.setattr(FeatureStore, "write_shard", original)
    assert writes == [4]

    resumed, stats = build(records, model, store, shard_size=4)
    # timesnet's shard (the first written) survived; the gate input's did not get written.
    assert computed(stats) == {"embedding_timesnet": 8, "gate_inputs": 12}
    assert_bit_identical(columns_of(resumed), columns_of(reference))
    _, stats = build(records, model, store)
    assert set(computed(stats).values()) == {0}


@pytest.mark.parametrize("damage", ["truncate", "flip", "schema"])
def test_a_corrupt_shard_is_recomputed_with_a_logged_reason(records, tmp_path, caplog, damage):
    from enecg_hf.features import FeatureStore, model_columns

    model = tiny_model(["timesnet"])
    store = tmp_path / "store"
    reference, _ = build(records, model, store, shard_size=4)
    column = model_columns(model)[0]
    shard = FeatureStore(store).shards(column)[1]
    assert FeatureStore._open(shard, column.dim, verify=True)
    data = bytearray(shard.read_bytes())
    if damage == "truncate":
        shard.write_bytes(bytes(data[: len(data) // 2]))
    elif damage == "flip":  # one value's bytes: a well-formed file, only the hash tells
        import pyarrow as pa

        last = pa.ipc.open_stream(pa.BufferReader(bytes(data))).read_all().column("values")[-1].values
        offset = bytes(data).find(np.asarray(last, dtype=np.float32).tobytes())
        assert offset > 0
        data[offset + 2] ^= 0x01
        shard.write_bytes(bytes(data))
    else:  # a well-formed shard of the wrong width in the column's folder, instead of the real one
        bad = FeatureStore(store).write_shard(
            type(column)(column.column, column.folder, 3, {}), ["x"], np.zeros((1, 3), np.float32))
        shard.unlink()
    bad = shard if damage != "schema" else bad
    with caplog.at_level(logging.WARNING, logger="enecg_hf.features"):
        again, stats = build(records, model, store)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(bad) in w and "is corrupt" in w and "computed again" in w for w in warnings), warnings
    assert computed(stats) == {"embedding_timesnet": 4, "gate_inputs": 0}
    assert bad.with_name(bad.name + ".corrupt").exists()
    # Recomputed in the same batch, the shard has the same bytes again, hence the same (content-hash) name.
    assert shard.exists() and FeatureStore._open(shard, column.dim, verify=True)
    assert_bit_identical(columns_of(again), columns_of(reference))


def test_command_line_arguments():
    import dataclasses

    from enecg_hf.features.cli import FeatureScriptArguments, main, parse_args
    from enecg_hf.training import TrainingSetupError, TrainScriptArguments

    args = parse_args(["--data_format", "ludb", "--data_path", "x", "--experts", "dlinear,features"])
    assert args.experts == ["dlinear", "features"] and args.torch_threads == 1 and args.seed == 42
    for bad in ([], ["--dataset", "d", "--data_format", "ludb"], ["--dataset", "d", "--shard_size", "0"],
                ["--data_format", "ludb", "--num_records", "5"]):
        with pytest.raises(TrainingSetupError):
            parse_args(bad)
    with pytest.raises(SystemExit, match="--shard_size must be at least 1"):  # main() exits with the message
        main(["--dataset", "d", "--shard_size", "0"])
    # The options train.py also has are train.py's: the same defaults and argparse settings (help aside).
    train_fields = {f.name: f for f in dataclasses.fields(TrainScriptArguments)}
    shared = [f for f in dataclasses.fields(FeatureScriptArguments) if f.name in train_fields]
    assert len(shared) == 11
    for f in shared:
        source = train_fields[f.name]
        assert (f.default, f.default_factory) == (source.default, source.default_factory), f.name
        assert {k: v for k, v in f.metadata.items() if k != "help"} == {
            k: v for k, v in source.metadata.items() if k != "help"}, f.name


def test_default_location_is_the_shared_user_cache(monkeypatch, tmp_path):
    from enecg_hf.features import feature_store_dir

    monkeypatch.delenv("ENECG_HF_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert feature_store_dir() == Path.home() / ".cache" / "enecg_hf" / "features"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert feature_store_dir() == tmp_path / "xdg" / "enecg_hf" / "features"
    monkeypatch.setenv("ENECG_HF_CACHE", str(tmp_path / "mine"))
    assert feature_store_dir() == tmp_path / "mine" / "features"
    assert feature_store_dir(tmp_path / "cli") == tmp_path / "cli" / "features"


# ------------------------------------------------------------------------------------------------ end to end
def _run(command: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", **env}
    full_env.pop("WORLD_SIZE", None)
    result = subprocess.run(command, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result


def _store_contents(root: Path) -> dict[str, dict[str, bytes]]:
    """`{column folder: {key: value bytes}}` of a whole store."""
    import pyarrow as pa

    contents = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        rows = {}
        for shard in sorted(folder.glob("shard-*.arrow")):
            table = pa.ipc.open_stream(pa.memory_map(str(shard))).read_all()
            for key, values in zip(table.column("key").to_pylist(), table.column("values").to_numpy(zero_copy_only=False)):
                rows.setdefault(key, np.asarray(values, dtype=np.float32).tobytes())
        contents[folder.name] = rows
    return contents


EXTRACT = ["-m", "enecg_hf.features", "--config", "tiny", "--data_format", "simulated", "--num_records", "10",
           "--experts", "dlinear,timesnet,tempo", "--feature_batch_size", "3", "--shard_size", "3"]


@pytest.mark.slow
def test_two_processes_store_exactly_what_one_process_stores(tmp_path):
    """`accelerate launch --num_processes 2 --cpu -m enecg_hf.features` deals the batches of a one-process run to two
    gloo processes: the stores hold the same keys with bit-identical values, and a rerun finds everything."""
    _run([sys.executable, *EXTRACT, "--cache_dir", str(tmp_path / "one")], tmp_path)
    two = _run([*accelerate_two_cpu_processes(), *EXTRACT,
                "--cache_dir", str(tmp_path / "two")], tmp_path, MASTER_PORT=str(29500 + os.getpid() % 1000))
    assert "10 records, 2 processes" in two.stdout, two.stdout + two.stderr[-3000:]
    one, two_contents = _store_contents(tmp_path / "one" / "features"), _store_contents(tmp_path / "two" / "features")
    assert one.keys() == two_contents.keys() and len(one) == 4
    for folder in one:
        assert len(one[folder]) == 10 and one[folder] == two_contents[folder], folder
    # Both processes wrote shards (the batches were dealt, not computed twice).
    assert all(len(list((tmp_path / "two" / "features" / f).glob("shard-*"))) >= 2 for f in one)
    rerun = _run([sys.executable, *EXTRACT, "--cache_dir", str(tmp_path / "two")], tmp_path)
    assert re.findall(r"computed +(\d+)", rerun.stdout) == ["0"] * 4, rerun.stdout


@pytest.mark.slow
def test_a_sigkilled_extraction_keeps_its_timed_shards_and_the_rerun_computes_only_the_rest(tmp_path):
    """A shard is written every --shard_seconds as well as every --shard_size records: SIGKILL an extraction whose
    shard_size is never reached once timed shards exist; they survive, and the rerun computes exactly the records
    they do not hold, column by column."""
    import signal
    import time

    command = [sys.executable, "-m", "enecg_hf.features", "--config", "tiny", "--data_format", "simulated",
               "--num_records", "200", "--experts", "timesnet,dlinear", "--feature_batch_size", "1",
               "--shard_size", "1000", "--shard_seconds", "0.3", "--cache_dir", str(tmp_path / "cache")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    store = tmp_path / "cache" / "features"
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and process.poll() is None:
            folders = [p for p in store.glob("*-*") if p.is_dir()] if store.is_dir() else []
            if len(folders) == 3 and all(any(p.glob("shard-*.arrow")) for p in folders):
                break
            time.sleep(0.05)
        assert process.poll() is None, "the extraction finished before it could be killed"
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    stored = {folder: len(rows) for folder, rows in _store_contents(store).items()}
    assert len(stored) == 3 and all(0 < n < 200 for n in stored.values()), stored
    rerun = _run(command, tmp_path)
    computed_now = {folder: int(n) for folder, n in re.findall(r"(\S+-[0-9a-f]{16}) +found +\d+ +computed +(\d+)",
                                                                rerun.stdout)}
    assert computed_now == {folder: 200 - n for folder, n in stored.items()}, rerun.stdout
    assert all(len(rows) == 200 for rows in _store_contents(store).values())


@pytest.mark.slow
def test_training_sex_age_and_rr_interval_runs_every_expert_once(tmp_path):
    """The issue's check: three labels trained one after another on the same records (each run builds its own dataset
    in its own output folder) compute the expert features in the first run only; the later runs find every record
    in the store. Then `python -m enecg_hf.features` filled ahead of time makes even the first run a full hit."""
    train = [sys.executable, str(REPO / "train.py"), "--config", "tiny", "--data_format", "simulated",
             "--num_records", "16", "--experts", "dlinear,timesnet,features", "--epochs", "2", "--inner_folds", "2",
             "--gate_epochs", "2", "--folds", "2"]
    env = {"ENECG_HF_CACHE": str(tmp_path / "cache")}
    logs = {}
    for label in ("sex", "age", "rr_interval"):
        logs[label] = _run([*train, "--label", label, "--output_dir", label], tmp_path, **env).stderr
    lines = {label: re.findall(r"Feature store: (\S+) \(\S+\): (\d+) records: (\d+) found in the store, (\d+) computed",
                               log) for label, log in logs.items()}
    assert len(lines["sex"]) == 4 and all(line[1:] == ("16", "0", "16") for line in lines["sex"]), lines
    for label in ("age", "rr_interval"):
        assert len(lines[label]) == 4 and all(line[1:] == ("16", "16", "0") for line in lines[label]), lines
    assert json.loads((tmp_path / "rr_interval" / "metrics.json").read_text())["records"] == 16
    assert not list((tmp_path / "sex" / "cache").glob("features*"))  # nothing per output folder any more

    # Filled ahead of training by the command: the first training run finds everything.
    env = {"ENECG_HF_CACHE": str(tmp_path / "ahead")}
    _run([sys.executable, "-m", "enecg_hf.features", "--config", "tiny", "--data_format", "simulated", "--num_records",
          "16", "--experts", "dlinear,timesnet,features"], tmp_path, **env)
    assert not [p for p in (tmp_path / "ahead" / "features").iterdir() if p.name.startswith(".work")]
    log = _run([*train, "--label", "age", "--output_dir", "age_ahead"], tmp_path, **env).stderr
    assert log.count("16 found in the store, 0 computed") == 4, log[-3000:]
