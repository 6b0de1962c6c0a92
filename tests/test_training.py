"""End-to-end tests of `train.py` (enecg_hf.training): the no-argument main job, real LUDB records, two processes,
cached against recomputed expert features, kill-and-resume, reloading the output folder, and bad input.

Runs go through the command line in subprocesses, as users start them. The small runs share one simulated dataset and
one reference run; learning rates are high so that a few epochs move the weights far from their initial values (an
equality between two runs then says something).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import BLOCK_ENECG, SHARED_DATA, accelerate_two_cpu_processes


REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "train.py"

# How far the main job's figures may move from those the README states, which are measured with the pinned versions
# (.ci/constraints.txt), in ms. On one machine the run is deterministic (three runs, with 1 and 2 threads: the same
# figures to the last digit; MKL's COMPATIBLE code path, standing in for another CPU, moved them by 0.01 ms).
# Elsewhere float rounding differs and an inner-CV epoch choice can flip, moving a fold's MAE by a few ms: the fresh
# venv of issue 25, on another machine, printed CV MAE 28.56 ± 9.2 and quickstart 16.3 where this one printed
# 26.62 ± 9.58 and 16.4 (eight experts, before the median-beat one; nine: 25.72 ± 4.54 and 26.0; with the heads'
# linear paths, Huber loss and sparse stacking: 19.59 ± 12.8 and 6.0, 5.7 in another process; with the paired
# stacking rule 19.88 ± 11.8 and 8.2). The bounds are 1.5x
# the largest of those moves (1.9 ms); a dependency change exceeds them: neurokit2 0.2.13 instead of 0.3.0 gave 25.92 ±
# 3.82 and a quickstart MAE of 27.9 (eight experts, checked). The mean predictor's figures move only by the README's
# rounding.
MAIN_JOB_TOLERANCE_MS = {"cv_mae_mean": 3.0, "cv_mae_std": 3.0, "baseline": 0.1, "quickstart_mae": 3.0}

# Small runs: two cheap experts, 24 simulated records, 2 folds of 12.
SMALL_RUN = ["--config", "tiny", "--label", "rr_interval", "--experts", "dlinear,timesnet", "--epochs", "4",
             "--inner_folds", "2", "--gate_epochs", "3", "--batch_size", "4", "--learning_rate", "1e-2", "--folds", "2"]

def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false", **extra}
    env.pop("WORLD_SIZE", None)
    return env


def run_command(command: list[str], cwd: Path, expect: int | None = 0, **env: str) -> subprocess.CompletedProcess:
    start = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, env=_env(**env), capture_output=True, text=True, timeout=900)
    print(f"$ {' '.join(map(str, command))}  ({time.perf_counter() - start:.1f} s, exit {result.returncode})")
    if expect is not None:
        assert result.returncode == expect, f"exit {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}"
    return result


def train(*args: str, cwd: Path, expect: int | None = 0, launcher: list[str] | None = None, **env: str):
    return run_command([*(launcher or [sys.executable]), str(TRAIN), *args], cwd, expect, **env)


def metrics_of(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


def assert_same_metrics(a: dict, b: dict, rtol: float) -> None:
    for fold_a, fold_b in zip(a["folds"], b["folds"], strict=True):
        for name, value in fold_a["metrics"].items():
            assert fold_b["metrics"][name] == pytest.approx(value, rel=rtol, abs=1e-9), (name, fold_a, fold_b)
    for name, value in a["final"]["metrics"].items():
        assert b["final"]["metrics"][name] == pytest.approx(value, rel=rtol, abs=1e-9), name


def trained_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for k, v in load_file(str(folder / "model.safetensors")).items() if not k.startswith("experts.")}


# ------------------------------------------------------------------------------------------------ shared runs
@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("training")


@pytest.fixture(scope="module")
def sim_dataset(work) -> Path:
    folder = work / "sim24"
    run_command([sys.executable, "-m", "enecg_hf.data", "--format", "simulated", "--limit", "24", "--output",
                 str(folder)], work)
    return folder


@pytest.fixture(scope="module")
def reference_run(work, sim_dataset) -> Path:
    train("--dataset", str(sim_dataset), *SMALL_RUN, "--output_dir", "reference", cwd=work)
    return work / "reference"


@pytest.fixture(scope="module")
def main_job(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess, float]:
    """`python train.py` with no arguments, from an empty folder (as in the README's main-job command)."""
    cwd = tmp_path_factory.mktemp("main_job")
    start = time.perf_counter()
    result = train(cwd=cwd)
    return cwd / "outputs" / "enecg-tiny-rr_interval", result, time.perf_counter() - start


# ------------------------------------------------------------------------------------------------ the main job
@pytest.mark.slow
def test_main_job_without_arguments_learns_rr_and_writes_a_hub_ready_folder(main_job):
    folder, result, seconds = main_job
    print(f"main job: {seconds:.0f} s")
    metrics = metrics_of(folder)
    assert metrics["label"] == "rr_interval" and metrics["unit"] == "ms" and metrics["records"] == 300
    assert len(metrics["folds"]) == 3 and all(f["test_records"] > 0 for f in metrics["folds"])
    # The ensemble learns RR intervals: far better than the mean predictor fitted on the same training folds.
    assert metrics["cv"]["mae"]["mean"] < 0.5 * metrics["cv_baseline"]["mae"]["mean"], metrics["cv"]
    assert metrics["cv"]["r2"]["mean"] > 0.3, metrics["cv"]
    assert "CV       mae:" in result.stdout and str(folder.resolve()) in result.stdout

    files = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "README.md", "metrics.json", "training_args.json",
            "configuration_enecg.py", "modeling_enecg.py", "adapter"} <= files
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_enecg.EnECGModel"
    (task,) = config["tasks"]
    assert task["name"] == "rr_interval" and task["target_std"] > 0
    assert (folder / "adapter" / "adapter_model.safetensors").is_file()
    card = (folder / "README.md").read_text()
    assert card.startswith("---\n") and "model-index:" in card and "- ecg" in card and "RANDOM weights" in card
    assert "license: apache-2.0" in card and "3-fold cross-validation" in card
    # The card says how the heads and the gate were fitted, with the epochs each expert got.
    # A regression's linear paths are sparse by default: the card says how many inputs each reads.
    assert "sparse (relaxed lasso" in card and "inputs read: moment " in card and "Mean gate weights" in card
    assert "for the epochs that inner cross-validation confirmed (0: the linear map alone): moment " in card
    training_args = json.loads((folder / "training_args.json").read_text())
    # The main job runs with the default training settings.
    assert training_args["epochs"] == 100 and training_args["strategy"] == "stacked"
    assert training_args["data_format"] == "simulated"
    assert metrics["cv_verdict"]["beats_baseline"] is True and not metrics["warnings"]
    assert set(metrics["final"]["gate_weights"]) == {e["name"] for e in config["experts"]}
    assert all(f["fit"]["expert_epochs"] for f in metrics["folds"])
    # The figures the README states for the main job are the ones it prints (within MAIN_JOB_TOLERANCE_MS).
    stated = re.search(r"RR MAE ([\d.]+) ± ([\d.]+) ms against ([\d.]+) ± ([\d.]+) ms", (REPO / "README.md").read_text())
    assert stated, "README.md no longer states the main job's figures as 'RR MAE m ± s ms against m ± s ms'"
    cv, baseline = metrics["cv"]["mae"], metrics["cv_baseline"]["mae"]
    tolerance = MAIN_JOB_TOLERANCE_MS
    for name, printed, readme, abs_tolerance in zip(
            ["CV MAE mean", "CV MAE std", "baseline mean", "baseline std"],
            [cv["mean"], cv["std"], baseline["mean"], baseline["std"]], map(float, stated.groups()),
            [tolerance["cv_mae_mean"], tolerance["cv_mae_std"], tolerance["baseline"], tolerance["baseline"]]):
        assert abs(printed - readme) <= abs_tolerance, f"{name}: the run printed {printed:.2f}, README.md says {readme}"


@pytest.mark.slow
def test_main_job_output_reloads_and_predicts_new_records(main_job):
    """The saved folder predicts the RR interval of simulated records it never saw, both with the package installed and
    with `trust_remote_code=True` in a process where enecg_hf cannot be imported (identical outputs)."""
    import enecg_hf  # noqa: F401  (registers the Auto classes)
    from enecg_hf.data.simulate import simulate_record
    from transformers import AutoModel

    folder = main_job[0]
    records = [simulate_record(index, seed=12345) for index in range(8)]
    inputs = np.stack([signal for signal, _ in records])
    truth = np.array([labels["rr_interval"] for _, labels in records])
    model = AutoModel.from_pretrained(folder).eval()
    assert not any(p.requires_grad for p in model.experts.parameters())
    with torch.no_grad():
        output = model(torch.from_numpy(inputs))
    predicted = output.logits[:, 0].numpy()
    torch.testing.assert_close(output.gate_weights.sum(-1), torch.ones(8))
    metrics = metrics_of(folder)
    assert np.abs(predicted - truth).mean() < 0.5 * metrics["cv_baseline"]["mae"]["mean"], (predicted, truth)

    np.save(folder.parent / "inputs.npy", inputs)
    script = BLOCK_ENECG + textwrap.dedent(
        f"""
        import numpy as np, torch
        from transformers import AutoModel
        model = AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        with torch.no_grad():
            logits = model(torch.from_numpy(np.load({str(folder.parent / 'inputs.npy')!r}))).logits
        print("LOGITS", logits[:, 0].tolist())
        """
    )
    result = run_command([sys.executable, "-c", script], folder.parent,
                         HF_MODULES_CACHE=str(folder.parent / "modules"))
    remote = json.loads(result.stdout.split("LOGITS", 1)[1].strip())
    np.testing.assert_array_equal(np.asarray(remote, dtype=np.float32), predicted)


# ------------------------------------------------------------------------------------------------ equivalences
def test_saved_model_reproduces_its_saved_metrics(reference_run, sim_dataset):
    import datasets
    import enecg_hf  # noqa: F401
    from transformers import AutoModel

    from enecg_hf.data import TaskSpec
    from enecg_hf.training import load_metric, score

    model = AutoModel.from_pretrained(reference_run).eval()
    dataset = datasets.load_from_disk(str(sim_dataset)).with_format("numpy")
    with torch.no_grad():
        logits = model(torch.from_numpy(np.asarray(dataset["signal"], dtype=np.float32))).logits.numpy()
    label = TaskSpec("rr_interval", "regression", unit="ms")
    recomputed = score({"logits": logits, "labels": np.asarray(dataset["rr_interval"])}, label,
                       load_metric("regression"))
    saved = metrics_of(reference_run)["final"]["metrics"]
    assert recomputed == pytest.approx(saved, rel=1e-5)
    # Training moved the heads: the saved model is not its own initialisation.
    assert saved["mae"] != pytest.approx(metrics_of(reference_run)["cv_baseline"]["mae"]["mean"], rel=1e-3)


def test_cached_and_recomputed_expert_features_train_the_same_model(work, sim_dataset, reference_run):
    train("--dataset", str(sim_dataset), *SMALL_RUN, "--no-cache_features", "--output_dir", "uncached", cwd=work)
    uncached = work / "uncached"
    assert metrics_of(reference_run)["cache_features"] and not metrics_of(uncached)["cache_features"]
    assert not (uncached / "cache").exists() or not list((uncached / "cache").glob("features-*"))
    assert_same_metrics(metrics_of(reference_run), metrics_of(uncached), rtol=1e-5)
    reference, other = trained_weights(reference_run), trained_weights(uncached)
    assert reference.keys() == other.keys()
    for key in reference:
        torch.testing.assert_close(other[key], reference[key], rtol=1e-4, atol=1e-6, msg=key)


def test_two_cpu_processes_with_accelerate_launch(work, sim_dataset, reference_run):
    """`accelerate launch --num_processes 2 --cpu train.py` runs two gloo processes (accelerate itself would start
    one: huggingface/accelerate#2741) that share the jobs of every fit and train the one-process model."""
    result = train("--dataset", str(sim_dataset), *SMALL_RUN, "--output_dir", "two_processes", cwd=work,
                   launcher=accelerate_two_cpu_processes(),
                   MASTER_PORT=str(29500 + os.getpid() % 1000))
    one, two = metrics_of(reference_run), metrics_of(work / "two_processes")
    assert one["num_processes"] == 1 and two["num_processes"] == 2, result.stderr[-2000:]
    assert_same_metrics(one, two, rtol=1e-5)
    # Main-process-only output: one summary, one model folder.
    assert result.stdout.count("EnECG training:") == 1
    # Both processes ran jobs.
    assert result.stderr.count("Jobs of this process:") >= 1


def _job_files(folder: Path) -> list[Path]:
    return sorted((folder / "checkpoints").rglob("job-*.safetensors"))


def test_killed_run_resumes_to_the_uninterrupted_result(work, sim_dataset, reference_run):
    args = ["--dataset", str(sim_dataset), *SMALL_RUN, "--output_dir", "resumed"]
    folder = work / "resumed"
    # Kill the run (SIGKILL: no clean-up) once fold 1 is finished and fold 2 has started.
    process = subprocess.Popen([sys.executable, str(TRAIN), *args], cwd=work, env=_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and not list((folder / "checkpoints" / "fold-2").rglob("job-*.safetensors")):
        assert process.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    process.kill()
    process.wait()
    assert not (folder / "metrics.json").exists()
    assert (folder / "checkpoints" / "fold-1" / "result.json").is_file()
    finished = _job_files(folder)
    # A job killed while it was being written leaves only a temporary file, which resuming ignores.
    (folder / "checkpoints" / "fold-2" / "final" / ".job-1.safetensors.tmp-0").parent.mkdir(parents=True, exist_ok=True)
    (folder / "checkpoints" / "fold-2" / "final" / ".job-1.safetensors.tmp-0").write_bytes(b"half a file")

    changed = train(*args, "--learning_rate", "5e-3", "--resume_from_checkpoint", "latest", cwd=work, expect=None)
    assert changed.returncode != 0 and "arguments differ" in changed.stderr + changed.stdout

    resumed = train(*args, "--resume_from_checkpoint", "latest", cwd=work)
    assert "fold-1: finished in an earlier run" in resumed.stderr
    reused = int(resumed.stderr.split("Jobs of this process:")[1].split("run,")[1].split("reused")[0])
    assert reused == len(finished) - len(list((folder / "checkpoints" / "fold-1").rglob("job-*"))), resumed.stderr
    assert_same_metrics(metrics_of(reference_run), metrics_of(folder), rtol=1e-6)
    reference, other = trained_weights(reference_run), trained_weights(folder)
    for key in reference:
        torch.testing.assert_close(other[key], reference[key], rtol=1e-6, atol=1e-7, msg=key)


def test_resuming_never_reads_files_it_did_not_write(work, sim_dataset, reference_run, tmp_path):
    """accelerate's `load_state` unpickles `custom_checkpoint_*.pkl` files; our checkpoints are safetensors and JSON
    only, and a resumed run refuses anything else instead of reading it."""
    import shutil

    folder = tmp_path / "run"
    shutil.copytree(reference_run, folder)
    marker = tmp_path / "pwned"
    payload = (f"import pickle, os\nclass P:\n    def __reduce__(self):\n        return (os.system, ('touch {marker}',))\n"
               f"pickle.dump(P(), open({str(folder / 'checkpoints' / 'fold-1' / 'custom_checkpoint_0.pkl')!r}, 'wb'))\n")
    run_command([sys.executable, "-c", payload], tmp_path)
    (folder / "metrics.json").unlink()
    result = train("--dataset", str(sim_dataset), *SMALL_RUN, "--output_dir", str(folder), "--resume_from_checkpoint",
                   "latest", cwd=work, expect=None)
    assert result.returncode != 0 and "custom_checkpoint_0.pkl" in result.stderr + result.stdout
    assert "refusing to read them" in result.stderr + result.stdout
    assert not marker.exists()


def test_corrupt_checkpoint_files_are_named_and_recomputed_or_refused(work, sim_dataset, reference_run, tmp_path):
    """Issue 25: a damaged checkpoint ended a resumed run in a raw traceback (JSONDecodeError, SafetensorError), and a
    job file whose tensor bytes were overwritten was read as it was. A job file that is unreadable or whose tensors no
    longer match the digest written beside them, and an unreadable fold result, are named and computed again (jobs
    are deterministic: the same result as the uninterrupted run); an unreadable run.json, which says whose checkpoints
    these are, is refused."""
    import shutil

    folder = tmp_path / "run"
    shutil.copytree(reference_run, folder)
    (folder / "metrics.json").unlink()
    checkpoints = folder / "checkpoints"
    truncated = checkpoints / "final" / "final" / "job-1.safetensors"
    truncated.write_bytes(truncated.read_bytes()[:100])
    overwritten = checkpoints / "final" / "inner-heads" / "job-0.safetensors"
    data = bytearray(overwritten.read_bytes())
    data[-8:] = b"\x00\x00\x80\x7f" * 2  # two float32 values of the last tensor become inf; the file still loads
    overwritten.write_bytes(bytes(data))
    (checkpoints / "fold-1" / "result.json").write_text('{"fold": 1, "metrics": {"mae": 1')
    args = ["--dataset", str(sim_dataset), *SMALL_RUN, "--output_dir", str(folder),
            "--resume_from_checkpoint", "latest"]
    resumed = train(*args, cwd=work)
    for path in (truncated, overwritten, checkpoints / "fold-1" / "result.json"):
        assert f"{path} is unreadable" in resumed.stderr or f"{path} is corrupt" in resumed.stderr, resumed.stderr
    assert "Traceback" not in resumed.stderr
    assert_same_metrics(metrics_of(reference_run), metrics_of(folder), rtol=1e-6)
    reference, other = trained_weights(reference_run), trained_weights(folder)
    for key in reference:
        torch.testing.assert_close(other[key], reference[key], rtol=1e-6, atol=1e-7, msg=key)

    (checkpoints / "run.json").write_text("{not json")
    refused = train(*args, cwd=work, expect=None)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    assert f"{checkpoints / 'run.json'} is unreadable" in refused.stderr


def _built_dataset(cache: Path, *argv: str):
    """The dataset `load_training_dataset` gives for `argv` (default: 8 simulated records, built into `cache`)."""
    from accelerate import PartialState

    from enecg_hf.training.arguments import parse_args
    from enecg_hf.training.records import load_training_dataset

    args = parse_args(list(argv) or ["--data_format", "simulated", "--num_records", "8", "--seed", "3"])
    return load_training_dataset(args, PartialState(cpu=True), cache)


@pytest.mark.parametrize("damage", ["overwrite", "truncate"])
def test_a_damaged_dataset_build_is_rebuilt_in_the_cache_and_refused_as_a_dataset(tmp_path, caplog, damage):
    """Issue 25: a cached dataset was loaded and never checked: 4 KB overwritten inside its Arrow file trained
    silently, a truncated one ended in a pyarrow traceback. The builder writes each file's content hash
    (checksums.json, as the feature store names its shards); the cache moves a build whose files no longer match
    aside and builds it again, and `--dataset` refuses such a folder naming the file."""
    import shutil

    from enecg_hf.training import TrainingSetupError

    first = _built_dataset(tmp_path)
    signals = np.asarray(first.with_format("numpy")["signal"])
    [folder] = tmp_path.glob("dataset-simulated-*")
    assert (folder / "checksums.json").is_file()
    shutil.copytree(folder, tmp_path / "given")
    for arrow in (next(folder.glob("data-*.arrow")), next((tmp_path / "given").glob("data-*.arrow"))):
        data = bytearray(arrow.read_bytes())
        if damage == "overwrite":
            middle = len(data) // 2
            data[middle : middle + 4096] = np.random.default_rng(0).bytes(4096)
        else:
            data = data[: len(data) // 2]
        arrow.write_bytes(bytes(data))
    del first

    with caplog.at_level("WARNING", logger="enecg_hf"):
        again = _built_dataset(tmp_path)
    np.testing.assert_array_equal(np.asarray(again.with_format("numpy")["signal"]), signals)
    assert f"{folder} is corrupt ({arrow.name}:" in caplog.text and "built again" in caplog.text
    assert sorted(p.name for p in tmp_path.glob(f"{folder.name}*")) == [folder.name, f"{folder.name}.corrupt"]

    with pytest.raises(TrainingSetupError, match=f"--dataset {tmp_path / 'given'} is corrupt \\({arrow.name}: "):
        _built_dataset(tmp_path, "--dataset", str(tmp_path / "given"))


@pytest.mark.slow
def test_two_runs_building_the_same_dataset_at_once_build_it_once(tmp_path):
    """Issue 25: two runs on one --cache_dir started together built into the same fixed temporary folder: one crashed
    (FileNotFoundError .../tmp/data-00000..., or OSError: Directory not empty) and left the .tmp folder. One builds
    (into a folder of its own, renamed into place); the other waits for it and reads its build."""
    script = textwrap.dedent(
        """
        import logging, sys, time
        from pathlib import Path
        from accelerate import PartialState
        from enecg_hf.training.arguments import parse_args
        from enecg_hf.training.records import load_training_dataset

        logging.basicConfig(level=logging.WARNING, format="%(message)s")
        logging.getLogger("enecg_hf").setLevel(logging.INFO)
        cache, ready, go = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
        args = parse_args(["--data_format", "simulated", "--num_records", "24", "--seed", "5"])
        state = PartialState(cpu=True)
        ready.touch()
        while not go.exists():
            time.sleep(0.005)
        dataset = load_training_dataset(args, state, cache)
        print("RECORDS", len(dataset), dataset[23]["record_id"])
        """
    )
    cache, go = tmp_path / "cache", tmp_path / "go"
    processes = [subprocess.Popen([sys.executable, "-c", script, str(cache), str(tmp_path / f"ready{i}"), str(go)],
                                  env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for i in range(2)]
    deadline = time.time() + 300
    while not all((tmp_path / f"ready{i}").exists() for i in range(2)) and time.time() < deadline:
        time.sleep(0.01)
    go.touch()
    outputs = [process.communicate(timeout=300) for process in processes]
    for process, (out, err) in zip(processes, outputs):
        assert process.returncode == 0, err[-3000:]
        assert "RECORDS 24 sim-5-000023" in out
    logs = [err for _, err in outputs]
    assert sum("Building the 'simulated' dataset" in log for log in logs) == 1, logs
    assert sum("using the cached build" in log for log in logs) == 1, logs
    assert sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) == [
        next(cache.glob("dataset-*")).name]


def test_bf16_mixed_precision_runs_on_cpu(work, sim_dataset, reference_run):
    train("--dataset", str(sim_dataset), *SMALL_RUN, "--mixed_precision", "bf16", "--output_dir", "bf16", cwd=work)
    bf16, fp32 = metrics_of(work / "bf16"), metrics_of(reference_run)
    assert all(np.isfinite(v["mean"]) for v in bf16["cv"].values())
    # The FFNs and the gate's lead-II part train under bfloat16 autocast (8 mantissa bits); the linear paths are fitted
    # in float32 (L-BFGS) and outputs are float32: close to the float32 run (equal when held-out records keep every
    # FFN and the gate's lead-II part at 0 epochs, as here).
    assert json.loads((work / "bf16" / "training_args.json").read_text())["mixed_precision"] == "bf16"
    assert bf16["final"]["metrics"]["mae"] == pytest.approx(fp32["final"]["metrics"]["mae"], rel=0.05)


def test_checkpoints_hold_only_head_and_gate_tensors(reference_run):
    from safetensors.torch import load_file

    files = _job_files(reference_run)
    # Per stage (2 folds + final): the linear paths (all inner folds), 2 inner-fold head fits, the final heads, the gate.
    assert len(files) == 3 * 5, files
    for file in files:
        state = load_file(str(file))
        assert state and not any(k.startswith("experts.") for k in state), sorted(state)[:5]
    final = {k for f in (reference_run / "checkpoints" / "final" / "final").glob("job-*") for k in load_file(str(f))}
    assert any("lora_" in k for k in final) and any(k.startswith("gate.") for k in final)
    assert all(p.suffix in (".safetensors", ".json") for p in (reference_run / "checkpoints").rglob("*") if p.is_file())


# ------------------------------------------------------------------------------------------------ real data
def _ludb() -> Path:
    folder = SHARED_DATA / "ludb"
    if not folder.is_dir():
        pytest.skip(f"LUDB not found at {folder.resolve()} (see ../shared/data/README.md)")
    return folder


@pytest.mark.slow
def test_ludb_rr_interval(work):
    """With the default training settings, a run with the ECG-features expert and a random-weight expert learns RR
    intervals of real records: on 60 LUDB records it lands far below the mean predictor."""
    train("--data_format", "ludb", "--data_path", str(_ludb()), "--limit", "60", "--config", "tiny",
          "--label", "rr_interval", "--experts", "features,dlinear", "--folds", "2", "--output_dir", "ludb_rr", cwd=work)
    metrics = metrics_of(work / "ludb_rr")
    assert metrics["records"] == 60 and metrics["unit"] == "ms"
    assert all(np.isfinite(v["mean"]) for v in metrics["cv"].values())
    assert metrics["cv"]["mae"]["mean"] < 0.6 * metrics["cv_baseline"]["mae"]["mean"], metrics["cv"]
    assert "ludb" in (work / "ludb_rr" / "README.md").read_text().split("---")[1]


@pytest.mark.slow
def test_ludb_sex_classification_and_push_without_network(work):
    result = train("--data_format", "ludb", "--data_path", str(_ludb()), "--limit", "40", "--config", "tiny",
                   "--label", "sex", "--experts", "dlinear,timesnet", "--epochs", "2", "--inner_folds", "2",
                   "--gate_epochs", "2", "--folds", "2",
                   "--output_dir", "ludb_sex", "--push_to_hub", "--hub_model_id", "someone/enecg-test", cwd=work,
                   expect=None)
    # The local folder is complete, then the push fails with a clear message (no network here).
    assert result.returncode != 0
    assert "push_to_hub failed for 'someone/enecg-test'" in result.stderr and "is complete" in result.stderr
    folder = work / "ludb_sex"
    metrics = metrics_of(folder)
    assert metrics["problem_type"] == "single_label_classification" and metrics["classes"] == ["female", "male"]
    assert {"accuracy", "precision", "recall", "f1", "auroc"} <= set(metrics["cv"])
    assert all(0.0 <= metrics["cv"][k]["mean"] <= 1.0 for k in ("accuracy", "f1"))
    config = json.loads((folder / "config.json").read_text())
    (task,) = config["tasks"]  # a single-task model is a model with one task
    assert (task["name"], task["problem_type"], task["class_names"]) == ("sex", "single_label_classification",
                                                                          ["female", "male"])
    assert "problem_type" not in config and "id2label" not in config


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "extra, message",
    [
        (["--label", "heart_axis"], "Unknown label column 'heart_axis'"),
        (["--label", "rr_interval", "--experts", "dlinear,nope"], "unknown expert(s) ['nope']"),
        (["--label", "rr_interval", "--folds", "30"], "--folds 30 needs at least 30 subjects"),
        (["--label", "rr_interval", "--resume_from_checkpoint", "latest"], "no checkpoints under"),
        (["--label", "rr_interval", "--report_to", "aim"], "--report_to aim: not installed"),
    ],
)
def test_bad_arguments_fail_before_training(work, sim_dataset, extra, message):
    from enecg_hf.training import main

    with pytest.raises(SystemExit, match=None) as error:
        main(["--dataset", str(sim_dataset), "--config", "tiny", "--output_dir", str(work / "bad"), *extra])
    assert message in str(error.value)


@pytest.mark.slow
def test_label_without_values_and_wrong_sampling_rate(work, tmp_path):
    import datasets

    from enecg_hf.training import main

    source = datasets.load_from_disk(str(work / "sim24"))
    empty = source.map(lambda _: {"age": None}, features=source.features)
    empty.save_to_disk(str(tmp_path / "no_age"))
    with pytest.raises(SystemExit) as error:
        main(["--dataset", str(tmp_path / "no_age"), "--label", "age", "--output_dir", str(tmp_path / "out")])
    assert "has no values" in str(error.value)

    run_command([sys.executable, "-m", "enecg_hf.data", "--format", "simulated", "--limit", "4",
                 "--sampling-rate", "250", "--output", str(tmp_path / "sim250")], tmp_path)
    with pytest.raises(SystemExit) as error:
        main(["--dataset", str(tmp_path / "sim250"), "--label", "rr_interval", "--output_dir", str(tmp_path / "out")])
    assert "(12, 2500)" in str(error.value) and "500 Hz" in str(error.value)


@pytest.mark.slow
def test_records_without_a_label_or_with_an_unusable_signal_are_left_out_by_name(work, sim_dataset, tmp_path):
    """rr_interval None at rows 7-8 and NaN at row 9 (their folds once indexed the wrong rows: IndexError), a NaN
    sample at row 3 and an amplitude of 3e38 mV at row 4 (feature caching once ended with a bare traceback); inf at
    row 10 (it once ended the run in scikit-learn after fold 1) and 1e9 ms at row 11 (it once trained silently)."""
    import datasets

    source = datasets.load_from_disk(str(sim_dataset))

    def damage(row, index):
        if index in (7, 8, 9):
            row["rr_interval"] = None if index < 9 else float("nan")
        if index in (10, 11):
            row["rr_interval"] = float("inf") if index == 10 else 1e9
        if index in (3, 4):
            signal = np.asarray(row["signal"], dtype=np.float32)
            signal[0, 100] = np.nan if index == 3 else 3e38
            row["signal"] = signal.tolist()
        return row

    damaged = source.map(damage, with_indices=True, features=source.features)
    damaged.save_to_disk(str(tmp_path / "damaged"))
    unusable = [source[3]["record_id"], source[4]["record_id"]]
    result = train("--dataset", str(tmp_path / "damaged"), *SMALL_RUN, "--epochs", "1", "--output_dir",
                   str(tmp_path / "out"), cwd=work)
    assert "missing for 3 of 24 records: they are left out" in result.stderr
    assert f"left out: {unusable}" in result.stderr, result.stderr[-3000:]
    metrics = metrics_of(tmp_path / "out")
    impossible = (f"2 of 24 records are left out for impossible values: 1 not finite and 1 outside the possible "
                  f"100-10000 ms (e.g. {source[10]['record_id']}=inf, {source[11]['record_id']}=1e+09)")
    assert impossible in result.stderr and impossible in metrics["warnings"]
    assert metrics["records"] == 17 and sum(f["test_records"] for f in metrics["folds"]) == 17
    assert all(np.isfinite(v["mean"]) for v in metrics["cv"].values())


def _label_dataset(ages, record_ids):
    import datasets

    n = len(ages)
    return datasets.Dataset.from_dict({
        "record_id": record_ids, "subject_id": [f"s{i}" for i in range(n)], "source": ["jsonl"] * n,
        "signal": np.zeros((n, 12, 50), dtype=np.float32).tolist(), "age": ages})


def test_impossible_labels_are_left_out_with_a_count_and_repeated_record_ids_warned(caplog):
    """Issue 25: ages of +-1e9 trained silently, an infinite one ended the run in scikit-learn after a fold had
    trained, a repeated record id passed unnoticed. Checked per task before training, against `TASKS`' valid_range;
    the messages are logged and kept in the task's warnings (metrics.json)."""
    from types import SimpleNamespace

    from enecg_hf.data import TASKS
    from enecg_hf.training import TrainingSetupError
    from enecg_hf.training.run import prepare_task

    ages = [50.0, 61.0, float("inf"), 1e9, -1e9, 40.0, 70.0, 33.0, float("-inf"), 58.0]
    ids = [f"r{i}" for i in range(10)]
    ids[7] = "r1"
    args = SimpleNamespace(folds=2, seed=0, cv_groups=["subject"])
    with caplog.at_level("WARNING", logger="enecg_hf"):
        task = prepare_task(_label_dataset(ages, ids), TASKS["age"], args)
    assert list(task.records["record_id"]) == ["r0", "r1", "r5", "r6", "r1", "r9"]
    assert task.labels.tolist() == [50.0, 61.0, 40.0, 70.0, 33.0, 58.0]
    impossible = next(w for w in task.warnings if "left out" in w)
    assert "4 of 10" in impossible and "2 not finite" in impossible
    assert "2 outside the possible 0-125 years" in impossible
    assert "r3=1e+09" in impossible and "r2=inf" in impossible
    repeated = next(w for w in task.warnings if "record id" in w)
    assert "'r1'" in repeated and "1 record" in repeated
    assert impossible in caplog.text and repeated in caplog.text

    with pytest.raises(TrainingSetupError, match="none of its 3 values is possible"):
        prepare_task(_label_dataset([1e9, -3.0, float("inf")], ["a", "b", "c"]), TASKS["age"], args)


@pytest.mark.slow
def test_leave_one_source_out_is_reported_next_to_subject_cv(work, sim_dataset, tmp_path):
    """`--cv_groups subject,source`: the subject-wise folds, then each source group held out in turn (trained on the
    other institution's records), in metrics.json (`cv_source`: per group, mean over groups, pooled over every
    held-out record), the printed summary and the model card."""
    import datasets

    from enecg_hf.training import main

    source = datasets.load_from_disk(str(sim_dataset))
    two = source.map(lambda _, i: {"source": "ludb" if i < 10 else "ptb-xl"}, with_indices=True,
                     features=source.features)
    two.save_to_disk(str(tmp_path / "two_sources"))
    result = train("--dataset", str(tmp_path / "two_sources"), *SMALL_RUN, "--cv_groups", "subject,source",
                   "--output_dir", str(tmp_path / "out"), cwd=work)
    metrics = metrics_of(tmp_path / "out")
    assert len(metrics["folds"]) == 2 and set(metrics["cv"]) >= {"mae", "rmse"}
    by_source = metrics["cv_source"]
    groups = {g["source"]: g for g in by_source["groups"]}
    assert groups.keys() == {"ludb", "ptb-xl"} and by_source["records"] == 24
    assert (groups["ludb"]["test_records"], groups["ludb"]["train_records"]) == (10, 14)
    assert (groups["ptb-xl"]["test_records"], groups["ptb-xl"]["train_records"]) == (14, 10)
    assert np.isfinite(by_source["pooled"]["mae"]) and np.isfinite(by_source["baseline_pooled"]["mae"])
    assert by_source["mean"]["mae"]["mean"] == pytest.approx(np.mean([g["metrics"]["mae"] for g in groups.values()]))
    assert "leave-one-source-out (2 sources, 24 held-out records" in result.stdout
    card = (tmp_path / "out" / "README.md").read_text()
    assert "| ptb-xl | 14 | 10 |" in card and "leave-one-source-out CV" in card.split("---")[1]
    # One institution: nothing to hold out.
    with pytest.raises(SystemExit, match="leaving one out needs at least two"):
        main(["--dataset", str(sim_dataset), *SMALL_RUN, "--cv_groups", "source", "--output_dir", str(tmp_path / "x")])


def test_classes_seen_only_in_test_folds_are_reported():
    from enecg_hf.data import TaskSpec
    from enecg_hf.training import check_class_coverage

    label = TaskSpec("arrhythmia", "single_label_classification", class_names=("sinus", "afib", "flutter"))
    labels = np.array([0, 0, 1, 1, 0, 2])
    folds = [(np.array([0, 1, 2]), np.array([3, 4, 5])), (np.array([3, 4, 5]), np.array([0, 1, 2]))]
    messages = check_class_coverage(labels, label, folds)
    assert any("fold 1" in m and "'flutter'" in m and "only in the test fold" in m for m in messages)
    from enecg_hf.training import TrainingSetupError

    with pytest.raises(TrainingSetupError, match="single class"):  # a ValueError a notebook can catch; main() exits
        check_class_coverage(np.zeros(4, dtype=int), label, folds)


# ------------------------------------------------------------------------------------------------ metrics and card
def test_local_metric_modules_agree_with_scikit_learn():
    from sklearn.metrics import f1_score, mean_absolute_error, r2_score, roc_auc_score

    from enecg_hf.training import load_metric

    rng = np.random.default_rng(0)
    truth, predicted = rng.normal(800, 100, 50), rng.normal(800, 100, 50)
    regression = load_metric("regression").compute(predictions=predicted.tolist(), references=truth.tolist())
    assert regression["mae"] == pytest.approx(mean_absolute_error(truth, predicted))
    assert regression["rmse"] == pytest.approx(np.sqrt(np.mean((truth - predicted) ** 2)))
    assert regression["r2"] == pytest.approx(r2_score(truth, predicted))

    labels = rng.integers(0, 3, 60)
    scores = rng.dirichlet(np.ones(3), 60)
    classification = load_metric("classification").compute(
        predictions=scores.argmax(1).tolist(), references=labels.tolist(), prediction_scores=scores.tolist(),
        labels=[0, 1, 2])
    assert classification["f1"] == pytest.approx(f1_score(labels, scores.argmax(1), average="macro"))
    assert classification["auroc"] == pytest.approx(roc_auc_score(labels, scores, multi_class="ovr", average="macro"))

    # Calibration error: near 0 for labels drawn from the stated probabilities, large for the same scores sharpened.
    scores = rng.dirichlet(np.ones(3), 20000)
    labels = np.array([rng.choice(3, p=row) for row in scores])
    sharp = scores ** 4 / (scores ** 4).sum(1, keepdims=True)
    ece = {name: load_metric("classification").compute(
        predictions=s.argmax(1).tolist(), references=labels.tolist(), prediction_scores=s.tolist(), labels=[0, 1, 2]
    )["ece"] for name, s in (("calibrated", scores), ("overconfident", sharp))}
    assert ece["calibrated"] < 0.02 and ece["overconfident"] > 0.1, ece


@pytest.mark.slow
def test_a_wheel_ships_the_hub_configs_and_the_model_card_template(tmp_path):
    """A non-editable install finds `--config tiny` and the model card template: both are package data of the wheel
    (links to the repository's hub_configs/ and model_card.md in a checkout)."""
    import zipfile

    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(tmp_path / "wheel"), str(REPO)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "wheel").glob("enecg_hf-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(tmp_path / "site")
    site = tmp_path / "site" / "enecg_hf"
    for config in (REPO / "hub_configs").glob("*.json"):
        assert (site / "hub_configs" / config.name).read_bytes() == config.read_bytes(), config.name
    assert (site / "templates" / "model_card.md").read_text() == (REPO / "model_card.md").read_text()
    for shipped in (REPO / "enecg_hf" / "pretrained").glob("*/*"):  # the trained model of `make model`
        assert (site / "pretrained" / shipped.parent.name / shipped.name).read_bytes() == shipped.read_bytes()
    script = ("from enecg_hf.training.configs import resolve_config_path\n"
              "from enecg_hf.training.model_card import template_path\n"
              "print(resolve_config_path('tiny')); print(template_path())\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    config_path, template = run.stdout.split()
    assert config_path == str(site / "hub_configs" / "tiny.json") and template == str(site / "templates" / "model_card.md")


# ------------------------------------------------------------------------------------------------ quickstart
@pytest.mark.slow
def test_quickstart_predicts_with_the_trained_main_job_folder(main_job):
    from enecg_hf.tools import quickstart

    result = quickstart.main(["--model", str(main_job[0])])  # as `make demo` runs it
    assert result["label"] == "rr_interval" and result["unit"] == "ms" and len(result["records"]) == 5
    for row in result["records"]:
        assert sum(row["gate_weights"].values()) == pytest.approx(1.0, abs=0.01)
        experts = json.loads((main_job[0] / "config.json").read_text())["experts"]
        assert set(row["gate_weights"]) == {e["name"] for e in experts}
    assert result["mean_absolute_error"] < 0.5 * metrics_of(main_job[0])["cv_baseline"]["mae"]["mean"]
    # The README states its MAE (within MAIN_JOB_TOLERANCE_MS).
    stated = re.search(r"it never saw \(MAE ([\d.]+) ms\)", (REPO / "README.md").read_text())
    assert stated, "README.md no longer states the quickstart's MAE as 'it never saw (MAE x ms)'"
    assert abs(result["mean_absolute_error"] - float(stated[1])) <= MAIN_JOB_TOLERANCE_MS["quickstart_mae"], (
        f"the quickstart printed MAE {result['mean_absolute_error']}, README.md says {stated[1]}")


def test_quickstart_without_a_model_round_trips_the_untrained_tiny_model(tmp_path):
    from enecg_hf.tools import quickstart

    result = quickstart.main(["--output", str(tmp_path / "quick")])
    assert result["reload_bit_identical"] is True
    assert {"config.json", "model.safetensors"} <= set(result["files"])
    assert 0 < result["trainable_parameters"] < result["total_parameters"]


def test_data_formats_of_the_command_line_are_those_of_the_data_module():
    from enecg_hf.data.builder import FORMATS
    from enecg_hf.training import DATA_FORMATS

    assert sorted(DATA_FORMATS) == sorted(FORMATS)


def test_an_expert_that_cannot_be_loaded_stops_the_run_with_its_reason(work, sim_dataset, tmp_path):
    from enecg_hf.training import main

    config = json.loads((REPO / "hub_configs" / "tiny.json").read_text())
    config["experts"] = [{**e, "pretrained": str(tmp_path / "no-such-checkpoint")} for e in config["experts"]
                         if e["name"] == "dlinear"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit) as error:
        main(["--dataset", str(sim_dataset), "--config", str(tmp_path / "config.json"), "--output_dir",
              str(tmp_path / "out")])
    assert "Could not build the model: Expert 'dlinear'" in str(error.value)
    assert "no-such-checkpoint" in str(error.value)


def test_push_uploads_an_adapter_config_naming_the_hub_repo(tmp_path, monkeypatch):
    """The uploaded adapter names the Hub repo as its base model; the local folder keeps naming itself."""
    import huggingface_hub

    from enecg_hf.training import TrainScriptArguments
    from enecg_hf.training.output import push_folder

    folder = tmp_path / "out"
    (folder / "adapter").mkdir(parents=True)
    local = {"base_model_name_or_path": str(folder), "peft_type": "LORA"}
    (folder / "adapter" / "adapter_config.json").write_text(json.dumps(local))
    calls = []
    monkeypatch.setattr(huggingface_hub, "create_repo",
                        lambda repo_id, **kw: calls.append(("create", repo_id)) or huggingface_hub.RepoUrl(
                            f"https://huggingface.co/someone/{repo_id.split('/')[-1]}"))
    monkeypatch.setattr(huggingface_hub, "upload_folder", lambda **kw: calls.append(("folder", kw)))
    monkeypatch.setattr(huggingface_hub, "upload_file", lambda **kw: calls.append(("file", kw)))
    assert push_folder(folder, TrainScriptArguments(hub_model_id="enecg-rr")) == "someone/enecg-rr"
    assert "adapter/adapter_config.json" in calls[1][1]["ignore_patterns"]
    uploaded = json.loads(calls[2][1]["path_or_fileobj"])
    assert calls[2][1]["path_in_repo"] == "adapter/adapter_config.json" and calls[2][1]["repo_id"] == "someone/enecg-rr"
    assert uploaded == {**local, "base_model_name_or_path": "someone/enecg-rr"}
    assert json.loads((folder / "adapter" / "adapter_config.json").read_text()) == local


def test_class_label_columns_encode_by_class_name():
    """Built datasets store classes as `datasets.ClassLabel` indices; a config that orders the classes differently
    still gets each record's class by name. Datasets built before (plain ints and strings) encode as they did."""
    import datasets

    from enecg_hf.data import TaskSpec

    names = ["sinus_rhythm", "atrial_fibrillation", "other"]
    built = datasets.Dataset.from_dict({"arrhythmia": ["other", None, "sinus_rhythm"], "sex": [1, 0, None]},
                                       features=datasets.Features({"arrhythmia": datasets.ClassLabel(names=names),
                                                                   "sex": datasets.ClassLabel(names=["female", "male"])}))
    config = {"label_name": "arrhythmia", "problem_type": "single_label_classification",
              "id2label": {"0": "other", "1": "sinus_rhythm", "2": "atrial_fibrillation"}}
    spec = TaskSpec.infer("arrhythmia", built, config)
    assert [spec.encode(v) for v in built["arrhythmia"]] == [0, None, 1]
    assert [TaskSpec.infer("sex", built, {}).encode(v) for v in built["sex"]] == [1, 0, None]
    custom = TaskSpec.infer("arrhythmia", built, {})
    assert custom.class_names[:2] == ("sinus_rhythm", "sinus_bradycardia")  # the task's classes: ARRHYTHMIA_CLASSES
    assert [custom.encode(v) for v in built["arrhythmia"]] == [5, None, 0]
    old = datasets.Dataset.from_dict({"arrhythmia": ["other", "sinus_rhythm"], "sex": [1, 0]})
    assert [TaskSpec.infer("arrhythmia", old, config).encode(v) for v in old["arrhythmia"]] == [0, 1]
    assert [TaskSpec.infer("sex", old, {}).encode(v) for v in old["sex"]] == [1, 0]


def test_summary_puts_each_metric_in_its_unit(capsys, tmp_path):
    from enecg_hf.training.output import print_summary

    summary = {"mean": 1.0, "std": 0.5}
    metrics = {"label": "rr_interval", "problem_type": "regression", "records": 30, "folds": [{}, {}],
               "train_seconds": 1.0, "unit": "ms", "cv": {"mae": summary, "mse": summary, "r2": summary},
               "cv_baseline": {"mae": summary}, "final": {"metrics": {"mae": 18.68, "mse": 735.5, "rmse": 27.12,
                                                                     "r2": 0.9874}}}
    print_summary(metrics, tmp_path)
    printed = capsys.readouterr().out
    assert "final (in-sample): mae=18.68 ms, mse=735.5 ms², rmse=27.12 ms, r2=0.9874\n" in printed
    assert "CV       mae: 1 ± 0.5 ms   (baseline 1 ± 0.5)" in printed and "CV        r2: 1 ± 0.5\n" in printed


def test_command_line_is_parsed_by_hf_argument_parser_with_every_flag(capsys):
    """`HfArgumentParser` over the argument dataclasses: each option once with its default, every flag spelling
    train.py accepted before (argparse's `--no-cache_features`, comma lists), the help texts, argparse's errors."""
    import dataclasses

    from transformers import HfArgumentParser

    from enecg_hf.training import TrainingSetupError, TrainScriptArguments, build_parser, parse_args

    parser = build_parser()
    assert isinstance(parser, HfArgumentParser)
    assert parse_args(["--dataset", "d"]) == TrainScriptArguments(dataset=["d"])  # the dataclasses' defaults
    assert parse_args(["--dataset", "a,b", "--labels", "age", "sex"]).dataset == ["a", "b"]
    assert list(TrainScriptArguments().to_dict())[:3] == ["config", "dataset", "data_format"]
    args = parse_args(["--dataset", "d", "--experts", "dlinear,timesnet", "--report_to", "none", "--no-cache_features",
                       "--push_to_hub", "--hub_private", "--gate", "uniform", "--epochs", "4", "--learning_rate", "0.1",
                       "--strategy", "joint", "--resume_from_checkpoint", "latest", "--mixed_precision", "bf16"])
    assert (args.experts, args.report_to, args.cache_features, args.push_to_hub, args.hub_private) == (
        ["dlinear", "timesnet"], [], False, True, True)
    assert (args.gate, args.epochs, args.learning_rate, args.strategy, args.mixed_precision) == (
        "uniform", 4, 0.1, "joint", "bf16")
    assert parse_args(["--dataset", "d", "--experts", "a", "b", "--cache_features"]).experts == ["a", "b"]
    assert parse_args(["--dataset", "d", "--no_cache_features"]).cache_features is False
    assert parse_args(["--dataset", "d"]).cv_groups == ["subject"]
    assert parse_args(["--dataset", "d", "--cv_groups", "subject,source"]).cv_groups == ["subject", "source"]
    with pytest.raises(TrainingSetupError, match="--cv_groups takes subject, source or subject,source"):
        parse_args(["--dataset", "d", "--cv_groups", "hospital"])
    assert parse_args([]).num_records == 300  # no arguments: the main job

    help_text = "".join(parser.format_help().split())  # argparse wraps lines, also at hyphens
    for field in dataclasses.fields(TrainScriptArguments):
        assert f"--{field.name}" in help_text, field.name
        if field.metadata.get("help"):
            assert "".join(field.metadata["help"].split()) in help_text, field.name
    for argv, message in ((["--dataset", "d", "--bogus", "1"], "unrecognized arguments: --bogus 1"),
                          (["--dataset", "d", "--strategy", "greedy"], "invalid choice: 'greedy'"),
                          (["--dataset", "d", "--epochs", "many"], "invalid int value: 'many'")):
        with pytest.raises(SystemExit) as error:
            parse_args(argv)
        assert error.value.code == 2 and message in capsys.readouterr().err


# Each way `parse_args` refuses arguments argparse accepts.
ARGUMENTS_THAT_CANNOT_GO_TOGETHER = [
    (["--dataset", "d", "--report_to", "aim"], "--report_to aim: not installed"),
    (["--dataset", "d", "--label", "age", "--labels", "sex"], "Pass either --label (one task) or --labels"),
    (["--dataset", "d", "--labels", "all,age"], "--labels all stands alone"),
    (["--dataset", "d", "--data_format", "ludb"], "Pass either --dataset or --data_format/--data_path, not both"),
    (["--label", "age"], "No data: pass --dataset DIR, or --data_format FORMAT"),
    (["--dataset", "d", "--feature_batch_size", "0"], "--feature_batch_size must be at least 1"),
    (["--dataset", "d", "--inner_folds", "1"], "--inner_folds must be at least 2, got 1"),  # FitSettings' check
    (["--dataset", "d", "--folds", "-1"], "--folds must be >= 0"),
    (["--dataset", "d", "--cv_groups", "subject,subject"], "--cv_groups takes subject, source or subject,source"),
    (["--data_format", "ludb", "--num_records", "3"], "--num_records is for --data_format simulated"),
]


@pytest.mark.parametrize("argv, message", ARGUMENTS_THAT_CANNOT_GO_TOGETHER)
def test_arguments_that_cannot_go_together_raise_the_typed_error_and_only_main_exits(argv, message):
    from enecg_hf.training import TrainingSetupError, main, parse_args

    with pytest.raises(TrainingSetupError) as error:  # a ValueError a notebook can catch
        parse_args(argv)
    assert message in str(error.value)
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == str(error.value)  # the message, exit status 1


@pytest.mark.slow
def test_train_py_prints_the_error_in_the_arguments_as_one_line(tmp_path):
    argv, message = ARGUMENTS_THAT_CANNOT_GO_TOGETHER[7]
    result = train(*argv, cwd=tmp_path, expect=1)
    assert result.stderr.strip() == message and result.stdout == ""


def test_the_options_of_a_fit_take_their_defaults_from_fit_settings(monkeypatch):
    """train.py's options that set a `FitSettings` field read its default from `FitSettings` (written once): changing
    a `FitSettings` default changes the option's default, in the parser and in `TrainScriptArguments`."""
    import dataclasses
    import importlib.util

    from enecg_hf.features import cli as feature_cli
    from enecg_hf.training import arguments
    from enecg_hf.training.fitting import FitSettings

    settings = {f.name: f for f in dataclasses.fields(FitSettings)}
    options = [f.name for f in dataclasses.fields(arguments.TrainScriptArguments) if f.name in settings]
    # The other settings (early_stopping, gate_predictions, stacking, ffn_epochs, calibration, linear_l2) are no flags.
    assert options == ["strategy", "epochs", "batch_size", "learning_rate", "weight_decay", "inner_folds", "patience",
                       "gate_epochs", "gate_learning_rate", "gate_weight_floor", "class_weighting", "inner_groups", "seed"]
    assert arguments.TrainScriptArguments().fit_settings() == FitSettings()
    for name in ("strategy", "class_weighting", "inner_groups"):  # choices: the values FitSettings accepts
        choices = next(f for f in dataclasses.fields(arguments.FitArguments) if f.name == name).metadata["choices"]
        for value in choices:
            FitSettings(**{name: value})
        with pytest.raises(ValueError, match=name):
            FitSettings(**{name: "other"})

    def rebuilt(module):
        """The module executed again, now that the defaults of FitSettings changed (not put in sys.modules)."""
        spec = importlib.util.spec_from_file_location(module.__name__, module.__file__)
        copy = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(copy)
        return copy

    for name in options:
        monkeypatch.setattr(settings[name], "default", f"changed {name}")
    changed = rebuilt(arguments)
    fields = {f.name: f.default for f in dataclasses.fields(changed.TrainScriptArguments)}
    parser = {action.dest: action.default for action in changed.build_parser()._actions}
    assert [fields[name] for name in options] == [parser[name] for name in options] == [f"changed {n}" for n in options]
    # The feature CLI declares its shared options from train.py's (train_option): they follow them.
    monkeypatch.setitem(sys.modules, arguments.__name__, changed)
    assert dataclasses.asdict(rebuilt(feature_cli).FeatureScriptArguments())["seed"] == "changed seed"


def test_resuming_accepts_an_option_added_later_only_while_it_is_unset(tmp_path):
    """Checkpoints written before a release added an option (their run.json lacks it) resume when the option is left
    unset (None: the earlier behaviour), and are refused when it is set or when any recorded argument differs."""
    from enecg_hf.training.arguments import TrainScriptArguments
    from enecg_hf.training.errors import TrainingSetupError
    from enecg_hf.training.run import _check_resume

    saved = {"config": "tiny", "learning_rate": 0.003}
    (tmp_path / "run.json").write_text(json.dumps(saved))
    args = TrainScriptArguments()
    _check_resume(args, tmp_path, {**saved, "gate_input": None})
    with pytest.raises(TrainingSetupError, match=r"arguments differ from the checkpointed run: \['gate_input'\]"):
        _check_resume(args, tmp_path, {**saved, "gate_input": "predictions"})
    with pytest.raises(TrainingSetupError, match=r"\['learning_rate'\]"):
        _check_resume(args, tmp_path, {**saved, "learning_rate": 0.005, "gate_input": None})
    with pytest.raises(TrainingSetupError, match=r"\['learning_rate'\]"):  # recorded there, unknown here
        _check_resume(args, tmp_path, {"config": "tiny", "gate_input": None})
