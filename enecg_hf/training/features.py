"""Expert features of a training run: the frozen experts' outputs for every record, read from the record-level
feature store (`enecg_hf.features`) and computed there only where missing."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from ..features.store import build_features, column_fingerprints, embedding_column
from ..modeling_enecg import EnECGModel


__all__ = ["embedding_column", "expert_fingerprint", "compute_features", "build_feature_cache"]


def expert_fingerprint(model: EnECGModel) -> str:
    """One hash of the whole frozen part: the store fingerprints of every expert's embedding and of the gate input
    (each covers that column's config, weights and the global config fields it reads; `enecg_hf.features.store`)."""
    folders = column_fingerprints(model)
    return hashlib.sha256("\n".join(f"{k}={v}" for k, v in folders.items()).encode()).hexdigest()[:16]


@torch.no_grad()
def compute_features(model: EnECGModel, input_values: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """The frozen part, without gradients and without touching the global RNG (so dropout masks downstream are the
    same whether features come from here or from the store)."""
    with torch.random.fork_rng(devices=[]):
        features = model.compute_features(input_values)
    return tuple(e.float() for e in features.expert_embeddings), features.gate_inputs.float()


def build_feature_cache(dataset, model: EnECGModel, accelerator, cache_dir: Path, batch_size: int,
                        shard_size: int = 256):
    """Expert embeddings and gate inputs of every record, as a dataset in the same order, and `expert_fingerprint`.

    `cache_dir` is the feature store's folder (`enecg_hf.features.feature_store_dir()` by default in `train.py`):
    values stored there by any earlier run or by `python -m enecg_hf.features` - for any label, subset or number of
    processes - are read, and only missing ones are computed, in batches dealt to the processes of `accelerator`."""
    features, _ = build_features(dataset, model, accelerator, cache_dir, batch_size=batch_size, shard_size=shard_size)
    return features, expert_fingerprint(model)
