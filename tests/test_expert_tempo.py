"""TEMPO expert: shapes, forecast, both backbone layouts, frozen and deterministic in eval mode."""

from __future__ import annotations

import pytest
import torch

from enecg_hf.configuration_enecg import STANDARD_LEAD_NAMES, EnECGExpertConfig
from enecg_hf.expert_tempo import EnECGTempoExpert


LEADS = list(STANDARD_LEAD_NAMES)


def make_expert(leads=("II",), **settings) -> EnECGTempoExpert:
    torch.manual_seed(0)
    config = EnECGExpertConfig("tempo", "tempo", 64, list(leads), settings={"preset": "tiny", **settings})
    expert = EnECGTempoExpert(config, LEADS)
    for param in expert.parameters():
        param.requires_grad_(False)  # as EnECGModel.freeze_experts does
    return expert.eval()


@pytest.mark.parametrize("shared_backbone", [True, False])
def test_shapes_and_forecast(shared_backbone):
    expert = make_expert(leads=("II", "V1", "V5"), shared_backbone=shared_backbone)
    assert hasattr(expert, "gpt2_season") is (not shared_backbone)
    x = torch.randn(2, 12, 5000)
    embedding = expert(x)
    assert embedding.shape == (2, expert.embedding_dim) == (2, 16)
    assert torch.isfinite(embedding).all()
    assert expert.forecast(expert.prepare_inputs(x)).shape == (2, 3, 8)


def test_frozen_deterministic_and_input_gradient():
    expert = make_expert()
    x = torch.randn(3, 12, 1000, requires_grad=True)
    first, second = expert(x), expert(x)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    first.sum().backward()
    assert all(p.grad is None for p in expert.parameters())
    assert x.grad is not None and x.grad[:, 1].abs().sum() > 0  # saliency reaches lead II
    # Records are encoded independently of their batch-mates.
    torch.testing.assert_close(expert(x[:1]), first[:1], rtol=1e-5, atol=1e-6)


def test_forecast_is_scale_equivariant():
    """RevIN: scaling and shifting the input scales and shifts the forecast."""
    expert = make_expert()
    x = torch.randn(2, 1, 64)
    torch.testing.assert_close(expert.forecast(3 * x + 5), 3 * expert.forecast(x) + 5, rtol=1e-4, atol=1e-4)


def test_rejects_wrong_length_and_small_vocab():
    with pytest.raises(ValueError, match="must equal its seq_len"):
        EnECGTempoExpert(EnECGExpertConfig("t", "tempo", 100, ["II"], settings={"preset": "tiny"}), LEADS)
    with pytest.raises(ValueError, match="does not cover the prompt token ids"):
        EnECGTempoExpert(EnECGExpertConfig("t", "tempo", 64, ["II"], settings={"preset": "tiny", "vocab_size": 1000}),
                         LEADS)


def test_tempo_80m_preset_sizes():
    """Shapes of the released settings, built on the meta device (no memory, no download)."""
    with torch.device("meta"):
        expert = EnECGTempoExpert(EnECGExpertConfig("t", "tempo", 336, ["II"], settings={"preset": "tempo-80m"}), LEADS)
    assert expert.num_patches == 42
    assert expert.out_layer_trend.weight.shape == (96, 768 * 42)
    assert len(expert.gpt2_trend.h) == 6 and expert.gpt2_trend.wte.weight.shape == (50257, 768)
