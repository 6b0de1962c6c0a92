"""openecg expert: the weights are the wheel's, the outputs are openecg's own on a real LUDB record, and the expert is
frozen, batch-independent, saved and reloaded (also as remote code), with clear errors for a missing package or a
checkpoint that does not match."""

from __future__ import annotations

import builtins
import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from helpers import BLOCK_ENECG, shared

from enecg_hf import EnECGConfig, EnECGModel
from enecg_hf.configuration_enecg import STANDARD_LEAD_NAMES, EnECGExpertConfig
from enecg_hf.expert_base import resolve_package_path
from enecg_hf.signal_enecg import normalize_ecg


LEADS = list(STANDARD_LEAD_NAMES)
CODEC = "package:openecg/models/codec_v6.pt"
needs_openecg = pytest.mark.skipif(
    importlib.util.find_spec("openecg") is None,
    reason="openecg is not installed (pip install 'enecg_hf[pretrained]'; `make install` installs it)",
)


def make_expert(preset: str = "codec-v6", pretrained: str | None = CODEC, leads=("II",), input_length: int = 5000):
    from enecg_hf.expert_openecg import EnECGOpenEcgExpert

    torch.manual_seed(0)
    config = EnECGExpertConfig("openecg", "openecg", input_length, list(leads), pretrained, {"preset": preset})
    expert = EnECGOpenEcgExpert(config, LEADS)
    if pretrained:
        expert.load_pretrained(pretrained)
    for param in expert.parameters():
        param.requires_grad_(False)  # as EnECGModel.freeze_experts does
    return expert.eval()


def ludb_record(record: str = "1") -> np.ndarray:
    import wfdb

    return wfdb.rdrecord(str(shared("ludb", "data", record))).p_signal.T  # (12, 5000) mV, float64


def model_config(**overrides) -> EnECGConfig:
    expert = {"name": "openecg", "type": "openecg", "input_length": 5000, "leads": ["II"], "pretrained": CODEC,
              "settings": {"preset": "codec-v6"}}
    kwargs = dict(experts=[expert], head_hidden_size=16, gate_input_length=100, gate_hidden_size=8, lora_r=2)
    return EnECGConfig(**{**kwargs, **overrides})


@needs_openecg
def test_loaded_tensors_are_the_wheel_file():
    from importlib.resources import files

    expert = make_expert()
    blob = torch.load(str(files("openecg") / "models" / "codec_v6.pt"), map_location="cpu", weights_only=True)
    ours = expert.codec.state_dict()
    assert set(ours) == set(blob["model_state"]) and len(ours) == 79
    for key, tensor in blob["model_state"].items():
        assert torch.equal(ours[key], tensor), key
    assert sum(p.numel() for p in expert.parameters()) == 1_159_572  # the model card's count
    assert expert.embedding_dim == 128 + 4 + 6 + 6 == len(expert.feature_names)


@needs_openecg
def test_outputs_equal_openecg_on_a_ludb_record():
    """Our expert inside the model's normalisation vs openecg's own loader, rank-normalisation and `encode`, on the raw
    lead II of LUDB record 1 (LUDB is in the codec's training data: this checks equality, not accuracy)."""
    import openecg

    raw = ludb_record("1")
    expert = make_expert()
    library = openecg.load_codec()  # openecg's own loader (it unpickles the whole file)
    signal = np.asarray(raw[1], dtype=np.float32)
    with torch.no_grad():
        reference = library(torch.from_numpy(openecg.rank_normalize(signal))[None], torch.zeros(1, dtype=torch.long))
    embeddings = {}
    for mode in ("record", "lead", "none"):  # ranks ignore any positive affine map: every normalisation agrees
        x = normalize_ecg(torch.tensor(raw, dtype=torch.float32)[None], mode)
        with torch.no_grad():
            ours = expert.codec_outputs(expert.prepare_inputs(x))
            embeddings[mode] = expert(x)
        for theirs, mine in zip(reference, ours[1:]):
            torch.testing.assert_close(mine[0, 0], theirs[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(embeddings["record"], embeddings["lead"], rtol=0, atol=1e-6)
    torch.testing.assert_close(embeddings["record"], embeddings["none"], rtol=0, atol=1e-6)

    # The pooled probabilities, from the library's logits; and the labels of `openecg.encode` (its public API).
    frame, beat, rhythm = (t[0].softmax(-1) for t in reference)
    qrs = frame[:, 2:3]
    expected = torch.cat([frame.mean(0), (qrs * beat).sum(0) / qrs.sum(), rhythm.mean(0)])
    torch.testing.assert_close(embeddings["record"][0, 128:], expected, rtol=1e-5, atol=1e-6)
    codec = openecg.encode(raw[1], fs=500, model=library)
    assert np.array_equal(codec.frame, ours.frame_logits[0, 0].argmax(-1).numpy())
    assert np.array_equal(codec.rhythm, ours.rhythm_logits[0, 0].argmax(-1).numpy())
    names = dict(zip(expert.feature_names, embeddings["record"][0].tolist()))
    assert names["II.rhythm_sinus"] > 0.9  # LUDB record 1: sinus rhythm


@needs_openecg
def test_batch_independent_deterministic_and_not_differentiable():
    expert = make_expert(leads=("II", "V5"))
    x = torch.randn(3, 12, 5000, generator=torch.Generator().manual_seed(0), requires_grad=True)
    together = expert(x)
    assert together.shape == (3, 2 * 144)
    torch.testing.assert_close(expert(x), together, rtol=0, atol=0)
    for i in range(3):
        torch.testing.assert_close(expert(x[i : i + 1]), together[i : i + 1], rtol=1e-5, atol=1e-6)
    # Records embedded at the same time from several threads (a served model) do not mix.
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(3) as pool:
        alone = list(pool.map(lambda i: expert(x[i : i + 1]), range(3)))
    torch.testing.assert_close(torch.cat(alone), together, rtol=1e-5, atol=1e-6)
    # Ranks are piecewise constant: no gradient reaches the input (explanations list this expert as such).
    assert not together.requires_grad and not type(expert).DIFFERENTIABLE


@needs_openecg
@pytest.mark.parametrize("save_backbones", [True, False])
def test_frozen_and_round_trip(tmp_path, save_backbones):
    from safetensors import safe_open
    from transformers import AutoModel

    model = EnECGModel.from_expert_sources(model_config(save_backbones=save_backbones)).eval()
    assert not any(p.requires_grad for p in model.experts.parameters())
    assert any(p.requires_grad for p in model.parameters())  # LoRA adapters train
    model.save_pretrained(tmp_path)
    assert (tmp_path / "expert_openecg.py").is_file()
    from enecg_hf.training.serving_export import export_serving_files

    export_serving_files(model, tmp_path)  # the endpoint installs the wheel that carries the network
    assert "openecg==0.11.0" in (tmp_path / "requirements.txt").read_text().splitlines()
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        saved = [k for k in f.keys() if k.startswith("experts.openecg.")]
    assert bool(saved) is save_backbones
    reloaded = AutoModel.from_pretrained(tmp_path).eval()
    assert not any(p.requires_grad for p in reloaded.experts.parameters())
    x = torch.randn(2, 12, 5000, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(x).logits, reloaded(x).logits)
    wheel = make_expert().codec.state_dict()
    assert all(torch.equal(v, wheel[k]) for k, v in reloaded.experts["openecg"].codec.state_dict().items())


@pytest.mark.slow
@needs_openecg
def test_remote_code_folder_needs_openecg_and_says_so(tmp_path):
    """A light folder (the backbone is re-read from the wheel) loaded with trust_remote_code where enecg_hf cannot be
    imported: while openecg cannot be imported either, loading fails with the pip command; once it can, the folder
    loads and predicts exactly as the saved model."""
    model = EnECGModel.from_expert_sources(model_config(save_backbones=False)).eval()
    model.save_pretrained(tmp_path / "model")
    x = torch.randn(1, 12, 5000, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        np.save(tmp_path / "expected.npy", model(x).logits.numpy())
    np.save(tmp_path / "x.npy", x.numpy())
    script = BLOCK_ENECG + textwrap.dedent(
        f"""
        import importlib.abc, sys
        import numpy as np, torch
        from transformers import AutoModel

        class BlockOpenEcg(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "openecg":
                    raise ImportError("openecg is blocked in this process")
        blocker = BlockOpenEcg()
        sys.meta_path.insert(0, blocker)
        try:
            AutoModel.from_pretrained({str(tmp_path / 'model')!r}, trust_remote_code=True)
            raise SystemExit("loading should need openecg")
        except ImportError as err:
            print("IMPORT_ERROR", err)
        sys.meta_path.remove(blocker)
        model = AutoModel.from_pretrained({str(tmp_path / 'model')!r}, trust_remote_code=True).eval()
        assert "enecg_hf" not in type(model).__module__
        with torch.no_grad():
            logits = model(torch.from_numpy(np.load({str(tmp_path / 'x.npy')!r}))).logits.numpy()
        assert np.array_equal(logits, np.load({str(tmp_path / 'expected.npy')!r}))
        print("REMOTE_OK")
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    env.pop("PYTHONPATH", None)
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "REMOTE_OK" in result.stdout
    error = result.stdout.split("IMPORT_ERROR", 1)[1]
    assert "pip install openecg==0.11.0" in error and "trust_remote_code" in error


def test_missing_package_is_one_clear_error(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "openecg" or name.startswith("openecg."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match=r"pip install openecg==0\.11\.0"):
        make_expert(pretrained=None)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ImportError, match=r"package 'openecg', which is not installed.*pip install openecg==0\.11\.0"):
        resolve_package_path(CODEC, "openecg", "openecg==0.11.0")


@needs_openecg
def test_bad_sources_settings_and_inputs(tmp_path):
    with pytest.raises(ValueError, match=r"d_model: checkpoint 128 vs settings 16"):
        make_expert(preset="tiny")
    with pytest.raises(ValueError, match="multiple of its patch size"):
        make_expert(pretrained=None, input_length=4999)
    with pytest.raises(ValueError, match="at most 5120 samples"):
        make_expert(pretrained=None, input_length=6000)
    with pytest.raises(ValueError, match="not of the form"):
        make_expert(pretrained="package:openecg")
    with pytest.raises(FileNotFoundError, match=r"openecg 0\.11\.0 has no models/codec_v9\.pt"):
        make_expert(pretrained="package:openecg/models/codec_v9.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an openecg codec checkpoint"):
        make_expert(pretrained=str(tmp_path / "other.pt"))
    # Our own folder format round-trips too (what `EnECGExpert.save_pretrained` writes).
    expert = make_expert()
    expert.save_pretrained(tmp_path / "saved")
    again = make_expert(pretrained=str(tmp_path / "saved"))
    assert json.loads((tmp_path / "saved" / "expert_config.json").read_text())["type"] == "openecg"
    assert all(torch.equal(v, again.codec.state_dict()[k]) for k, v in expert.codec.state_dict().items())


@needs_openecg
def test_tiny_preset_shapes():
    expert = make_expert(preset="tiny", pretrained=None, leads=("I", "II", "V1"))
    out = expert(torch.randn(2, 12, 5000))
    assert out.shape == (2, 3 * (16 + 4 + 6 + 6)) == (2, expert.embedding_dim) and torch.isfinite(out).all()
    assert expert.feature_names[16:20] == ["I.frame_other", "I.frame_P", "I.frame_QRS", "I.frame_T"]


@needs_openecg
def test_model_card_names_the_licence_and_training_data():
    from enecg_hf.training.model_card import random_weight_experts, render_model_card

    dlinear = {"name": "dlinear", "type": "dlinear", "input_length": 500, "leads": ["II"], "settings": {"preset": "tiny"}}
    config = model_config(experts=[model_config().experts[0], dlinear])
    model = EnECGModel.from_expert_sources(config)
    summary = {"mae": {"mean": 10.0, "std": 1.0}}
    metrics = {"problem_type": "regression", "label": "rr_interval", "unit": "ms", "records": 10, "folds": [{}, {}],
               "cv": summary, "cv_baseline": summary, "final": {"metrics": {"mae": 9.0}}}
    training_args = {"epochs": 1, "batch_size": 2, "learning_rate": 1e-3, "weight_decay": 0.0, "seed": 0,
                     "cache_features": True}
    card = render_model_card(model, metrics, training_args, ["ludb"], random_weight_experts(model), "me/model")
    rows = {line.split("|")[1].strip(): line for line in card.splitlines() if line.startswith("| `")}
    assert "`package:openecg/models/codec_v6.pt`" in rows["`openecg`"] and "Apache-2.0" in rows["`openecg`"]
    assert "LUDB" in rows["`openecg`"]
    assert "RANDOM" in rows["`dlinear`"]
