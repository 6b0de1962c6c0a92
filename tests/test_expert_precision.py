"""`model.set_expert_precision` (precision_enecg.py): int8 / bf16 change only the experts that can take them (the
others stay float32 with a logged reason), never heads or gate; int8 embeddings stay close to float32 ones; float32
comes back bit-identically; saving after quantising writes the float32 weights; the feature store keeps each
precision's values apart."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.ao.nn.quantized.dynamic import Linear as QuantizedLinear


REPO = Path(__file__).resolve().parents[1]
TINY = json.loads((REPO / "hub_configs" / "tiny.json").read_text())
EXPERTS = ["dlinear", "openecg", "deepfade", "timesnet"]


def tiny_model(experts=EXPERTS, seed: int = 0, **overrides):
    from enecg_hf import EnECGConfig, EnECGModel

    config = {k: v for k, v in TINY.items() if k != "model_type"}
    config["experts"] = [next(e for e in TINY["experts"] if e["name"] == name) for name in experts]
    config.update(overrides)
    torch.manual_seed(seed)
    return EnECGModel(EnECGConfig(**config)).eval()


def records(n: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 12, TINY["input_length"], generator=torch.Generator().manual_seed(seed))


def embeddings(model, x):
    with torch.no_grad():
        return model.compute_features(x).expert_embeddings


def not_experts(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("experts.")}


def test_int8_quantises_only_experts_with_linear_layers_and_logs_the_others(caplog):
    model = tiny_model()
    before = not_experts(model)
    head_modules = {n: type(m) for n, m in model.named_modules() if not n.startswith("experts")}
    with caplog.at_level(logging.WARNING, logger="enecg_hf.precision_enecg"):
        applied = model.set_expert_precision("int8")
    assert applied == model.expert_precisions == {"dlinear": "int8", "openecg": "int8", "deepfade": "fp32",
                                                  "timesnet": "fp32"}
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "'deepfade' stays float32" in logged and "'timesnet' stays float32" in logged and "nn.Linear" in logged
    quantised = [n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)]
    assert quantised and all(n.startswith(("experts.dlinear.", "experts.openecg.")) for n in quantised)
    assert {n: type(m) for n, m in model.named_modules() if not n.startswith("experts")} == head_modules
    after = not_experts(model)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert not any(p.requires_grad for p in model.experts.parameters())
    out = model(records(2))
    assert torch.isfinite(out.logits).all()


def test_int8_embeddings_stay_close_and_fp32_comes_back_bit_identically():
    model = tiny_model()
    x = records()
    reference = embeddings(model, x)
    model.set_expert_precision("int8")
    quantised = embeddings(model, x)
    for name, a, b in zip(model.expert_names, reference, quantised):
        error = float((a - b).norm() / a.norm())
        if model.expert_precisions[name] == "int8":
            assert 0 < error < 0.05, (name, error)
        else:
            assert error == 0, name
    model.set_expert_precision("fp32")
    assert model.expert_precisions == dict.fromkeys(model.expert_names, "fp32")
    assert all(torch.equal(a, b) for a, b in zip(reference, embeddings(model, x)))


def test_bf16_autocasts_experts_that_allow_it_and_leaves_keep_in_fp32_ones(caplog):
    model = tiny_model()
    x = records()
    reference = embeddings(model, x)
    with caplog.at_level(logging.WARNING, logger="enecg_hf.precision_enecg"):
        applied = model.set_expert_precision("bf16")
    assert applied == {"dlinear": "bf16", "openecg": "fp32", "deepfade": "fp32", "timesnet": "fp32"}
    assert "KEEP_IN_FP32" in " ".join(r.getMessage() for r in caplog.records)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast: weights stay float32
    for name, a, b in zip(model.expert_names, reference, embeddings(model, x)):
        assert b.dtype == torch.float32
        error = float((a - b).norm() / a.norm())
        assert (0 < error < 0.05) if applied[name] == "bf16" else error == 0, (name, error)
    assert model.set_expert_precision("fp16") == dict.fromkeys(model.expert_names, "fp32")  # CPU: GPU only


def test_an_unknown_precision_is_a_clear_error():
    model = tiny_model(["dlinear"])
    with pytest.raises(ValueError, match="fp32, bf16, fp16, int8.*'int4'"):
        model.set_expert_precision("int4")
    from enecg_hf.training.arguments import parse_args

    assert parse_args(["--dataset", "d", "--expert_precision", "int8"]).expert_precision == "int8"
    assert parse_args(["--dataset", "d"]).expert_precision == "fp32"
    with pytest.raises(SystemExit):
        parse_args(["--dataset", "d", "--expert_precision", "int4"])


def test_fingerprints_differ_per_precision_and_fp32_ones_are_unchanged():
    from enecg_hf.features import column_fingerprints

    model = tiny_model()
    fp32 = column_fingerprints(model)
    seen = {}
    for precision in ("int8", "bf16", "fp32"):
        model.set_expert_precision(precision)
        seen[precision] = column_fingerprints(model)
    assert seen["fp32"] == fp32
    assert seen["int8"]["embedding_dlinear"] not in (fp32["embedding_dlinear"], seen["bf16"]["embedding_dlinear"])
    assert seen["int8"]["embedding_openecg"] != fp32["embedding_openecg"]
    # experts left at float32 compute float32 values: same column
    assert seen["int8"]["embedding_deepfade"] == fp32["embedding_deepfade"]
    assert seen["bf16"]["embedding_openecg"] == fp32["embedding_openecg"]
    assert seen["int8"]["gate_inputs"] == fp32["gate_inputs"]


def test_the_store_never_serves_one_precision_for_another(tmp_path):
    from enecg_hf.data import build_dataset
    from enecg_hf.features import build_features

    dataset = build_dataset("simulated", None, output=tmp_path / "sim", limit=4)
    model = tiny_model(["dlinear", "deepfade"])
    store = tmp_path / "store"
    fp32, _ = build_features(dataset, model, None, store, batch_size=4, progress=False)
    model.set_expert_precision("int8")
    int8, stats = build_features(dataset, model, None, store, batch_size=4, progress=False)
    assert {c: s["computed"] for c, s in stats.items()} == {"embedding_dlinear": 4, "embedding_deepfade": 0,
                                                            "gate_inputs": 0}
    a, b = (np.asarray(t.with_format("numpy")[:]["embedding_dlinear"]) for t in (fp32, int8))
    assert not np.array_equal(a, b) and np.abs(a - b).max() < 0.05 * np.abs(a).max()
    model.set_expert_precision("fp32")
    again, stats = build_features(dataset, model, None, store, batch_size=4, progress=False)
    assert {s["computed"] for s in stats.values()} == {0}
    assert np.asarray(again.with_format("numpy")[:]["embedding_dlinear"]).tobytes() == a.tobytes()


def test_saving_after_quantising_writes_the_fp32_weights(tmp_path):
    from safetensors.torch import load_file

    from enecg_hf import EnECGModel

    model = tiny_model(["dlinear", "openecg"])
    x = records(2)
    with torch.no_grad():
        reference = model(x).logits
    model.save_pretrained(tmp_path / "fp32")
    model.set_expert_precision("int8")
    model.save_pretrained(tmp_path / "int8")
    assert model.expert_precisions["dlinear"] == "int8"  # saving leaves the runtime choice in place
    assert any(isinstance(m, QuantizedLinear) for m in model.experts.modules())
    saved_fp32, saved_int8 = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("fp32", "int8"))
    assert saved_int8.keys() == saved_fp32.keys()
    assert all(saved_int8[k].dtype == saved_fp32[k].dtype and torch.equal(saved_int8[k], saved_fp32[k])
               for k in saved_fp32)
    reloaded = EnECGModel.from_pretrained(tmp_path / "int8").eval()
    assert not any(isinstance(m, QuantizedLinear) for m in reloaded.modules())
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, reference)
