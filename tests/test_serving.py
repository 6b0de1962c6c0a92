"""Serving: the transformers pipeline (in-process and through `trust_remote_code` where enecg_hf is blocked), the
Inference-Endpoint handler, the `enecg` console script, explanations and their plots, and every bad-input case."""

from __future__ import annotations

import base64
import functools
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch


from helpers import BLOCK_ENECG, STANDARD, build_model_folder, call_from_threads, shared

from ecg_files import peak_allocation, write_header, write_mat_zeros, write_record


@pytest.fixture(scope="module")
def regression_folder(tmp_path_factory) -> Path:
    return build_model_folder(tmp_path_factory.mktemp("serving") / "rr",
                              ["dlinear", "timesnet", "features", "median_beat"], target_mean=800.0, target_std=150.0)


@pytest.fixture(scope="module")
def classification_folder(tmp_path_factory) -> Path:
    return build_model_folder(
        tmp_path_factory.mktemp("serving") / "sex", ["dlinear", "timesnet"], label_name="sex", label_unit=None,
        problem_type="single_label_classification", num_labels=2, id2label={0: "female", 1: "male"},
        label2id={"female": 0, "male": 1})


@pytest.fixture(scope="module")
def ecg(regression_folder):
    import enecg_hf  # noqa: F401
    from transformers import pipeline

    return pipeline(model=str(regression_folder), trust_remote_code=True)


def ludb_signal(record: str = "1") -> np.ndarray:
    import wfdb

    return wfdb.rdrecord(str(shared("ludb", "data", record))).p_signal.T.astype(np.float32)


# ------------------------------------------------------------------------------------------------ export
def test_export_writes_pipeline_handler_and_custom_pipelines(regression_folder):
    files = {p.name for p in regression_folder.iterdir()}
    assert {"pipeline_enecg.py", "io_enecg.py", "preprocessing_enecg.py", "handler.py", "requirements.txt"} <= files
    config = json.loads((regression_folder / "config.json").read_text())
    assert config["custom_pipelines"] == {
        "ecg-analysis": {"impl": "pipeline_enecg.EnECGPipeline", "pt": ["AutoModel"], "type": "multimodal"}}
    assert "torch" in (regression_folder / "requirements.txt").read_text()


@pytest.mark.slow
def test_any_saved_model_folder_is_served_by_the_pipeline_offline(tmp_path):
    """`EnECGModel.save_pretrained` (which `push_to_hub` calls) writes the pipeline and its registration: the folder
    works with `pipeline(model=...)` offline where enecg_hf cannot be imported, and so does the folder a model loaded
    from it through remote code saves again. (`enecg export` only adds the endpoint's handler.py.)"""
    import json as json_module

    from enecg_hf import EnECGConfig, EnECGModel

    config = json_module.loads((Path(__file__).resolve().parents[1] / "hub_configs" / "tiny.json").read_text())
    config["experts"] = [e for e in config["experts"] if e["name"] == "dlinear"]
    config.pop("model_type", None)
    torch.manual_seed(0)
    folder = tmp_path / "plain"
    EnECGModel(EnECGConfig(**config)).eval().save_pretrained(folder)
    assert {"pipeline_enecg.py", "io_enecg.py", "preprocessing_enecg.py"} <= {p.name for p in folder.iterdir()}
    assert not (folder / "handler.py").exists()
    assert "ecg-analysis" in json_module.loads((folder / "config.json").read_text())["custom_pipelines"]
    np.save(tmp_path / "signal.npy", ludb_signal("3"))
    script = BLOCK_ENECG + textwrap.dedent(
        f"""
        import numpy as np
        from transformers import AutoModel, pipeline
        signal = np.load({str(tmp_path / "signal.npy")!r})
        first = pipeline(model={str(folder)!r}, trust_remote_code=True)(signal, sampling_rate=500)
        AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True).save_pretrained({str(tmp_path / "again")!r})
        second = pipeline(model={str(tmp_path / "again")!r}, trust_remote_code=True)(signal, sampling_rate=500)
        assert "enecg_hf" not in type(first).__module__
        print("VALUES", first["value"], second["value"])
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    first, second = map(float, run.stdout.split("VALUES", 1)[1].split())
    assert np.isfinite(first) and first == second


# ------------------------------------------------------------------------------------------------ pipeline
def test_pipeline_without_task_name_on_real_ludb_records(ecg, regression_folder):
    result = ecg(str(shared("ludb", "data", "1")))
    assert result["label"] == "rr_interval" and result["unit"] == "ms" and np.isfinite(result["value"])
    assert set(result["gate_weights"]) == {"dlinear", "timesnet", "features", "median_beat"}
    assert sum(result["gate_weights"].values()) == pytest.approx(1.0, abs=1e-5)
    assert set(result["expert_predictions"]) == set(result["gate_weights"])
    # The prediction is the gate-weighted sum of the experts' own predictions.
    mixed = sum(result["gate_weights"][n] * result["expert_predictions"][n] for n in result["gate_weights"])
    assert result["value"] == pytest.approx(mixed, rel=1e-4)
    assert result["warnings"] == [] and result["source"].endswith("1")
    # Same record given as its header file, and as the array the model would see.
    assert ecg(str(shared("ludb", "data", "1.hea")))["value"] == pytest.approx(result["value"], rel=1e-6)
    assert ecg(ludb_signal("1"), sampling_rate=500)["value"] == pytest.approx(result["value"], rel=1e-5)


def test_pipeline_matches_the_model_on_prepared_inputs(ecg, regression_folder):
    """The pipeline's steps are the training data's: the same numbers as building the dataset and calling the model."""
    from enecg_hf.data import build_dataset
    from transformers import AutoModel

    dataset = build_dataset("ludb", str(shared("ludb")), limit=2).with_format("numpy")
    model = AutoModel.from_pretrained(regression_folder).eval()
    with torch.no_grad():
        expected = model(torch.from_numpy(np.asarray(dataset["signal"][:2], dtype=np.float32))).logits[:, 0]
    records = [str(shared("ludb", "data", record_id)) for record_id in dataset["record_id"][:2]]
    got = [r["value"] for r in ecg(records)]
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-5)


def test_pipeline_reads_every_input_kind(ecg, tmp_path):
    signal = ludb_signal("2")
    reference = ecg(signal, sampling_rate=500)["value"]
    # Resampled (250 Hz), reordered and respelled leads, nested lists, dicts, CSV with a header, .npy (samples, leads).
    half = signal[:, ::2]
    order = [5, 0, 11, 3, 1, 2, 4, 6, 7, 8, 9, 10]
    names = [STANDARD[i].lower() for i in order]
    assert abs(ecg(half, sampling_rate=250)["value"] - reference) < 0.05 * abs(reference) + 5
    assert ecg(signal[order], sampling_rate=500, lead_names=names)["value"] == pytest.approx(reference, rel=1e-6)
    assert ecg(signal.tolist(), sampling_rate=500)["value"] == pytest.approx(reference, rel=1e-6)
    assert ecg({"signal": signal, "sampling_rate": 500, "lead_names": STANDARD})["value"] == pytest.approx(reference,
                                                                                                          rel=1e-6)
    csv = tmp_path / "record.csv"
    np.savetxt(csv, signal.T, delimiter=",", header=",".join(STANDARD), comments="", fmt="%.6f")
    assert ecg(str(csv), sampling_rate=500)["value"] == pytest.approx(reference, rel=1e-3)
    npy = tmp_path / "record.npy"
    np.save(npy, signal.T)
    assert ecg(str(npy), sampling_rate=500)["value"] == pytest.approx(reference, rel=1e-6)
    # Challenge .mat/.hea pair (real file): by header or by .mat path.
    challenge = shared("challenge2021_sample50", "E07500.hea")
    by_header, by_mat = ecg(str(challenge)), ecg(str(challenge.with_suffix(".mat")))
    assert np.isfinite(by_header["value"]) and by_header["value"] == by_mat["value"]
    # A batch of mixed inputs keeps its order.
    batch = ecg([str(npy), signal.tolist(), str(challenge)], sampling_rate=500)
    assert [r["value"] for r in batch] == pytest.approx([reference, reference, by_header["value"]], rel=1e-3)


def test_pipeline_batches_records(ecg, tmp_path):
    """`batch_size` runs records through the model together (transformers' own collation needs a tokenizer or feature
    extractor); each record keeps its own prediction, warnings and source, in order, the last batch partial."""
    signal = ludb_signal("4")
    npy = tmp_path / "record.npy"
    np.save(npy, signal)
    records = [signal, signal[:, :2500], str(npy), str(shared("ludb", "data", "6")), signal * 1000]
    one_by_one = ecg(records, sampling_rate=500)
    for batch_size in (2, 4):
        batched = ecg(records, sampling_rate=500, batch_size=batch_size)
        assert [r["source"] for r in batched] == [r["source"] for r in one_by_one]
        assert [r["warnings"] for r in batched] == [r["warnings"] for r in one_by_one]
        for got, expected in zip(batched, one_by_one, strict=True):
            assert got["value"] == pytest.approx(expected["value"], rel=1e-5)
            assert got["gate_weights"] == pytest.approx(expected["gate_weights"], rel=1e-5)
    assert any("zero-padded" in w for w in one_by_one[1]["warnings"]) and not one_by_one[0]["warnings"]


def test_one_pipeline_serves_threads_with_the_serial_results():
    """8 threads share one pipeline of a model with MOMENT, each predicting different records one at a time and in
    batches of 2. MOMENT kept each call's normalisation statistics on a shared module: concurrent calls got each other's
    (values off by milliseconds, or `RuntimeError: shape ... is invalid`). Every call must give its serial result."""
    from enecg_hf import EnECGConfig, EnECGModel, EnECGPipeline
    from enecg_hf.data.simulate import simulate_record

    experts = [{"name": "moment", "type": "moment", "input_length": 64, "leads": ["II", "V5"]},
               {"name": "dlinear", "type": "dlinear", "input_length": 500, "leads": ["II"]}]
    torch.manual_seed(0)
    model = EnECGModel(EnECGConfig(experts=[{**e, "settings": {"preset": "tiny"}} for e in experts], sampling_rate=500,
                                   input_length=5000, gate_input_length=100, target_mean=800.0, target_std=150.0))
    ecg = EnECGPipeline(model=model.eval())
    records = [simulate_record(i, seed=11)[0] for i in range(4)]
    calls = [functools.partial(ecg, record, sampling_rate=500) for record in records]
    calls += [functools.partial(ecg, pair, sampling_rate=500, batch_size=2)
              for pair in ([records[0], records[3]], [records[2], records[1]])]
    serial, results = call_from_threads(calls)
    wrong = [i for i, result in results if result != serial[i]]
    assert not wrong, f"{len(wrong)} of {len(results)} concurrent calls differ from the serial result"


def test_registered_task_runs_the_installed_pipeline_class(regression_folder):
    """With enecg_hf imported, the installed pipeline class serves a saved folder without remote code when named;
    a bare `pipeline("ecg-analysis", model=folder)` asks for trust_remote_code because the folder's config.json names
    its own copy of the pipeline (transformers' rule for `custom_pipelines`), as docs/serving.md says."""
    from transformers import AutoModel, pipeline

    from enecg_hf import EnECGModel, EnECGPipeline

    installed = pipeline("ecg-analysis", model=str(regression_folder), pipeline_class=EnECGPipeline)
    assert type(installed) is EnECGPipeline and type(installed.model) is EnECGModel
    direct = EnECGPipeline(model=AutoModel.from_pretrained(regression_folder))
    record = str(shared("ludb", "data", "7"))
    assert installed(record)["value"] == direct(record)["value"]
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        pipeline("ecg-analysis", model=str(regression_folder))
    # A model built in this process (no custom_pipelines in its config) gets the registered task.
    model = EnECGModel.from_pretrained(regression_folder)
    model.config.custom_pipelines = None
    assert type(pipeline("ecg-analysis", model=model)) is EnECGPipeline


def test_pipeline_warns_about_cropping_padding_and_flat_leads(ecg):
    signal = ludb_signal("3")
    long = ecg(np.concatenate([signal, signal], axis=1), sampling_rate=500)["warnings"]
    assert any("first 10 s" in w for w in long)
    short = signal[:, :2500].copy()
    short[7] = 0.0
    warnings = ecg(short, sampling_rate=500)["warnings"]
    assert any("zero-padded" in w for w in warnings) and any("flat leads" in w and "V2" in w for w in warnings)
    nan = signal.copy()
    nan[0, 100:110] = np.nan
    assert any("10 NaN/inf samples interpolated" in w for w in ecg(nan, sampling_rate=500)["warnings"])
    assert any("millivolts" in w for w in ecg(signal * 1000, sampling_rate=500)["warnings"])


def test_classification_pipeline_returns_labels_scores_and_top_k(classification_folder):
    from transformers import pipeline

    ecg = pipeline(model=str(classification_folder), trust_remote_code=True)
    result = ecg(str(shared("ludb", "data", "4")), top_k=1)
    assert result["label"] in ("female", "male") and 0.5 <= result["score"] <= 1.0
    assert len(result["scores"]) == 1 and result["scores"][0]["label"] == result["label"]
    full = ecg(str(shared("ludb", "data", "4")))
    assert sorted(s["label"] for s in full["scores"]) == ["female", "male"]
    assert sum(s["score"] for s in full["scores"]) == pytest.approx(1.0, abs=1e-5)
    for expert in full["expert_predictions"].values():
        assert expert["label"] in ("female", "male") and 0.5 <= expert["score"] <= 1.0


@pytest.mark.parametrize(
    "inputs, kwargs, reason",
    [
        (np.zeros(5000), {"sampling_rate": 500}, "bad_shape"),  # 1-D
        (np.zeros((3, 5000)), {"sampling_rate": 500}, "bad_shape"),  # 3 rows, 12 names
        (np.zeros((3, 5000)), {"sampling_rate": 500, "lead_names": ["I", "II", "III"]}, "missing_leads"),
        (np.zeros((12, 5000)), {"sampling_rate": 500, "lead_names": STANDARD[:11] + ["Vx"]}, "unknown_lead"),
        (np.full((12, 5000), np.nan), {"sampling_rate": 500}, "not_finite"),
        ("nan_run", {"sampling_rate": 500}, "nan_run_too_long"),
        (np.zeros((12, 5000)), {"sampling_rate": 5}, "bad_sampling_rate"),
        (np.zeros((12, 5000)), {"sampling_rate": 1e6}, "bad_sampling_rate"),
        (np.zeros((12, 5000)), {"sampling_rate": float("nan")}, "bad_sampling_rate"),
        (np.zeros((12, 5000)), {}, "bad_sampling_rate"),  # arrays carry no rate
        (np.zeros((12, 500 * 61)), {"sampling_rate": 500}, "too_long"),  # config.max_input_seconds = 60
        ("not_an_ecg", {}, None),
        ([["a", "b"], ["c", "d"]], {"sampling_rate": 500}, "bad_input"),
        ([], {}, "bad_input"),
        (np.zeros((12, 5000)), {"sampling_rate": 10**400}, "bad_sampling_rate"),
        (np.zeros((12, 5000)), {"sampling_rate": "500"}, "bad_sampling_rate"),
        (np.zeros((12, 5000)), {"sampling_rate": 500, "lead_names": 5}, "bad_lead_names"),
        (np.zeros((12, 5000)), {"sampling_rate": 500, "lead_names": "I,II"}, "bad_lead_names"),
        (np.zeros((1, 5000)), {"sampling_rate": 500, "lead_names": ["II"], "fill_missing_leads": "no"},
         "bad_parameters"),
        (np.zeros((12, 5000)), {"sampling_rate": 500, "top_k": "3"}, "bad_parameters"),
        (np.zeros((12, 1)), {"sampling_rate": 250}, "too_short"),
        ("scaled_3e38", {"sampling_rate": 500}, "implausible_amplitude"),
        ("npz_as_npy", {"sampling_rate": 500}, "unreadable_signal"),
        ("header_rate_-1", {}, "unreadable_header"),
        ("header_gain_-200", {}, "unreadable_header"),
        ("header_length_0", {}, "empty_signal"),  # and an empty .dat (issue 25: a bare ValueError)
    ],
)
def test_pipeline_rejects_bad_input_with_a_clear_value_error(ecg, tmp_path, inputs, kwargs, reason):
    if isinstance(inputs, str) and inputs == "nan_run":
        inputs = np.random.default_rng(0).normal(0, 0.1, (12, 5000)).astype(np.float32)
        inputs[2, 1000:1500] = np.nan  # 1 s of NaN: too long to interpolate
    elif isinstance(inputs, str) and inputs == "not_an_ecg":
        (tmp_path / "photo.hea").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
        inputs = str(tmp_path / "photo.hea")
    elif isinstance(inputs, str) and inputs == "scaled_3e38":
        inputs = ludb_signal("2")
        inputs = inputs / np.abs(inputs).max() * np.float32(3e38)  # finite, but its statistics overflow float32
    elif isinstance(inputs, str) and inputs == "npz_as_npy":
        np.savez(tmp_path / "record.npz", signal=ludb_signal("2"))
        inputs = str((tmp_path / "record.npz").rename(tmp_path / "record.npy"))
    elif isinstance(inputs, str) and inputs == "header_length_0":
        inputs = str(write_header(tmp_path / "empty.hea", sig_len=0).with_suffix(""))
        (tmp_path / "empty.dat").write_bytes(b"")
    elif isinstance(inputs, str) and inputs.startswith("header_"):
        base = write_record(tmp_path, "rec")  # then its header is rewritten with a value wfdb would replace
        write_header(tmp_path / "rec.hea", **({"fs": "-1"} if inputs == "header_rate_-1" else {"gain": "-200"}))
        inputs = str(base)
    with pytest.raises(ValueError) as error:
        ecg(inputs, **kwargs)
    if reason is not None:
        assert getattr(error.value, "reason", None) == reason, str(error.value)
    assert len(str(error.value)) > 20  # a sentence, not a bare code
    assert "NaN" not in str(error.value) or reason == "not_finite"  # says what is wrong, e.g. not "contains NaN"


@pytest.mark.parametrize("hostile", ["mat_bomb", "huge_header", "one_line_csv"])
def test_pipeline_refuses_hostile_files_before_reading_their_samples(ecg, tmp_path, hostile):
    """A 120 kB .mat inflating to 120 MB, a header claiming 12 x 1e6 samples (sparse 24 MB .dat) and a 1.6 MB
    one-line CSV: refused from their headers (line lengths for the CSV), allocating a few MB."""
    if hostile == "mat_bomb":
        write_mat_zeros(tmp_path / "bomb.mat", 12, 5_000_000)
        record, reason = write_header(tmp_path / "bomb.hea", file_name="bomb.mat"), "too_long"
    elif hostile == "huge_header":
        record, reason = write_header(tmp_path / "huge.hea", sig_len=1_000_000), "too_long"
        with open(tmp_path / "huge.dat", "wb") as handle:
            handle.truncate(12 * 1_000_000 * 2)
    else:
        record, reason = tmp_path / "one_line.csv", "bad_shape"
        record.write_text(",".join(["0.1"] * 400_000) + "\n")
    peak, error = peak_allocation(ecg, str(record), sampling_rate=500)
    assert getattr(error, "reason", None) == reason, error
    assert peak < 20 * (1 << 20), f"{peak / (1 << 20):.0f} MB allocated to refuse {hostile}"


@pytest.mark.slow
def test_a_model_that_computes_nan_gives_an_error_not_a_nan_value(regression_folder, tmp_path):
    """A non-finite output (here from a broken gate weight) is refused; the console script prints valid JSON."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(regression_folder)
    with torch.no_grad():
        model.tasks["rr_interval"].gate.out_proj.base_layer.bias.fill_(float("nan"))
    broken = tmp_path / "broken"
    shutil.copytree(regression_folder, broken)
    model.save_pretrained(broken)
    from transformers import pipeline

    with pytest.raises(ValueError) as error:
        pipeline(model=str(broken), trust_remote_code=True)(ludb_signal("2"), sampling_rate=500)
    assert error.value.reason == "non_finite_output"
    npy = tmp_path / "record.npy"
    np.save(npy, ludb_signal("2"))
    run = subprocess.run([sys.executable, "-m", "enecg_hf.tools.cli", "predict", str(npy), "--model", str(broken),
                          "--sampling-rate", "500"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 1
    assert json.loads(run.stdout, parse_constant=lambda name: pytest.fail(f"bare {name} in {run.stdout}"))[
        "reason"] == "non_finite_output"


@pytest.mark.slow
def test_pipeline_loads_with_trust_remote_code_where_enecg_hf_is_blocked(regression_folder, ecg, tmp_path):
    expected = ecg(str(shared("ludb", "data", "5")))
    script = BLOCK_ENECG + textwrap.dedent(
        f"""
        import json
        from transformers import pipeline
        ecg = pipeline(model={str(regression_folder)!r}, trust_remote_code=True)
        assert "enecg_hf" not in type(ecg).__module__, type(ecg).__module__
        result = ecg({str(shared("ludb", "data", "5"))!r})
        batched = ecg([{str(shared("ludb", "data", "5"))!r}] * 3, batch_size=2)
        assert all(abs(r["value"] - result["value"]) <= 1e-5 * abs(result["value"]) for r in batched), batched
        try:
            ecg([[1.0, 2.0]], sampling_rate=500)
        except ValueError as error:
            result["error_reason"] = error.reason
        print("RESULT", json.dumps(result))
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    remote = json.loads(run.stdout.split("RESULT", 1)[1])
    assert remote.pop("error_reason") == "bad_shape"
    assert remote == expected


# ------------------------------------------------------------------------------------------------ handler
@pytest.fixture(scope="module")
def handler(regression_folder):
    sys.path.insert(0, str(regression_folder))
    try:
        import importlib

        module = importlib.import_module("handler")
    finally:
        sys.path.remove(str(regression_folder))
    return module, module.EndpointHandler(str(regression_folder))


def _npy_base64(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return base64.b64encode(buffer.getvalue()).decode()


def test_handler_round_trip_with_json_and_base64(handler, ecg):
    module, endpoint = handler
    signal = ludb_signal("6")
    expected = ecg(signal, sampling_rate=500)
    request = {"inputs": {"signal": signal.tolist(), "sampling_rate": 500, "lead_names": STANDARD}}
    response = json.loads(json.dumps(endpoint(json.loads(json.dumps(request)))))
    assert isinstance(response, list) and len(response) == 1
    assert response[0]["value"] == pytest.approx(expected["value"], rel=1e-5)
    assert response[0]["gate_weights"] == pytest.approx(expected["gate_weights"], rel=1e-5)
    encoded = endpoint({"inputs": {"npy_base64": _npy_base64(signal), "sampling_rate": 500}})
    assert encoded[0]["value"] == pytest.approx(expected["value"], rel=1e-5)
    batch = endpoint({"inputs": [{"npy_base64": _npy_base64(signal[:, ::2]), "sampling_rate": 250},
                                 {"signal": signal.tolist(), "sampling_rate": 500}], "parameters": {"top_k": 2}})
    assert len(batch) == 2 and batch[1]["value"] == pytest.approx(expected["value"], rel=1e-5)


@pytest.mark.parametrize(
    "request_, reason",
    [
        ({"signal": [[1, 2]]}, "bad_request"),  # no "inputs"
        ({"inputs": {"signal": [[0.0] * 5000] * 12}}, "bad_sampling_rate"),
        ({"inputs": {"signal": "abc", "sampling_rate": 500}}, "bad_shape"),
        ({"inputs": {"signal": [[0.0] * 5000] * 3, "sampling_rate": 500}}, "bad_shape"),
        ({"inputs": {"npy_base64": "@@not base64@@", "sampling_rate": 500}}, "bad_npy"),
        ({"inputs": {"npy_base64": base64.b64encode(b"not an npy file").decode(), "sampling_rate": 500}}, "bad_npy"),
        ({"inputs": {"signal": [[0.0] * 5000] * 12, "sampling_rate": 500}, "parameters": {"device": "cuda"}},
         "bad_parameters"),
        ({"inputs": [{"signal": [[0.0] * 10] * 12, "sampling_rate": 500}] * 33}, "too_many_records"),
        ({"inputs": {"signal": [[0.0] * 5000] * 12, "sampling_rate": 500, "extra": 1}}, "bad_request"),
        ({"inputs": {"signal": [[float("nan")] * 5000] * 12, "sampling_rate": 500}}, "not_finite"),
        ({"inputs": {"signal": [[0.0] * 5000] * 12, "sampling_rate": 10**400}}, "bad_sampling_rate"),
        ({"inputs": {"signal": [[0.0] * 5000] * 12, "sampling_rate": "500"}}, "bad_sampling_rate"),
        ({"inputs": {"signal": [[0.0] * 5000] * 12, "sampling_rate": True}}, "bad_sampling_rate"),
        ({"inputs": {"signal": [[0.0] * 5000] * 12, "sampling_rate": 500, "lead_names": 5}}, "bad_lead_names"),
        ({"inputs": {"signal": [[0.0] * 5000] * 12, "sampling_rate": 500, "lead_names": list(range(12))}},
         "bad_lead_names"),
        ({"inputs": {"signal": [[0.1] * 5000], "sampling_rate": 500, "lead_names": ["II"]},
          "parameters": {"fill_missing_leads": "no"}}, "bad_parameters"),
        ({"inputs": {"signal": [[0.0] * 5000] * 12, "sampling_rate": 500}, "parameters": {"top_k": "x"}},
         "bad_parameters"),
        ({"inputs": {"signal": [[0.0] * 5000] * 12, "sampling_rate": 500}, "parameters": {"top_k": True}},
         "bad_parameters"),
        ({"inputs": {"signal": [["0.1"] * 5000] * 12, "sampling_rate": 500}}, "bad_shape"),
        ({"inputs": {"signal": [[True] * 5000] * 12, "sampling_rate": 500}}, "bad_shape"),
        ({"inputs": {"npy_base64": "npz", "sampling_rate": 500}}, "bad_npy"),
        ({"inputs": {"signal": "scaled_3e38", "sampling_rate": 500}}, "implausible_amplitude"),
    ],
)
def test_handler_answers_bad_requests_with_json_errors(handler, request_, reason):
    item = request_.get("inputs")
    if isinstance(item, dict) and item.get("npy_base64") == "npz":  # an np.savez archive in place of a .npy file
        archive = io.BytesIO()
        np.savez(archive, signal=np.zeros((12, 5000)))
        item["npy_base64"] = base64.b64encode(archive.getvalue()).decode()
    if isinstance(item, dict) and item.get("signal") == "scaled_3e38":
        signal = ludb_signal("3")
        item["signal"] = (signal / np.abs(signal).max() * np.float32(3e38)).tolist()
    response = handler[1](request_)
    assert isinstance(response, dict) and response["reason"] == reason, response
    assert isinstance(response["error"], str) and len(response["error"]) > 10
    json.dumps(response, allow_nan=False)


def test_handler_size_limits(handler):
    module, endpoint = handler
    too_long = np.zeros((12, module.MAX_SAMPLES // 12 + 1), dtype=np.float32)
    assert endpoint({"inputs": {"npy_base64": _npy_base64(too_long), "sampling_rate": 500}})["reason"] == "too_large"
    pickled = io.BytesIO()
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    response = endpoint({"inputs": {"npy_base64": base64.b64encode(pickled.getvalue()).decode(), "sampling_rate": 500}})
    assert response["reason"] == "bad_npy"  # object arrays would need unpickling: refused


# ------------------------------------------------------------------------------------------------ CLI
@pytest.mark.slow
def test_console_script_predicts_one_json_line_per_record(regression_folder, tmp_path):
    records = [str(shared("ludb", "data", "7")), str(tmp_path / "missing"), str(shared("ludb", "data", "8.hea"))]
    png = tmp_path / "explain.png"
    run = subprocess.run([sys.executable, "-m", "enecg_hf.tools.cli", "predict", *records, "--model",
                          str(regression_folder), "--explain", str(png)],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = [json.loads(line) for line in run.stdout.splitlines()]
    assert run.returncode == 1  # one record failed; the others are still predicted
    assert [line.get("source") for line in lines] == records
    assert np.isfinite(lines[0]["value"]) and "gate_weights" in lines[2]
    assert lines[1]["reason"] == "missing_file" and "not a readable ECG record" in lines[1]["error"]
    assert lines[0]["explanation"] == str(png) and png.stat().st_size > 10_000
    assert Path(lines[2]["explanation"]).name == "explain-3.png"


@pytest.mark.slow
def test_console_script_reports_an_unwritable_explanation_folder_and_a_missing_model(regression_folder, tmp_path):
    npy = tmp_path / "record.npy"
    np.save(npy, ludb_signal("7"))
    records = [str(npy), str(shared("ludb", "data", "8.hea"))]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-m", "enecg_hf.tools.cli", "predict", *records, "--model",
                          str(regression_folder), "--sampling-rate", "500", "--explain", "/nonexistent/x.png"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 1, run.stderr
    lines = [json.loads(line) for line in run.stdout.splitlines()]
    assert [line["source"] for line in lines] == records and all(np.isfinite(line["value"]) for line in lines)
    assert "--explain /nonexistent/x.png: the folder /nonexistent does not exist" in run.stderr
    assert "Traceback" not in run.stderr

    for model, message in [("/no/such/dir", "no such folder"), (str(tmp_path), "not a saved model folder")]:
        run = subprocess.run([sys.executable, "-m", "enecg_hf.tools.cli", "predict", str(npy), "--model", model,
                              "--sampling-rate", "500"], capture_output=True, text=True, timeout=300, env=env)
        assert run.returncode == 2 and run.stdout == ""
        assert f"--model {model}: {message}" in run.stderr and "Traceback" not in run.stderr, run.stderr


@pytest.mark.parametrize("where", ["_sanitize_parameters", "preprocess"])
def test_console_script_reports_failing_model_code_in_one_line(regression_folder, tmp_path, capsys, where):
    """The model folder's own code raising something other than a bad-record error (issue 25: an uncaught TypeError
    traceback, exit 1): while loading the pipeline (`_sanitize_parameters` runs in its constructor) or on a record.
    One line on stderr naming the model and the error, exit 2; no JSON line for a record the model never judged."""
    from enecg_hf.tools.cli import main

    broken = tmp_path / f"broken_{where}"
    shutil.copytree(regression_folder, broken)
    code = (broken / "pipeline_enecg.py").read_text()
    signature = code.index(f"    def {where}(")
    body = code.index(":\n", signature) + 2
    failing = '        raise TypeError("broken custom code")\n'
    (broken / "pipeline_enecg.py").write_text(code[:body] + failing + code[body:])
    npy = tmp_path / "record.npy"
    np.save(npy, np.random.default_rng(0).normal(0, 0.3, (12, 5000)).astype(np.float32))
    assert main(["predict", str(npy), "--model", str(broken), "--sampling-rate", "500"]) == 2
    out, err = capsys.readouterr()
    messages = [line for line in err.splitlines() if line.startswith("enecg predict:")]
    assert out == "" and "Traceback" not in err and len(messages) == 1, err
    assert f"--model {broken}" in messages[0] and "TypeError: broken custom code" in messages[0]
    if where == "preprocess":
        assert f"on {npy}" in messages[0]


@pytest.mark.slow
def test_module_cli_and_export(classification_folder, tmp_path):
    npy = tmp_path / "record.npy"
    np.save(npy, ludb_signal("9"))
    run = subprocess.run([sys.executable, "-m", "enecg_hf.tools.cli", "predict", str(npy), "--model",
                          str(classification_folder), "--sampling-rate", "500", "--top-k", "1"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["label"] in ("female", "male") and len(result["scores"]) == 1

    bare = tmp_path / "bare"
    from enecg_hf import EnECGModel

    EnECGModel.from_pretrained(classification_folder).save_pretrained(bare)
    assert not (bare / "handler.py").exists()
    run = subprocess.run([sys.executable, "-m", "enecg_hf.tools.cli", "export", str(bare)], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert (bare / "handler.py").is_file() and "custom_pipelines" in json.loads((bare / "config.json").read_text())
    missing = subprocess.run([sys.executable, "-m", "enecg_hf.tools.cli", "export", str(tmp_path / "nowhere")],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "not a saved model folder" in missing.stderr


# ------------------------------------------------------------------------------------------------ explanations
@pytest.mark.slow
def test_saliency_has_the_input_shape_is_deterministic_and_skips_the_numpy_experts(regression_folder):
    from transformers import AutoModel

    from enecg_hf.tools.explain import explain

    model = AutoModel.from_pretrained(regression_folder).eval()
    inputs = torch.from_numpy(np.stack([ludb_signal("10"), ludb_signal("11")]))
    first, second = explain(model, inputs, n_steps=16), explain(model, inputs, n_steps=16)
    assert first.saliency.shape == tuple(inputs.shape)
    np.testing.assert_array_equal(first.saliency, second.saliency)
    for name in ("features", "median_beat"):  # measured in numpy: listed without attribution, with the reason
        assert first.expert_saliency[name] is None and "neurokit2" in first.notes[name]
    assert "'features', 'median_beat'" in first.notes["ensemble"]
    for name in ("dlinear", "timesnet"):
        assert first.expert_saliency[name].shape == tuple(inputs.shape)
        np.testing.assert_array_equal(first.expert_saliency[name], second.expert_saliency[name])
        # The tiny dlinear/timesnet experts read lead II only (attribution is to the normalised record, after the
        # z-score, so the other leads get exactly nothing from these experts).
        magnitude = np.abs(first.expert_saliency[name]).sum(axis=(0, 2))
        assert magnitude[1] > 0 and magnitude.sum() == pytest.approx(magnitude[1])
    np.testing.assert_allclose(first.gate_weights.sum(-1), 1.0, rtol=1e-5)
    with torch.no_grad():
        np.testing.assert_allclose(first.prediction, model(inputs).logits[:, 0].numpy(), rtol=1e-6)


def test_integrated_gradients_completeness_on_a_differentiable_model(classification_folder):
    """Without the non-differentiable expert, attributions add up to f(x) - f(flat record), and captum's gap shrinks
    as the number of steps grows."""
    from transformers import AutoModel

    from enecg_hf.tools.explain import explain

    model = AutoModel.from_pretrained(classification_folder).eval()
    inputs = torch.from_numpy(ludb_signal("12"))[None]
    coarse = explain(model, inputs, n_steps=16, experts=False)
    fine = explain(model, inputs, n_steps=512, experts=False)
    target = int(fine.target[0])
    with torch.no_grad():
        flat = model.compute_normalized_features(torch.zeros_like(inputs))
        gap = (model(inputs).logits[0, target]
               - model(expert_embeddings=flat.expert_embeddings, gate_inputs=flat.gate_inputs).logits[0, target]).item()
    assert abs(gap) > 1e-4  # the record moves the output: the check below is not 0 == 0
    assert fine.saliency.sum() == pytest.approx(gap, rel=0.05, abs=2e-5)
    assert fine.convergence_delta[0] < coarse.convergence_delta[0] / 4


def test_explain_takes_one_task_of_a_multi_task_model_and_refuses_a_task_the_model_lacks(classification_folder):
    """A multi-task model is explained one task at a time (its first by default; the target class and the gate of
    that task), a single-task model only for its own label; a 2-D record is a batch of one."""
    from transformers import AutoModel

    from enecg_hf import EnECGModel
    from enecg_hf.tools.explain import explain
    from test_multitask import fixture_input, multitask_config

    torch.manual_seed(0)
    model = EnECGModel(multitask_config()).eval()
    inputs = fixture_input()[:1]
    with torch.no_grad():
        output = model(inputs)
    default = explain(model, inputs, n_steps=4, experts=False)
    np.testing.assert_array_equal(default.saliency, explain(model, inputs, n_steps=4, experts=False,
                                                            task="rr_interval").saliency)
    assert default.target.tolist() == [0] and default.saliency.shape == tuple(inputs.shape)
    sex = explain(model, inputs, n_steps=4, task="sex")
    assert sex.target.tolist() == output.logits["sex"].argmax(-1).tolist() and sex.expert_names == ["dlinear", "timesnet"]
    np.testing.assert_array_equal(sex.prediction, output.logits["sex"][0, sex.target].numpy())
    np.testing.assert_array_equal(sex.gate_weights, output.gate_weights["sex"].numpy())
    np.testing.assert_array_equal(sex.expert_predictions, output.expert_logits["sex"][0, :, sex.target].T.numpy())
    assert all(saliency.shape == tuple(inputs.shape) for saliency in sex.expert_saliency.values()) and not sex.notes
    chosen = explain(model, inputs, n_steps=4, experts=False, task="arrhythmia", target=2)
    assert chosen.target.tolist() == [2] and chosen.expert_saliency == {}
    np.testing.assert_array_equal(chosen.prediction, output.logits["arrhythmia"][:, 2].numpy())
    with pytest.raises(ValueError, match=r"task 'age' is not one of the model's tasks \['rr_interval', 'sex', "):
        explain(model, inputs, task="age")

    single = AutoModel.from_pretrained(classification_folder).eval()
    with pytest.raises(ValueError, match=r"task 'age' is not one of the model's tasks \['sex'\]"):
        explain(single, inputs, task="age")
    own = explain(single, inputs[0], n_steps=4, experts=False, task="sex")
    np.testing.assert_array_equal(own.saliency, explain(single, inputs, n_steps=4, experts=False).saliency)


@pytest.mark.slow
def test_plots_are_written_and_decodable(regression_folder, tmp_path):
    import matplotlib.image
    from transformers import AutoModel

    from enecg_hf.tools.explain import explain_record, plot_ecg, plot_gate_weights

    model = AutoModel.from_pretrained(regression_folder).eval()
    explanation = explain_record(model, str(shared("ludb", "data", "13")), tmp_path / "explanation.png")
    plot_ecg(ludb_signal("13"), STANDARD, 500, explanation.saliency[0], path=tmp_path / "ecg.png")
    plot_gate_weights(dict(zip(explanation.expert_names, explanation.gate_weights[0])), path=tmp_path / "gate.png")
    for name in ("explanation.png", "ecg.png", "gate.png"):
        image = matplotlib.image.imread(tmp_path / name)
        assert image.ndim == 3 and min(image.shape[:2]) > 100 and image.std() > 0.01, name
