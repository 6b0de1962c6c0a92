"""The model shipped inside the package (`enecg-base`): found by name, loaded offline in one line by every route, its
stated figures those of its training run, and `make model`'s folder writer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, SHARED_DATA

import enecg_hf
from enecg_hf.shipped_models import DEFAULT_MODEL, SHIPPED_FILES, model_path, resolve_model, shipped_model_names
from enecg_hf.tools.build_model import MAX_SHIPPED_MB, REMOTE_CODE_KEYS, ship


SHIPPED = DEFAULT_MODEL in shipped_model_names()
LUDB_1 = SHARED_DATA / "ludb" / "data" / "1"
needs_model = pytest.mark.skipif(not SHIPPED, reason="enecg_hf/pretrained/enecg-base is missing: run `make model`")
needs_ludb = pytest.mark.skipif(not (LUDB_1.with_suffix(".hea")).is_file(), reason=f"{LUDB_1} not found")
TASKS = {"age", "sex", "arrhythmia", "rr_interval"}


def test_an_unknown_name_is_refused_listing_the_shipped_models():
    with pytest.raises(ValueError, match=r"'enecg-huge' is not a model shipped with enecg_hf \(shipped: "):
        model_path("enecg-huge")


def test_a_local_folder_or_a_hub_id_is_used_as_given(tmp_path, monkeypatch):
    assert resolve_model("someone/enecg-base") == "someone/enecg-base"  # a Hub id, even with a shipped name
    assert resolve_model("not-shipped") == "not-shipped"
    monkeypatch.chdir(tmp_path)
    (tmp_path / DEFAULT_MODEL).mkdir()  # a folder of the user's with the shipped name wins
    assert resolve_model(DEFAULT_MODEL) == DEFAULT_MODEL


def test_ship_copies_the_hub_files_without_code_keys_and_refuses_an_oversized_folder(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for name in SHIPPED_FILES:
        (run / name).write_text("{}")
    (run / "training_args.json").write_text(json.dumps({"dataset": ["/home/me/data/ludb", "/srv/ptbxl"],
                                                        "output_dir": "/home/me/run", "seed": 42}))
    (run / "config.json").write_text(json.dumps({"model_type": "enecg", "auto_map": {"AutoModel": "x.Y"},
                                                 "custom_pipelines": {"ecg-analysis": {}}}))
    (run / "modeling_enecg.py").write_text("# a code copy: not shipped")
    size = ship(run, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(SHIPPED_FILES)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config == {"model_type": "enecg"} and not set(REMOTE_CODE_KEYS) & set(config)
    assert size < 0.01
    arguments = json.loads((tmp_path / "out" / "training_args.json").read_text())
    assert arguments == {"dataset": ["ludb", "ptbxl"], "output_dir": "run", "seed": 42}  # no build-machine paths
    (run / "model.safetensors").write_bytes(b"\0" * int((MAX_SHIPPED_MB + 1) * 1e6))
    with pytest.raises(SystemExit, match="over the 20.0 MB"):
        ship(run, tmp_path / "out")


@needs_model
def test_the_shipped_folder_is_small_and_complete():
    folder = Path(model_path())
    assert sorted(p.name for p in folder.iterdir()) == sorted(SHIPPED_FILES)
    assert sum(p.stat().st_size for p in folder.iterdir()) / 1e6 <= MAX_SHIPPED_MB
    config = json.loads((folder / "config.json").read_text())
    assert {task["name"] for task in config["tasks"]} == TASKS
    assert {e["type"] for e in config["experts"]} >= {"openecg", "deepfade", "features"}


@needs_model
def test_the_model_card_states_the_cross_validation_of_the_run_that_made_the_model():
    folder = Path(model_path())
    metrics = json.loads((folder / "metrics.json").read_text())
    card = (folder / "README.md").read_text()
    for task in TASKS:
        block = metrics["tasks"][task]
        name = "mae" if block["problem_type"] == "regression" else "auroc"
        assert f"{block['cv'][name]['mean']:.4g}" in card, (task, name)
        assert len(block["folds"]) == 5


@needs_model
@needs_ludb
@pytest.mark.slow
def test_the_readme_one_liner_predicts_every_task_of_a_ludb_record_offline():
    """The README's one-liner in a fresh process: four answers for LUDB record 1 (a 51-year-old woman in sinus
    bradycardia, its annotated beats 1,323 ms apart on average), with no training step and no network."""
    import numpy as np
    import wfdb

    beats = wfdb.rdann(str(LUDB_1), "ii")
    rr = float(np.diff(beats.sample[np.array(beats.symbol) == "N"]).mean() / beats.fs * 1000)
    readme = (REPO / "README.md").read_text()
    one_liner = next(line for line in readme.splitlines() if line.startswith('python -c "import enecg_hf'))
    code = one_liner.removeprefix("python -c ").strip('"').replace("ludb/data/1", str(LUDB_1))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                            env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(Path.home())})
    assert result.returncode == 0, result.stderr[-3000:]
    answer = eval(result.stdout.strip().splitlines()[-1], {"nan": float("nan")})  # the pipeline's dict, printed
    tasks = answer["tasks"]
    assert set(tasks) == TASKS
    assert tasks["arrhythmia"]["label"] == "sinus_bradycardia"
    assert abs(tasks["rr_interval"]["value"] - rr) < 50, (tasks["rr_interval"]["value"], rr)
    assert 20 <= tasks["age"]["value"] <= 90  # a regression's answer, not a check of its accuracy on one record
    assert tasks["sex"]["label"] in {"female", "male"}
    for task in tasks.values():
        assert abs(sum(task["gate_weights"].values()) - 1) < 1e-3


@needs_model
@needs_ludb
@pytest.mark.slow
def test_every_route_loads_the_shipped_model_by_name(tmp_path):
    """`EnECGModel.from_pretrained("enecg-base")` and `AutoModel.from_pretrained(enecg_hf.model_path())` load the same
    weights with frozen experts; `enecg predict REC --model enecg-base` answers as `pipeline("ecg-analysis", ...)`."""
    import torch
    from transformers import AutoModel, pipeline

    from enecg_hf import PIPELINE_TASK, EnECGModel

    by_name = EnECGModel.from_pretrained(DEFAULT_MODEL)
    by_auto = AutoModel.from_pretrained(enecg_hf.model_path())
    assert not any(p.requires_grad for p in by_name.experts.parameters())
    one, two = by_name.state_dict(), by_auto.state_dict()
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    expected = pipeline(PIPELINE_TASK, model=enecg_hf.model_path())(str(LUDB_1))
    result = subprocess.run([sys.executable, "-m", "enecg_hf.tools.cli", "predict", str(LUDB_1), "--model",
                             DEFAULT_MODEL], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    line = json.loads(result.stdout.strip().splitlines()[-1])
    for task in TASKS:
        got, want = line["tasks"][task], expected["tasks"][task]
        if "value" in want:
            assert got["value"] == pytest.approx(want["value"], rel=1e-5)
        else:
            assert got["label"] == want["label"]
