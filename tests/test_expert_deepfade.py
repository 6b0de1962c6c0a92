"""DeepFADE expert: the weights are the wheel's, the latent is the one ecgdatakit's own denoiser computes on a real LUDB
record, and the expert is frozen, batch-independent, saved and reloaded, with clear errors for a missing package or a
file that is not DeepFADE. The encoder has 8.6 M parameters: one record, few leads."""

from __future__ import annotations

import builtins
import importlib.util
import warnings

import numpy as np
import pytest
import torch
from helpers import shared

from enecg_hf import EnECGConfig, EnECGModel
from enecg_hf.configuration_enecg import STANDARD_LEAD_NAMES, EnECGExpertConfig
from enecg_hf.signal_enecg import normalize_ecg


LEADS = list(STANDARD_LEAD_NAMES)
WEIGHTS = "package:ecgdatakit/processing/nn/weights/deepfade_exp_1_ddp.pt"
needs_ecgdatakit = pytest.mark.skipif(
    importlib.util.find_spec("ecgdatakit") is None,
    reason="ecgdatakit is not installed (pip install 'enecg_hf[pretrained]'; `make install` installs it)",
)


def make_expert(preset: str = "deepfade", pretrained: str | None = WEIGHTS, leads=("II",), input_length: int = 5000,
                **settings):
    from enecg_hf.expert_deepfade import EnECGDeepFadeExpert

    torch.manual_seed(0)
    config = EnECGExpertConfig("deepfade", "deepfade", input_length, list(leads), pretrained,
                               {"preset": preset, **settings})
    expert = EnECGDeepFadeExpert(config, LEADS)
    if pretrained:
        expert.load_pretrained(pretrained)
    for param in expert.parameters():
        param.requires_grad_(False)  # as EnECGModel.freeze_experts does
    return expert.eval()


@pytest.fixture(scope="module")
def expert():
    return make_expert()


def wheel_path() -> str:
    from importlib.resources import files

    return str(files("ecgdatakit") / "processing" / "nn" / "weights" / "deepfade_exp_1_ddp.pt")


def wheel_state() -> dict[str, torch.Tensor]:
    return torch.load(wheel_path(), map_location="cpu", weights_only=True)


@needs_ecgdatakit
def test_loaded_tensors_are_the_wheel_file(expert):
    from ecgdatakit.processing.nn.deepfade import DeepFADE

    state = wheel_state()
    prefix = "module._DeepFADE__encoder._DenseEncoder__"
    encoder_keys = [k for k in state if k.startswith(prefix)]
    ours = expert.encoder.state_dict()
    assert len(encoder_keys) == len(ours) > 300
    # One key spelled out by hand (DDP prefix, name-mangled attributes, named blocks), then all through the mapping.
    assert torch.equal(expert.encoder._trunk._initial_layer._layers[0].weight,
                       state[prefix + "dense_trunk._DenseTrunk__initial_layer._layers.0.weight"])
    assert torch.equal(expert.encoder._latent_conv._layers[1].running_var,
                       state[prefix + "latent_conv._layers.1.running_var"])
    for key in encoder_keys:
        assert torch.equal(ours[expert._remap_key(key)[len("_encoder."):]], state[key]), key
    # The preset is the encoder of ecgdatakit's own DeepFADE(**DEFAULT_ARGS).
    library = DeepFADE(**DeepFADE.DEFAULT_ARGS)._encoder.state_dict()
    assert {k: v.shape for k, v in library.items()} == {k: v.shape for k, v in ours.items()}
    assert sum(p.numel() for p in expert.parameters()) == 8_584_440
    assert expert.embedding_dim == 8 * 2 == len(expert.feature_names)  # lead II: 8 channel means, 8 stds


@pytest.mark.slow
@needs_ecgdatakit
def test_latent_equals_ecgdatakit_denoiser_on_a_ludb_record(expert):
    """ecgdatakit's public `denoise_deepfade` on the raw lead II of LUDB record 1: its middle 10 s window is the record
    itself, and the latent its encoder computes there (captured with a hook) is ours, from the record after the
    model's (record) normalisation."""
    import wfdb
    from ecgdatakit.processing.denoise import _load_model, denoise_deepfade

    raw = wfdb.rdrecord(str(shared("ludb", "data", "1"))).p_signal.T  # (12, 5000) mV
    path = wheel_path()
    captured = []
    handle = _load_model(path)._encoder.register_forward_hook(lambda _m, _a, output: captured.append(output))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "DeepFADE denoising is experimental"
            denoise_deepfade(raw[1], path, fs=500)
    finally:
        handle.remove()
    reference = captured[0][1]  # windows start at 0, 2500, 5000 of the mirror-padded record: the middle one is it
    assert reference.shape == (8, 125)
    x = normalize_ecg(torch.tensor(raw, dtype=torch.float32)[None], "record")
    with torch.no_grad():
        latent = expert.latent(expert.prepare_inputs(x))
        embedding = expert(x)
    assert latent.shape == (1, 1, 8, 125)
    torch.testing.assert_close(latent[0, 0], reference, rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(embedding[0, :8], reference.mean(-1), rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(embedding[0, 8:], reference.std(-1, unbiased=False), rtol=1e-4, atol=2e-5)


def test_the_model_normalisation_does_not_change_the_embedding():
    """A per-lead z-score ignores the record or lead z-score in front of the expert (random weights suffice)."""
    pytest.importorskip("ecgdatakit", reason="ecgdatakit is not installed (pip install 'enecg_hf[pretrained]')")
    expert = make_expert(preset="tiny", pretrained=None, leads=("II", "V5"), input_length=1000)
    signal = torch.randn(2, 12, 1000, generator=torch.Generator().manual_seed(0)) * 0.4 + 0.1
    with torch.no_grad():
        embeddings = [expert(normalize_ecg(signal, mode)) for mode in ("record", "lead", "none")]
    torch.testing.assert_close(embeddings[0], embeddings[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(embeddings[0], embeddings[2], rtol=1e-5, atol=1e-5)


@needs_ecgdatakit
def test_batch_independent_deterministic_flat_leads_and_gradients():
    """Real weights on 1 s of signal (the encoder is convolutional; 10 s would cost 10x more for the same check)."""
    expert = make_expert(input_length=500)
    x = torch.randn(2, 12, 500, generator=torch.Generator().manual_seed(0))
    x[0, 1] = 0.3  # lead II flat in record 0: zeros into the encoder, no NaN
    with torch.no_grad():
        together = expert(x)
        assert torch.equal(expert(x), together)
        alone = expert(x[1:])
        one_at_a_time = make_expert(input_length=500, chunk_size=1)(torch.cat([x, x]))  # chunking changes nothing
    assert together.shape == (2, 16) and torch.isfinite(together).all()
    torch.testing.assert_close(alone, together[1:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(one_at_a_time, torch.cat([together, together]), rtol=1e-5, atol=1e-5)
    # Differentiable: saliency reaches the input; the frozen weights get no gradient.
    tiny = make_expert(preset="tiny", pretrained=None, input_length=500)
    x = x[1:].clone().requires_grad_(True)
    tiny(x).sum().backward()
    assert x.grad[0, 1].abs().sum() > 0 and all(p.grad is None for p in tiny.parameters())


@needs_ecgdatakit
def test_frozen_and_round_trip_with_and_without_backbones(tmp_path):
    from safetensors import safe_open
    from transformers import AutoModel

    # Real weights on 1 s resampled from the 10 s record: the round trip is what is tested, at a tenth of the cost.
    experts = [{"name": "deepfade", "type": "deepfade", "input_length": 500, "leads": ["II"], "pretrained": WEIGHTS,
                "settings": {"preset": "deepfade", "pooling": "mean"}}]
    config = EnECGConfig(experts=experts, head_hidden_size=16, gate_input_length=100, gate_hidden_size=8, lora_r=2)
    model = EnECGModel.from_expert_sources(config).eval()
    assert model.experts["deepfade"].embedding_dim == 8
    assert not any(p.requires_grad for p in model.experts.parameters())
    x = torch.randn(1, 12, 5000, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(x).logits
    for save_backbones in (True, False):
        folder = tmp_path / f"save_backbones_{save_backbones}"
        model.config.save_backbones = save_backbones
        model.save_pretrained(folder)
        assert (folder / "expert_deepfade.py").is_file()
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            assert any(k.startswith("experts.deepfade.") for k in f.keys()) is save_backbones
        reloaded = AutoModel.from_pretrained(folder).eval()
        assert not any(p.requires_grad for p in reloaded.experts.parameters())
        with torch.no_grad():
            assert torch.equal(reloaded(x).logits, expected), save_backbones


def test_missing_package_is_one_clear_error(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "ecgdatakit" or name.startswith("ecgdatakit."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match=r"pip install ecgdatakit==2\.0\.3.*trust_remote_code"):
        make_expert(pretrained=None)


@needs_ecgdatakit
def test_bad_sources_and_settings(tmp_path):
    with pytest.raises(ValueError, match=r"missing keys.*shape mismatches|shape mismatches"):
        make_expert(preset="tiny")
    with pytest.raises(ValueError, match="pooling must be one of"):
        make_expert(pretrained=None, pooling="max")
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a DeepFADE checkpoint"):
        make_expert(pretrained=str(tmp_path / "other.pt"))
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="not a DeepFADE state dict"):
        make_expert(pretrained=str(tmp_path / "list.pt"))


@needs_ecgdatakit
def test_the_compiled_plan_is_the_librarys_encoder_on_real_records_with_a_fraction_of_its_channels(expert):
    """76 % of the released weights are subnormal and most channels are zero for every input: the plan computes the
    rest (batch norm folded in) and gives the library module's latent to float32 rounding, on 2 s of two real LUDB
    records, every lead. The expert's weights stay the checkpoint's (test_loaded_tensors_are_the_wheel_file)."""
    import wfdb

    signals = [wfdb.rdrecord(str(shared("ludb", "data", name))).p_signal.T[:, :1000] for name in ("1", "7")]
    z = expert.standardize(torch.tensor(np.concatenate(signals), dtype=torch.float32)[:, None])  # (24, 1, 1000)
    plan = expert.inference_plan()
    assert plan is not None and plan.total_channels == 5744 and plan.kept_channels == 2410
    with torch.no_grad():
        library = expert.encoder(z)
        compiled = plan(z)
    assert compiled.shape == library.shape == (24, 8, 25)
    torch.testing.assert_close(compiled, library, rtol=1e-5, atol=1e-5 * float(library.abs().max()))
    assert expert.inference_plan() is plan  # built once for these weights


@needs_ecgdatakit
def test_the_plan_follows_the_weights_and_other_encoders_run_the_library_module():
    expert = make_expert(input_length=500)
    plan = expert.inference_plan()
    x = torch.randn(1, 12, 500, generator=torch.Generator().manual_seed(3))
    # Weights changed in place (as load_state_dict does): the plan is rebuilt, and the old one would now be wrong.
    with torch.no_grad():
        expert.encoder._trunk._initial_layer._layers[0].weight.mul_(2.0)
        rebuilt = expert.inference_plan()
        assert rebuilt is not None and rebuilt is not plan
        z = expert.standardize(x[:, 1:2])
        library = expert.encoder(z)
        torch.testing.assert_close(rebuilt(z), library, rtol=1e-5, atol=1e-5 * float(library.abs().max()))
        assert not torch.allclose(plan(z), library, rtol=1e-3, atol=1e-3)
    # An encoder the plan does not cover (average pooling instead of strided convolutions) runs as the library's.
    pooled = make_expert(preset="tiny", pretrained=None, input_length=500, pool_type="avg")
    assert pooled.inference_plan() is None
    with torch.no_grad():
        z = pooled.standardize(x.reshape(12, 1, 500))
        torch.testing.assert_close(pooled.latent(x)[0], pooled.encoder(z), rtol=0, atol=0)
