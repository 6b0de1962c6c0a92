"""ECG-FM expert: shapes, classifier output, per-lead standardisation, frozen and deterministic in eval mode."""

from __future__ import annotations

import pytest
import torch

from enecg_hf.configuration_enecg import STANDARD_LEAD_NAMES, EnECGExpertConfig
from enecg_hf.expert_ecgfm import EnECGEcgFmExpert


LEADS = list(STANDARD_LEAD_NAMES)


def make_expert(input_length: int = 1000, **settings) -> EnECGEcgFmExpert:
    torch.manual_seed(0)
    config = EnECGExpertConfig("ecgfm", "ecgfm", input_length, LEADS, settings={"preset": "tiny", **settings})
    expert = EnECGEcgFmExpert(config, LEADS)
    for param in expert.parameters():
        param.requires_grad_(False)
    return expert.eval()


def test_shapes_embedding_and_logits():
    x = torch.randn(2, 12, 5000)
    expert = make_expert()
    assert expert(x).shape == (2, 32) == (2, expert.embedding_dim)
    assert expert.classify(expert.prepare_inputs(x)).shape == (2, 26)
    assert expert.hidden_states(expert.prepare_inputs(x)).shape == (2, 1000 // 16, 32)
    logits_expert = make_expert(output="logits")
    assert logits_expert.embedding_dim == 26
    torch.testing.assert_close(logits_expert(x), expert.classify(expert.prepare_inputs(x)))


def test_frozen_deterministic_and_standardised():
    expert = make_expert()
    x = torch.randn(3, 12, 5000, requires_grad=True)
    first = expert(x)
    torch.testing.assert_close(first, expert(x), rtol=0, atol=0)
    first.sum().backward()
    assert all(p.grad is None for p in expert.parameters()) and x.grad.abs().sum() > 0
    # Per-lead standardisation: each lead's gain and offset do not matter; a flat lead is not a NaN.
    gains = torch.rand(1, 12, 1) * 5 + 0.1
    torch.testing.assert_close(expert(x * gains + 2.0), first, rtol=1e-3, atol=1e-4)
    flat = x.detach().clone()
    flat[:, 3] = 1.0
    assert torch.isfinite(expert(flat)).all()


def test_settings_checks():
    with pytest.raises(ValueError, match="reads 12 leads"):
        EnECGEcgFmExpert(EnECGExpertConfig("e", "ecgfm", 1000, ["II"], settings={"preset": "tiny"}), LEADS)
    with pytest.raises(ValueError, match="logits"):
        make_expert(output="logits", num_labels=0)
    assert make_expert(num_labels=0).proj is None


def test_ecg_fm_preset_size():
    with torch.device("meta"):
        expert = EnECGEcgFmExpert(EnECGExpertConfig("e", "ecgfm", 5000, LEADS, settings={"preset": "ecg-fm"}), LEADS)
    assert round(sum(p.numel() for p in expert.parameters()) / 1e6, 1) == 90.4  # REFERENCE.md: about 90.4 M
    assert expert.embedding_dim == 768 and expert.proj.out_features == 26
