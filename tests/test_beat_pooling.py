"""Beat-aligned pooling of the sequence experts (`"beat_pooling"` of DeepFADE and openecg, `beats_enecg`): windows
aligned to the R peaks, the median over beats of each point; its columns beside or instead of the global pooling,
its flags, batch independence, gradients, and its settings."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from enecg_hf import EnECGConfig, EnECGModel
from enecg_hf.beats_enecg import EnECGBeatPooling
from enecg_hf.configuration_enecg import STANDARD_LEAD_NAMES, EnECGExpertConfig


pytest.importorskip("neurokit2")

LEADS = list(STANDARD_LEAD_NAMES)
# type -> module and class name, imported when the test runs (skipped without the optional library).
SEQUENCE_EXPERTS = {"deepfade": ("ecgdatakit", "enecg_hf.expert_deepfade", "EnECGDeepFadeExpert"),
                    "openecg": ("openecg", "enecg_hf.expert_openecg", "EnECGOpenEcgExpert")}


def simulated_records(*heart_rates: int) -> torch.Tensor:
    from test_expert_median_beat import simulated_record

    return torch.from_numpy(np.stack([simulated_record(rate, seed=i) for i, rate in enumerate(heart_rates)]))


def make_expert(expert_type: str, beat_pooling, leads=("II", "V1")):
    library, module, name = SEQUENCE_EXPERTS[expert_type]
    pytest.importorskip(library)
    implementation = getattr(__import__(module, fromlist=[name]), name)
    settings = {"preset": "tiny", "beat_pooling": beat_pooling}
    torch.manual_seed(0)
    return implementation(EnECGExpertConfig(expert_type, expert_type, 5000, list(leads), settings=settings), LEADS).eval()


def test_pooling_aligns_on_the_r_peaks():
    """A sequence that counts the samples since the last R peak, pooled: after the peak each point is its bin's
    mean distance from the peak (the bin's centre, in samples), before it the RR interval minus that distance."""
    pooling = EnECGBeatPooling({"points": 7, "window_ms": [-200.0, 500.0]}, "test", ["II"], 5000)
    record = simulated_records(60)[:, 1:2]  # lead II, 1 s RR
    from enecg_hf.beats_enecg import detect_beats

    beats = detect_beats(pooling._nk, record[0].double().numpy(), ["II"], ["II"], 500.0, pooling.window, 3)
    since = np.full(5000, np.nan)
    for start, stop in zip(beats.peaks, [*beats.peaks[1:], 5000]):
        since[start:stop] = np.arange(stop - start)
    rr = float(np.median(np.diff(beats.peaks)))
    since[: beats.peaks[0]] = rr - np.arange(beats.peaks[0], 0, -1)
    pooled = pooling.pool(record, torch.from_numpy(since)[None, None, None], 1.0)[0]
    centres = np.arange(-150, 500, 100) * 500 / 1000  # bin centres in samples from the peak
    expected = np.where(centres > 0, centres - 0.5, rr + centres - 0.5)
    np.testing.assert_allclose(pooled[:-1].numpy(), expected, atol=2.0)  # +-2 samples: RR varies a little
    assert pooled[-1] == 0  # beat_missing


@pytest.mark.parametrize("expert_type", sorted(SEQUENCE_EXPERTS))
def test_beside_is_the_global_pooling_then_the_beat_pooling(expert_type):
    x = simulated_records(70, 95)
    plain, beside, only = (make_expert(expert_type, pooling) for pooling in (None, {"mode": "beside"},
                                                                              {"mode": "only"}))
    with torch.no_grad():
        a, b, c = plain(x), beside(x), only(x)
    assert b.shape == (2, beside.embedding_dim) and beside.embedding_dim == len(beside.feature_names)
    torch.testing.assert_close(b, torch.cat([a, c], dim=1), rtol=0, atol=0)
    assert beside.feature_names == plain.feature_names + only.feature_names
    assert only.feature_names[-1] == "beat_missing" and c[:, -1].eq(0).all() and torch.isfinite(b).all()
    channels = only.embedding_dim - 1
    assert channels == 2 * (only.latent_channels if expert_type == "deepfade" else 16 + 4) * 9
    assert only.feature_names[0] == ("II.latent0_beat_-211ms" if expert_type == "deepfade" else "II.hidden_0_beat_-211ms")
    with torch.no_grad():  # a record's embedding does not depend on the rest of the batch
        torch.testing.assert_close(torch.cat([beside(x[i: i + 1]) for i in range(2)]), b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("expert_type", sorted(SEQUENCE_EXPERTS))
def test_records_without_beats_are_flagged(expert_type):
    expert = make_expert(expert_type, {"mode": "only"})
    x = torch.zeros(2, 12, 5000)
    x[1] = torch.randn(12, 5000, generator=torch.Generator().manual_seed(0)) * 1e-3  # noise: no 3 beats, or some
    with torch.no_grad():
        out = expert(x)
    assert torch.isfinite(out).all() and out[0, -1] == 1 and out[0, :-1].eq(0).all()
    assert out[1, -1] in (0, 1)


def test_deepfade_stays_differentiable_through_the_beat_pooling():
    expert = make_expert("deepfade", {"mode": "only"})
    x = simulated_records(70).requires_grad_(True)
    (gradient,) = torch.autograd.grad(expert(x)[:, :-1].sum(), x)
    assert torch.isfinite(gradient).all() and gradient[:, [1, 6]].abs().sum() > 0


def test_settings_are_checked():
    with pytest.raises(ValueError, match="unknown beat_pooling settings"):
        EnECGBeatPooling({"points": 9, "colour": 1}, "e", ["II"], 5000)
    with pytest.raises(ValueError, match="beat_pooling mode must be one of"):
        EnECGBeatPooling({"mode": "instead"}, "e", ["II"], 5000)
    with pytest.raises(ValueError, match="points must be a positive integer"):
        EnECGBeatPooling({"points": 0}, "e", ["II"], 5000)
    # Detection falls back to the expert's first lead when it reads none of the detection leads.
    assert EnECGBeatPooling({}, "e", ["V2", "V3"], 5000).detection_leads == ["V2"]
    pytest.importorskip("ecgdatakit")
    experts = [{"name": "d", "type": "deepfade", "input_length": 400, "leads": ["II"],
                "settings": {"preset": "tiny", "beat_pooling": {"mode": "only"}}}]
    config = EnECGConfig(experts=experts, sampling_rate=100, input_length=500, gate_input_length=50)
    with pytest.raises(ValueError, match=r"expert 'd' \(deepfade\): settings\.beat_pooling\.record_seconds must be 5"):
        EnECGModel(config)


def test_a_bfloat16_sequence_is_pooled_in_float32():
    """A sequence in bfloat16 (an expert loaded or cast to it) pools like its float32 copy; torch.quantile has no
    bfloat16 kernel, so the median is taken in float32 (the pooling raised on such input before)."""
    pooling = EnECGBeatPooling({}, "test", ["II"], 5000)
    record = simulated_records(70)[:, 1:2]
    sequence = torch.randn(1, 1, 3, 125, generator=torch.Generator().manual_seed(0))
    low = pooling.pool(record, sequence.bfloat16(), 40.0)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, pooling.pool(record, sequence, 40.0), rtol=0.02, atol=0.02)
