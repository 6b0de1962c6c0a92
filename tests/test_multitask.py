"""Every EnECG model is a list of tasks: one pass of the experts, a head set and a gate per task, masked losses; a
single-task model is a model with one task, and single-task folders saved before (`heads.*`, `gate.*`, the task at
the top level of the config) load as one."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from enecg_hf import EnECGConfig, EnECGModel
from enecg_hf.data import TASKS
from helpers import REPO


FIXTURES = Path(__file__).resolve().parent / "fixtures"
EXPERTS = [
    {"name": "dlinear", "type": "dlinear", "input_length": 500, "leads": ["II"], "settings": {"preset": "tiny"}},
    {"name": "timesnet", "type": "timesnet", "input_length": 250, "leads": ["I", "II"],
     "settings": {"preset": "tiny", "d_model": 4, "d_ff": 4}},
]
SMALL = {"head_hidden_size": 8, "gate_input_length": 50, "gate_hidden_size": 4, "lora_r": 2}


def multitask_config(**overrides) -> EnECGConfig:
    tasks = [{"name": "rr_interval", "problem_type": "regression", "unit": "ms", "target_mean": 800.0,
              "target_std": 150.0},
             {"name": "sex", "problem_type": "single_label_classification", "class_names": ["female", "male"]},
             {"name": "arrhythmia", "problem_type": "single_label_classification",
              "class_names": list(TASKS["arrhythmia"].class_names), "loss_weight": 0.5}]
    return EnECGConfig(experts=EXPERTS, tasks=tasks, **{**SMALL, **overrides})


def records(n: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(n, 12, 5000, generator=generator)


# The fixture's outputs were written in another environment (CPU, BLAS code path, library versions). There the last
# bits of a float32 sum can differ: a fresh venv on another machine gave logits 146.91915893554688 against the saved
# 146.91908264160156 (5 float32 ulps, 5e-7 relative), and MKL's conditional-numerical-reproducibility modes here move
# them by up to 2 ulps. The tolerance (1e-5 relative, about 80 ulps, plus 1e-6 absolute for gate weights near 0) is 20x
# the largest of those; a head weight scaled by 1.001, a re-initialised gate, an adapter left unloaded or another input
# normalisation each fail it (checked).
ACROSS_ENVIRONMENTS = {"rtol": 1e-5, "atol": 1e-6}


def fixture_input() -> torch.Tensor:
    """The fixed (2, 12, 5000) input the fixture's expected outputs were computed on."""
    t = np.linspace(0, 10, 5000, dtype=np.float64)
    x = np.stack([np.sin(2 * np.pi * (1.0 + 0.1 * i) * t) + 0.1 * i * np.cos(2 * np.pi * 7 * t) for i in range(12)])
    return torch.tensor(np.stack([x, 0.5 * x[::-1]]), dtype=torch.float32)


# Single-task folders saved before every model was a list of tasks: by enecg_hf 0.1.0 before multi-task support (a
# regression, FFN heads, LoRA), and by the code of commit bcd33b8 (a classification with linear-path heads, input
# standardisation, class weights and a logit temperature). Each holds its outputs on `fixture_input()`.
OLD_SINGLE_TASK_FOLDERS = {"single_task_v0_1": "age", "single_task_bcd33b8": "sex"}


@pytest.mark.parametrize("fixture", sorted(OLD_SINGLE_TASK_FOLDERS))
def test_a_single_task_folder_saved_before_predicts_its_saved_outputs(tmp_path, fixture):
    """An old single-task folder loads as a one-task model (its `heads.*` and `gate.*` mapped to the task's modules,
    its top-level label fields to its `tasks` entry) and reproduces every output to float32 rounding
    (`ACROSS_ENVIRONMENTS`; in this environment bit for bit). Saved again it is written in today's layout, and
    reloads bit for bit."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel

    folder = FIXTURES / fixture
    model = AutoModel.from_pretrained(folder).eval()
    saved_config = json.loads((folder / "config.json").read_text())
    assert model.config.task_names == [OLD_SINGLE_TASK_FOLDERS[fixture]] == [saved_config["label_name"]]
    assert {key.split(".")[0] for key in load_file(str(folder / "model.safetensors"))} == {"experts", "heads", "gate"}
    assert {key.split(".")[0] for key in model.state_dict()} == {"experts", "tasks"}
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)  # re-frozen
    task = model.config.task_configs[0]
    for field in ("problem_type", "target_mean", "target_std", "class_weights", "logit_temperature"):
        assert getattr(task, field) == saved_config.get(field, getattr(task, field)), field
    with torch.no_grad():
        output = model(fixture_input())
    expected = json.loads((folder / "expected_outputs.json").read_text())
    for key, values in expected.items():
        saved = torch.tensor([float.fromhex(v) for v in values], dtype=torch.float64)
        torch.testing.assert_close(getattr(output, key).flatten().double(), saved, **ACROSS_ENVIRONMENTS,
                                   msg=lambda message, key=key: f"{key}: {message}")

    with torch.no_grad():  # the config given, as pipelines do: the weights are mapped all the same
        given = AutoModel.from_pretrained(folder, config=AutoConfig.from_pretrained(folder)).eval()(fixture_input())
    assert all(torch.equal(getattr(given, key), getattr(output, key)) for key in expected)

    model.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert [t["name"] for t in written["tasks"]] == model.config.task_names
    assert not {"label_name", "problem_type", "id2label", "target_mean", "logit_temperature"} & set(written)
    assert {key.split(".")[0] for key in load_file(str(tmp_path / "model.safetensors"))} == {"experts", "tasks"}
    reloaded = AutoModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        again = reloaded(fixture_input())
    for key in expected:
        assert torch.equal(getattr(again, key), getattr(output, key)), key


def test_old_single_task_weights_are_mapped_to_the_task_and_nothing_else():
    """The key mapping of an old single-task folder: `heads.` and `gate.` at the start of a key move under the one
    task; expert keys stay; a model with several tasks maps nothing (it was always saved under `tasks.`)."""
    from enecg_hf.modeling_enecg import map_single_task_keys, single_task_key_mapping

    one = EnECGConfig(experts=EXPERTS, label_name="sex", problem_type="single_label_classification", **SMALL)
    state = {"heads.dlinear.dense1.base_layer.weight": 1, "gate.out_proj.lora_A.default.weight": 2,
             "experts.dlinear.heads.x": 3, "experts.timesnet.gate.y": 4}
    assert map_single_task_keys(state, one) == {
        "tasks.sex.heads.dlinear.dense1.base_layer.weight": 1, "tasks.sex.gate.out_proj.lora_A.default.weight": 2,
        "experts.dlinear.heads.x": 3, "experts.timesnet.gate.y": 4}
    assert single_task_key_mapping(multitask_config()) == {}
    assert map_single_task_keys({"tasks.sex.gate.dense.weight": 1}, one) == {"tasks.sex.gate.dense.weight": 1}


def test_a_single_task_model_is_a_model_with_one_task():
    """`EnECGConfig(label_name=..., problem_type=...)` (the single-task fields of earlier releases) builds a one-task
    model with the same modules, outputs and loss as one built from `tasks`, and answers as a single-task Hugging
    Face model: tensors, not dicts. The single-task fields are not kept at the top level."""
    old_style = EnECGConfig(experts=EXPERTS, label_name="sex", problem_type="single_label_classification",
                            id2label={0: "female", 1: "male"}, class_weights=[1.5, 0.5], **SMALL)
    new_style = EnECGConfig(experts=EXPERTS, tasks=[{"name": "sex", "problem_type": "single_label_classification",
                                                     "class_names": ["female", "male"], "class_weights": [1.5, 0.5]}],
                            **SMALL)
    assert old_style.tasks == new_style.tasks and old_style.to_diff_dict() == new_style.to_diff_dict()
    assert not hasattr(old_style, "label_name") and old_style.problem_type is None
    torch.manual_seed(0)
    a = EnECGModel(old_style).eval()
    torch.manual_seed(0)
    b = EnECGModel(new_style).eval()
    assert not hasattr(a, "heads") and not hasattr(a, "gate") and list(a.tasks) == ["sex"]
    labels = torch.tensor([0, 1, 1])
    out_a, out_b = a(records(), labels=labels), b(records(), labels={"sex": labels})
    assert out_a.logits.shape == (3, 2) and out_a.task_losses is None
    for key in ("loss", "logits", "expert_logits", "gate_weights"):
        assert torch.equal(getattr(out_a, key), getattr(out_b, key)), key
    per_task = a.forward_tasks(records())
    assert list(per_task) == ["sex"] and torch.equal(per_task["sex"].logits, out_a.logits)
    with pytest.raises(ValueError, match="already|tasks"):
        EnECGConfig(experts=EXPERTS, tasks=new_style.tasks, label_name="age")


def test_one_forward_runs_every_expert_once_and_answers_every_task():
    model = EnECGModel(multitask_config()).eval()
    calls = {name: 0 for name in model.expert_names}
    for name, expert in model.experts.items():
        expert.register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    with torch.no_grad():
        output = model(records())
    assert calls == {"dlinear": 1, "timesnet": 1}
    assert {task: tuple(v.shape) for task, v in output.logits.items()} == {
        "rr_interval": (3, 1), "sex": (3, 2), "arrhythmia": (3, 6)}
    assert {task: tuple(v.shape) for task, v in output.expert_logits.items()}["arrhythmia"] == (3, 2, 6)
    for weights in output.gate_weights.values():
        assert torch.allclose(weights.sum(-1), torch.ones(3))
    # Each task's logits are its own ensemble's, computed on the shared features.
    features = model.compute_features(records())
    with torch.no_grad():
        sex = model.tasks["sex"](features.expert_embeddings, features.gate_inputs)
    assert torch.equal(sex.logits, output.logits["sex"])


def test_missing_labels_are_left_out_of_each_tasks_loss():
    model = EnECGModel(multitask_config()).eval()
    x = records(4)
    labels = {"rr_interval": torch.tensor([700.0, float("nan"), 900.0, float("nan")]),
              "sex": torch.tensor([0, 1, -100, 1]),
              "arrhythmia": torch.full((4,), -100)}
    output = model(x, labels=labels)
    # The same losses from the labelled records alone.
    rr = model(x[[0, 2]], labels={"rr_interval": labels["rr_interval"][[0, 2]]})
    sex = model(x[[0, 1, 3]], labels={"sex": labels["sex"][[0, 1, 3]]})
    torch.testing.assert_close(output.task_losses["rr_interval"], rr.task_losses["rr_interval"])
    torch.testing.assert_close(output.task_losses["sex"], sex.task_losses["sex"])
    assert output.task_losses["arrhythmia"].item() == 0.0  # no label in the batch: nothing to learn, no NaN
    torch.testing.assert_close(output.loss, output.task_losses["rr_interval"] + output.task_losses["sex"])
    output.loss.backward()  # gradients reach the adapters of the tasks with labels only
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    # (a new adapter's B is zero, so B is where the first gradient lands; a new head's FFN output layer is zero too,
    # so the first gradient of its FFN lands on that layer's adapter)
    assert all(grads[n] is not None and grads[n].abs().sum() > 0 for n in grads if n.startswith("tasks.sex.heads.")
               and "out_proj.lora_B" in n)
    assert all(grads[n] is None or grads[n].abs().sum() == 0 for n in grads if n.startswith("tasks.arrhythmia."))
    with pytest.raises(ValueError, match="dict"):
        model(x, labels=labels["sex"])
    with pytest.raises(ValueError, match="unknown tasks"):
        model(x, labels={"potassium_flag": labels["sex"]})


def test_a_task_of_a_multitask_model_learns_what_a_single_task_model_learns():
    """The training core fits one task of a multi-task model exactly as it fits a single-task model on the same
    features: the five-task model is not worse than five single-task models, it is the same per task."""
    from enecg_hf.features import FeatureTable
    from enecg_hf.training import FitSettings, fit_enecg, predict

    multi = EnECGModel(multitask_config())
    single_config = EnECGConfig(experts=EXPERTS, label_name="sex", problem_type="single_label_classification",
                                id2label={0: "female", 1: "male"}, **SMALL)
    single = EnECGModel(single_config)
    generator = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 2, (24,), generator=generator)
    table = FeatureTable.from_model(multi, records(24), labels, groups=np.arange(24))
    settings = FitSettings(epochs=4, inner_folds=2, gate_epochs=3)
    rows = np.arange(16)
    fit_enecg(multi.tasks["sex"], table, rows, settings)
    fit_enecg(single, table, rows, settings)
    held_out = np.arange(16, 24)
    a, b = predict(multi.tasks["sex"], table, held_out), predict(single, table, held_out)
    assert np.array_equal(a["logits"], b["logits"]) and np.array_equal(a["gate_weights"], b["gate_weights"])
    assert multi.config.tasks[1]["class_weights"] == single.config.tasks[0]["class_weights"]  # fitted into the entry


def test_multitask_save_load_and_peft_adapter_round_trip(tmp_path):
    from peft import PeftModel

    from enecg_hf import load_adapter_base

    model = EnECGModel(multitask_config()).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert [task["name"] for task in saved["tasks"]] == ["rr_interval", "sex", "arrhythmia"]
    assert saved["tasks"][0]["target_mean"] == 800.0 and saved["tasks"][2]["loss_weight"] == 0.5
    reloaded = EnECGModel.from_pretrained(tmp_path).eval()
    assert not any(p.requires_grad for n, p in reloaded.named_parameters() if "lora_" not in n)
    x = records()
    with torch.no_grad():
        expected, got = model(x), reloaded(x)
        via_peft = PeftModel.from_pretrained(load_adapter_base(tmp_path), str(tmp_path / "adapter")).eval()(x)
    for task in expected.logits:
        assert torch.equal(expected.logits[task], got.logits[task])
        torch.testing.assert_close(expected.logits[task], via_peft.logits[task])


@pytest.mark.parametrize("tasks, message", [
    ([{"name": "age", "problem_type": "regression"}] * 2, "unique"),
    ([{"name": "age", "problem_type": "ordinal"}], "problem_type"),
    ([{"name": "sex", "problem_type": "single_label_classification"}], "class_names"),
    ([{"name": "a.b", "problem_type": "regression"}], "without dots"),
    ([{"name": "age", "problem_type": "regression", "target_std": 0.0}], "target_std"),
    ([{"name": "age", "problem_type": "regression", "logit_temperature": -1.0}], "logit_temperature"),
    ([{"name": "age", "problem_type": "regression", "colour": "red"}], "unknown keys"),
    ([], "non-empty"),
])
def test_bad_task_configs_name_the_field(tasks, message):
    with pytest.raises(ValueError, match=message):
        EnECGConfig(experts=EXPERTS, tasks=tasks)


def test_the_shipped_multitask_configs_build(tmp_path):
    for name in ("multitask", "paper_multitask"):
        config = EnECGConfig(**json.loads((REPO / "hub_configs" / f"{name}.json").read_text()))
        assert config.task_names == list(TASKS)
    small = EnECGConfig(**{**json.loads((REPO / "hub_configs" / "multitask.json").read_text()),
                           "experts": EXPERTS})
    model = EnECGModel(small).eval()
    with torch.no_grad():
        assert set(model(records(1)).logits) == set(TASKS)


@pytest.mark.slow
def test_train_py_labels_all_trains_one_model_that_serves_every_task(tmp_path):
    """`train.py --labels all` on records with any subset of labels (age missing for some, potassium for all): one
    model with a task per labelled column, per-task metrics and card sections, and a pipeline that answers every task
    in one call from the folder alone (enecg_hf blocked, trust_remote_code)."""
    import subprocess
    import sys

    from enecg_hf.data import build_dataset
    from helpers import BLOCK_ENECG
    from test_training import train

    dataset = build_dataset("simulated", limit=24, seed=3)
    dataset = dataset.map(lambda row, i: {"age": None if i % 4 == 0 else row["age"], "potassium_flag": None},
                          with_indices=True)
    dataset.save_to_disk(str(tmp_path / "records"))
    train("--dataset", str(tmp_path / "records"), "--labels", "all", "--experts", "dlinear,timesnet", "--epochs", "4",
          "--inner_folds", "2", "--gate_epochs", "3", "--batch_size", "4", "--folds", "2", "--output_dir", "out",
          cwd=tmp_path)
    out = tmp_path / "out"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["labels"] == ["rr_interval", "age", "sex", "arrhythmia"]  # potassium: no label anywhere
    assert {name: m["records"] for name, m in metrics["tasks"].items()} == {
        "rr_interval": 24, "age": 18, "sex": 24, "arrhythmia": 24}
    assert metrics["tasks"]["rr_interval"]["cv"]["mae"]["mean"] > 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir()) == sorted(metrics["labels"])
    card = (out / "README.md").read_text()
    assert "multi-task ensemble for **rr_interval, age, sex, arrhythmia**" in card
    assert "### age (regression, years, 18 records)" in card
    config = json.loads((out / "config.json").read_text())
    assert [t["name"] for t in config["tasks"]] == metrics["labels"] and config["tasks"][0]["target_std"] > 1

    script = BLOCK_ENECG + (
        "import json, numpy as np\n"
        "from transformers import pipeline\n"
        f"ecg = pipeline(model={str(out)!r}, trust_remote_code=True)\n"
        "t = np.arange(5000) / 500\n"
        "signal = np.stack([np.sin(2 * np.pi * 1.2 * t) * (1 + 0.1 * i) for i in range(12)]).astype(np.float32)\n"
        "print(json.dumps(ecg(signal, sampling_rate=500)))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert list(answer["tasks"]) == metrics["labels"]
    assert answer["tasks"]["rr_interval"]["unit"] == "ms" and answer["tasks"]["age"]["unit"] == "years"
    assert answer["tasks"]["sex"]["label"] in ("female", "male")
    for task in answer["tasks"].values():
        assert set(task["gate_weights"]) == {"dlinear", "timesnet"}
        assert sum(task["gate_weights"].values()) == pytest.approx(1.0, abs=1e-4)


# A model config's fields that describe a single task: earlier releases kept a single-task model's at the top level.
TASK_FIELDS_OFF_THE_MODEL_CONFIG = {"label_name", "label_unit", "problem_type", "target_mean", "target_std",
                                    "class_weights", "logit_temperature", "id2label", "label2id", "num_labels"}


def test_every_model_takes_one_code_path():
    """Every model is a list of tasks, with one code path: no code of the package, train.py, the Space, bench or the
    tests asks whether a model has one task or several (`is_multitask`), keeps heads and a gate outside
    `model.tasks` (the mixin a single-task model shared with its tasks, `task_ensembles`), or reads a task's fields
    off a model config (`model.config.label_name`: each task's are in `config.tasks`). Read with `ast`;
    configuration_enecg.py maps the single-task fields of old configs (`single_task_entry`) and is left out of the
    last check."""
    import ast

    files = [*(REPO / "enecg_hf").rglob("*.py"), REPO / "train.py", *(REPO / "space").glob("*.py"),
             *(REPO / "bench").glob("*.py"), *(REPO / "tests").rglob("*.py")]
    found = []
    for path in files:
        tree = ast.parse(path.read_text(), str(path))
        where = path.relative_to(REPO)
        for node in ast.walk(tree):
            name = node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", None)
            if name in ("is_multitask", "EnECGTaskMixin", "task_ensembles"):
                found.append(f"{where}:{node.lineno} {name}")
            if (isinstance(node, ast.Attribute) and node.attr in TASK_FIELDS_OFF_THE_MODEL_CONFIG
                    and isinstance(node.value, ast.Attribute) and node.value.attr == "config"
                    and path.name != "configuration_enecg.py"):
                found.append(f"{where}:{node.lineno} .config.{node.attr} (a task's field: config.task_configs[i])")
    assert not found, "\n".join(found)
    model = EnECGModel(EnECGConfig(experts=EXPERTS, **SMALL))
    assert not hasattr(model, "heads") and not hasattr(model, "gate") and list(model.tasks) == ["label"]
    assert {key.split(".")[0] for key in model.state_dict()} == {"experts", "tasks"}
