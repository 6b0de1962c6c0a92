"""The feature cache: frozen experts run once per record, their embeddings stored as a `datasets` table."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from ..modeling_enecg import EnECGModel
from .files import hash_json


logger = logging.getLogger(__name__)


def embedding_column(expert_name: str) -> str:
    return f"embedding_{expert_name}"


def expert_fingerprint(model: EnECGModel) -> str:
    """Hash of everything the frozen part computes with: expert weights and the config fields the experts read."""
    config = model.config
    hasher = hashlib.sha256()
    hasher.update(json.dumps({
        "experts": config.experts, "lead_names": config.lead_names, "normalization": config.normalization,
        "gate_leads": config.gate_leads, "gate_input_length": config.gate_input_length,
        "input_length": config.input_length, "sampling_rate": config.sampling_rate,
    }, sort_keys=True).encode())
    for key, tensor in sorted(model.experts.state_dict().items()):
        hasher.update(key.encode())
        hasher.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return hasher.hexdigest()[:16]


@torch.no_grad()
def compute_features(model: EnECGModel, input_values: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """The frozen part, without gradients and without touching the global RNG (so dropout masks downstream are the
    same whether features come from here or from the cache)."""
    with torch.random.fork_rng(devices=[]):
        features = model.compute_features(input_values)
    return tuple(e.float() for e in features.expert_embeddings), features.gate_inputs.float()


def build_feature_cache(dataset, model: EnECGModel, accelerator, cache_dir: Path, batch_size: int):
    """Expert embeddings and gate inputs of every record, as a dataset in the same order.

    Each process computes one contiguous shard with a `datasets` map written to
    `cache_dir/features-<fingerprint>-<i>of<n>.arrow`; after a barrier every process loads all shards (cache hits).
    The fingerprint covers the records (dataset fingerprint) and the frozen part (`expert_fingerprint`), so a rerun
    with the same data and experts reuses the files, and anything else recomputes."""
    import datasets

    experts = expert_fingerprint(model)
    fingerprint = hash_json({"data": dataset._fingerprint, "experts": experts, "n": len(dataset)})
    n = accelerator.num_processes
    names = model.expert_names
    feature_spec = datasets.Features({
        **{embedding_column(name): datasets.Sequence(datasets.Value("float32"), length=model.experts[name].embedding_dim)
           for name in names},
        "gate_inputs": datasets.Sequence(datasets.Value("float32"),
                                         length=len(model.config.gate_leads) * model.config.gate_input_length),
    })

    def featurize(batch):
        signal = np.asarray(batch["signal"], dtype=np.float32)
        # Records with NaN/inf are left out of training (records.drop_unusable_signals): their features are never
        # read, so they are computed on zeros rather than ending the map.
        signal[~np.isfinite(signal).all(axis=(1, 2))] = 0.0
        embeddings, gate_inputs = compute_features(model, torch.as_tensor(signal))
        out = {embedding_column(name): e.numpy() for name, e in zip(names, embeddings)}
        out["gate_inputs"] = gate_inputs.numpy()
        return out

    source = dataset.select_columns(["signal"]).with_format("numpy")
    cache_dir.mkdir(parents=True, exist_ok=True)

    def shard_map(index: int, compute: bool):
        file = cache_dir / f"features-{fingerprint}-{index}of{n}.arrow"
        if not compute and not file.exists():
            raise RuntimeError(f"Feature shard {file} is missing after the barrier")
        shard = source.shard(num_shards=n, index=index, contiguous=True)
        return shard.map(
            featurize, batched=True, batch_size=batch_size, remove_columns=["signal"], features=feature_spec,
            cache_file_name=str(file), new_fingerprint=f"{fingerprint}-{index}of{n}", load_from_cache_file=True,
            desc=f"Expert features (shard {index + 1}/{n})",
        )

    start = time.perf_counter()
    model.eval()
    shard_map(accelerator.process_index, compute=True)
    accelerator.wait_for_everyone()
    shards = [shard_map(i, compute=False) for i in range(n)]
    features = datasets.concatenate_datasets(shards) if n > 1 else shards[0]
    if len(features) != len(dataset):
        raise RuntimeError(f"Feature cache has {len(features)} rows for {len(dataset)} records")
    logger.info("Expert features of %d records ready in %.1f s (cache %s)", len(features),
                time.perf_counter() - start, cache_dir)
    return features.with_format(None), experts


