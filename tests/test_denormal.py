"""Flush-to-zero in the frozen experts' pass (denormal_enecg.py).

Subnormal floats cost up to 100x on many x86 CPUs, and the flag that flushes them is per thread. Inside every route
that runs the experts - `forward`, `compute_features`, the feature store, the pipeline, an expert called alone - a
product whose result is subnormal must come out as 0 on the calling thread *and* on every intra-op thread, at 1 and 2
torch threads; afterwards every thread has the state the caller left it in (off, or on)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from enecg_hf.denormal_enecg import flush_denormals, flushes_denormals


REPO = Path(__file__).resolve().parents[1]
TINY = json.loads((REPO / "hub_configs" / "tiny.json").read_text())


def unflushed_fraction() -> float:
    """The share of 2^20 products 1e-20 * 1e-20 (= 1e-40, a float32 subnormal) that stay non-zero: 1.0 with no
    flushing, 0.0 when every thread flushes; with 2 threads each computes half, so 0.5 when only one of them does."""
    x = torch.full((1 << 20,), 1e-20)
    return float(((x * x) != 0).float().mean())


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request):
    previous = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(previous)


def test_the_block_flushes_on_every_intra_op_thread_and_restores_the_caller(threads):
    assert unflushed_fraction() == 1.0 and not flushes_denormals()
    with flush_denormals():
        assert unflushed_fraction() == 0.0 and flushes_denormals()
        with flush_denormals():
            assert unflushed_fraction() == 0.0
        assert unflushed_fraction() == 0.0  # a nested block leaves the flag to the outer one
    assert unflushed_fraction() == 1.0 and not flushes_denormals()

    # A caller that flushes on its own thread (as some libraries do on import) gets exactly that back.
    torch.set_flush_denormal(True)
    try:
        before = unflushed_fraction()
        assert before == (0.0 if threads == 1 else 0.5)
        with flush_denormals():
            assert unflushed_fraction() == 0.0
        assert unflushed_fraction() == before and flushes_denormals()
    finally:
        torch.set_flush_denormal(False)


def test_each_python_thread_has_its_own_scope(threads):
    inside, after, errors = [], [], []
    entered, release = threading.Barrier(4), threading.Event()

    def work():
        try:
            with flush_denormals():
                entered.wait(timeout=60)
                release.wait(timeout=60)
                inside.append(unflushed_fraction())
            after.append(unflushed_fraction())
        except Exception as error:  # reported below: an assert in a thread would be lost
            errors.append(error)

    workers = [threading.Thread(target=work) for _ in range(3)]
    for worker in workers:
        worker.start()
    entered.wait(timeout=60)
    assert unflushed_fraction() == 1.0  # the main thread is not inside any block
    release.set()
    for worker in workers:
        worker.join(timeout=120)
    assert not errors and inside == [0.0] * 3 and after == [1.0] * 3


def probed_model():
    """A tiny model whose DLinear expert measures, inside its own computation, whether subnormals are flushed."""
    from enecg_hf import EnECGConfig, EnECGModel

    config = {k: v for k, v in TINY.items() if k != "model_type"}
    config["experts"] = [e for e in TINY["experts"] if e["name"] == "dlinear"]
    torch.manual_seed(0)
    model = EnECGModel(EnECGConfig(**config)).eval()
    expert = model.experts["dlinear"]
    seen: list[float] = []
    embed = expert.embed

    def probed_embed(inputs):
        seen.append(unflushed_fraction())
        return embed(inputs)

    expert.embed = probed_embed
    return model, seen


def test_every_route_of_the_frozen_pass_flushes_inside_and_restores_after(threads, tmp_path):
    from transformers import pipeline

    from enecg_hf.data import build_dataset
    from enecg_hf.features import build_features

    model, seen = probed_model()
    x = torch.randn(2, 12, TINY["input_length"], generator=torch.Generator().manual_seed(0))
    dataset = build_dataset("simulated", None, output=tmp_path / "sim", limit=2)
    ecg = pipeline("ecg-analysis", model=model)
    routes = {
        "forward": lambda: model(x),
        "compute_features": lambda: model.compute_features(x),
        "expert alone": lambda: model.experts["dlinear"](x),
        "feature store": lambda: build_features(dataset, model, None, tmp_path / "store", progress=False),
        "pipeline": lambda: ecg(x[0].numpy(), sampling_rate=TINY["sampling_rate"]),
    }
    for route, run in routes.items():
        seen.clear()
        with torch.no_grad():
            run()
        assert seen and set(seen) == {0.0}, (route, seen)
        assert unflushed_fraction() == 1.0, route


def test_flushing_changes_no_value_of_the_tiny_experts_and_can_be_turned_off(monkeypatch):
    """Random weights hold no subnormals: flushing them is exact (the pretrained experts' figures are in
    docs/experts.md). `ENECG_HF_FLUSH_DENORMALS=0` turns flushing off."""
    from enecg_hf import EnECGConfig, EnECGModel

    config = {k: v for k, v in TINY.items() if k != "model_type"}
    torch.manual_seed(0)
    model = EnECGModel(EnECGConfig(**config)).eval()
    x = torch.randn(2, 12, TINY["input_length"], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        flushed = model.compute_features(x).expert_embeddings
        monkeypatch.setenv("ENECG_HF_FLUSH_DENORMALS", "0")
        with flush_denormals():
            assert unflushed_fraction() == 1.0
        plain = model.compute_features(x).expert_embeddings
    for a, b in zip(flushed, plain):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
