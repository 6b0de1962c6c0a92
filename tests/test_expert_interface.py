"""Every expert type through the expert interface, in the peft pattern: one table row per type (its tiny preset on a
short input), the same checks for all of them.

- the embedding has the declared `embedding_dim` (and the head reads that many columns);
- a record's embedding does not depend on the other records of the batch (feature caching relies on it);
- the expert's state survives `save_pretrained` / `load_pretrained`;
- inside `EnECGModel` the expert is frozen: no parameter requires a gradient or receives one, eval mode in training;
- `DIFFERENTIABLE` is honest: a gradient reaches the input exactly when the class says so;
- one expert called from several threads at once with different records gives every call its serial result (a served
  model runs one expert for concurrent requests) and leaves the process's warning filters as they were.

Types whose optional library is missing (momentfm, neurokit2, openecg, ecgdatakit) are skipped with the install hint.
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
import pytest
import torch

from enecg_hf import EnECGConfig, EnECGModel
from enecg_hf.data.simulate import simulate_record
from enecg_hf.expert_registry import EXPERT_TYPES, expert_class
from enecg_hf.signal_enecg import normalize_ecg
from helpers import call_from_threads


SAMPLING_RATE, SECONDS = 100, 10  # the model's records: 10 s at 100 Hz, (batch, 12, 1000)
# type -> the expert's entry of the model config (tiny preset, short input).
EXPERTS = {
    "moment": {"input_length": 64, "leads": ["II", "V5"]},
    "dlinear": {"input_length": 200, "leads": ["II"]},
    "timesnet": {"input_length": 100, "leads": ["II", "V5"]},
    "tempo": {"input_length": 64, "leads": ["II"]},
    "ecgfm": {"input_length": 256, "leads": ["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"]},
    "features": {"input_length": 1000, "leads": ["II"]},
    "openecg": {"input_length": 500, "leads": ["II"]},
    "deepfade": {"input_length": 400, "leads": ["II", "V5"]},
    "median_beat": {"input_length": 1000, "leads": ["I", "II", "aVF", "V1", "V5"]},
}


@functools.lru_cache(maxsize=None)
def _build(expert_type: str, seed: int = 0) -> EnECGModel | str:
    """A model around one expert of `expert_type`, or the reason it cannot be built here (a missing library)."""
    config = EnECGConfig(
        experts=[{"name": expert_type, "type": expert_type, "settings": {"preset": "tiny"}, **EXPERTS[expert_type]}],
        sampling_rate=SAMPLING_RATE, input_length=SAMPLING_RATE * SECONDS, gate_input_length=50, head_hidden_size=8,
        gate_hidden_size=8, lora_r=2,
    )
    torch.manual_seed(seed)
    try:
        return EnECGModel(config).eval()
    except ImportError as err:
        return str(err)


def model_for(expert_type: str, seed: int = 0) -> EnECGModel:
    model = _build(expert_type, seed)
    if isinstance(model, str):
        pytest.skip(f"{expert_type} expert not available: {model}")
    return model


@functools.lru_cache(maxsize=None)
def _records() -> torch.Tensor:
    """Two different simulated 12-lead records, (2, 12, 1000), z-scored as the model does before its experts."""
    signals = [simulate_record(i, seed=3, sampling_rate=SAMPLING_RATE, seconds=SECONDS)[0] for i in (0, 7)]
    return normalize_ecg(torch.from_numpy(np.stack(signals)), "record")


def records() -> torch.Tensor:
    return _records().clone()


def test_the_table_covers_every_registered_type():
    assert set(EXPERTS) == set(EXPERT_TYPES)
    for expert_type in EXPERT_TYPES:
        implementation = expert_class(expert_type)
        assert implementation.expert_type == expert_type
        assert "tiny" in implementation.PRESETS, f"{expert_type}: tests need a tiny preset"
        assert implementation.DIFFERENTIABLE == (not implementation.NOT_DIFFERENTIABLE_REASON)


def test_converter_names_are_functions_of_convert():
    from enecg_hf.tools import convert

    named = {t: expert_class(t).CONVERTER for t in EXPERT_TYPES if expert_class(t).CONVERTER}
    assert named == {"tempo": "convert_tempo", "ecgfm": "convert_ecgfm", "moment": "convert_moment"}
    assert convert.converters() == {t: getattr(convert, name) for t, name in named.items()}


@pytest.mark.parametrize("expert_type", EXPERT_TYPES)
def test_embedding_has_the_declared_dim_and_ignores_the_rest_of_the_batch(expert_type):
    model = model_for(expert_type)
    expert, x = model.experts[expert_type], records()
    with torch.no_grad():
        together = expert(x)
        alone = torch.cat([expert(x[i : i + 1]) for i in range(len(x))])
    assert together.shape == (2, expert.embedding_dim)
    assert model.tasks["label"].heads[expert_type].dense1.in_features == expert.embedding_dim
    assert torch.isfinite(together).all()
    torch.testing.assert_close(alone, together, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("expert_type", EXPERT_TYPES)
def test_expert_state_round_trips(expert_type, tmp_path):
    expert = model_for(expert_type).experts[expert_type]
    other = model_for(expert_type, seed=1).experts[expert_type]  # different random weights
    expert.save_pretrained(tmp_path / expert_type)
    other.load_pretrained(str(tmp_path / expert_type))
    state, loaded = expert.state_dict(), other.state_dict()
    assert state.keys() == loaded.keys()
    assert all(torch.equal(state[k], loaded[k]) for k in state)
    x = records()
    with torch.no_grad():
        torch.testing.assert_close(other(x), expert(x), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("expert_type", EXPERT_TYPES)
def test_frozen_inside_the_model(expert_type):
    model = model_for(expert_type)
    expert = model.experts[expert_type]
    assert not any(p.requires_grad for p in expert.parameters())
    model.train()
    try:
        assert not any(module.training for module in expert.modules())
        labels = torch.tensor([[800.0], [900.0]])
        model(input_values=records(), labels=labels).loss.backward()
        assert all(p.grad is None for p in expert.parameters())
        assert any(p.grad is not None for p in model.tasks["label"].heads.parameters())
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


@pytest.mark.parametrize("expert_type", EXPERT_TYPES)
def test_differentiable_flag_is_honest(expert_type):
    expert = model_for(expert_type).experts[expert_type]
    x = records().requires_grad_(True)
    embedding = expert(x)
    if not expert.DIFFERENTIABLE:
        assert not embedding.requires_grad, f"{expert_type} says it is not differentiable, but its output has a graph"
        return
    (gradient,) = torch.autograd.grad(embedding.sum(), x)
    assert torch.isfinite(gradient).all()
    read = [model_for(expert_type).config.lead_names.index(lead) for lead in EXPERTS[expert_type]["leads"]]
    assert gradient[:, read].abs().sum() > 0, f"{expert_type} says it is differentiable, but no gradient reaches the input"
    unread = [i for i in range(12) if i not in read]
    assert gradient[:, unread].abs().sum() == 0  # leads the expert does not read get nothing


@functools.lru_cache(maxsize=None)
def _mixed_inputs() -> tuple[torch.Tensor, ...]:
    """Four different records, one at a time and in batches of 2 and 3 (different batch sizes)."""
    signals = [simulate_record(i, seed=5, sampling_rate=SAMPLING_RATE, seconds=SECONDS)[0] for i in (1, 4, 9, 13)]
    x = normalize_ecg(torch.from_numpy(np.stack(signals)), "record")
    return (*(x[i : i + 1] for i in range(4)), x[0:2], x[1:4])


# The features expert measures in numpy, ~0.2 s per record: slow here; its overlapping calls have a fast test of their
# own (test_expert_features.py).
@pytest.mark.parametrize("expert_type", [pytest.param(t, marks=pytest.mark.slow) if t == "features" else t
                                         for t in EXPERT_TYPES])
def test_threads_calling_one_expert_get_the_serial_results(expert_type):
    """8 threads share one expert, each running every input (different records and batch sizes). MOMENT's upstream
    RevIN kept each call's statistics on the module, so calls read each other's (values off, or a shape error); the
    features expert's warning suppression swapped the process-wide filter list under the other threads."""
    expert = model_for(expert_type).experts[expert_type]
    inputs = _mixed_inputs()

    def embedding(x: torch.Tensor):
        with torch.no_grad():
            return expert(x)

    filters = list(warnings.filters)
    serial, results = call_from_threads([functools.partial(embedding, x) for x in inputs],
                                        threads=2 if expert_type == "features" else 8)
    wrong = [i for i, output in results if not torch.equal(output, serial[i])]
    assert not wrong, f"{len(wrong)} of {len(results)} concurrent calls differ from the serial result"
    assert list(warnings.filters) == filters, "the expert changed the process's warning filters"
