"""DeepFADE expert (`ecgdatakit`, Apache-2.0): the encoder of DeepFADE, a DenseNet encoder-decoder ECG denoiser whose
weights ship inside the ecgdatakit wheel. Each lead is encoded on its own into an 8-channel latent sequence.

The encoder is `ecgdatakit.processing.nn.deepfade.DenseEncoder`, built with the arguments `DeepFADE(**DEFAULT_ARGS)`
gives it; the decoder (signal and baseline heads) is not needed for an embedding and is not built.

    {"name": "deepfade", "type": "deepfade", "input_length": 5000, "leads": [all 12],
     "pretrained": "package:ecgdatakit/processing/nn/weights/deepfade_exp_1_ddp.pt", "settings": {"preset": "deepfade"}}
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch

from .beats_enecg import EnECGBeatPooling, validate_beat_pooling
from .configuration_enecg import EnECGExpertConfig
from .expert_base import (
    EXPERT_CONFIG_FILE,
    EXPERT_WEIGHTS_FILE,
    EnECGExpert,
    load_state_dict_strict,
    load_weights_only,
    resolve_checkpoint,
)


if TYPE_CHECKING:
    from .configuration_enecg import EnECGConfig


ECGDATAKIT_REQUIREMENT = "ecgdatakit==2.0.3"
POOLINGS = ("mean_std", "mean")


def _import_deepfade():
    """The library's encoder class and checkpoint key mapping, or an ImportError with the pip command."""
    try:
        from ecgdatakit.processing.denoise import _remap_state_dict_key
        from ecgdatakit.processing.nn.deepfade import DenseEncoder
    except ImportError as err:
        raise ImportError(
            f"The deepfade expert needs the `ecgdatakit` package, which ships the network and its weights: pip install "
            f"{ECGDATAKIT_REQUIREMENT}, or pip install 'enecg_hf[pretrained]'. A model folder that uses this expert "
            f"needs it wherever it is loaded, also with trust_remote_code=True. ({type(err).__name__}: {err})"
        ) from err
    # `_remap_state_dict_key` is how ecgdatakit's own loader maps the DDP-era key names of its file onto the current
    # module names (private, hence the exact version pin).
    return DenseEncoder, _remap_state_dict_key


class EnECGDeepFadeExpert(EnECGExpert):
    """DeepFADE's encoder as a frozen EnECG expert.

    Input (batch, leads, input_length) at 500 Hz (the network was trained on 10 s windows: `input_length` 5000). Each
    lead is z-scored on its own (mean 0, population std 1; a flat lead becomes zeros), as ecgdatakit's
    `denoise_deepfade` does before the network; a per-lead z-score does not change under the model's record or lead
    z-score in front of the expert. The encoder maps each lead to a latent of 8 channels x input_length / 40 steps
    ((8, 125) for 5000 samples).

    Output: per lead, each latent channel's mean over time (`pooling="mean"`), or its mean then its standard
    deviation over time (`"mean_std"`, the presets), concatenated over leads: (batch, leads * 8 * 2) for
    `"mean_std"`. Time pooling makes the embedding independent of where the beats fall in the window.
    `"beat_pooling": {"mode": "beside"}` (or `"only"`) adds (or uses only) the latent pooled over windows aligned to
    the R peaks, the median over beats of every latent channel at each point of the window (`EnECGBeatPooling`).
    """

    expert_type = "deepfade"
    KEEP_IN_FP32 = True  # the library's network reads float32 z-scores
    DEFAULT_PRESET = "deepfade"
    WEIGHTS_LICENSE = "Apache-2.0"
    WEIGHTS_TRAINING_DATA = "a large private multi-source ECG database with noise augmentation (ecgdatakit)"
    PRESETS = {
        # `DeepFADE.DEFAULT_ARGS` of ecgdatakit 2.0.3, encoder part (8.6 M parameters), plus our pooling and batching.
        "deepfade": {
            "layers": 8, "kernels": 3, "growth_rate": 12, "compression": 1.0, "bottleneck": False,
            "dropout_rate": 0.2, "pool_steps": [2, 2, 2, 5], "pool_type": "convolution",
            "activation": {"name": "elu", "args": {"alpha": 0.1}}, "pooling": "mean_std", "chunk_size": 4,
            "beat_pooling": None,
        },
        "tiny": {
            "layers": 1, "kernels": 3, "growth_rate": 4, "compression": 1.0, "bottleneck": False,
            "dropout_rate": 0.2, "pool_steps": [2, 2, 2, 5], "pool_type": "convolution",
            "activation": {"name": "elu", "args": {"alpha": 0.1}}, "pooling": "mean_std", "chunk_size": 4,
            "beat_pooling": None,
        },
    }

    @classmethod
    def validate_config(cls, expert_config: EnECGExpertConfig, config: EnECGConfig) -> None:
        super().validate_config(expert_config, config)
        validate_beat_pooling(expert_config, config)

    def __init__(self, config: EnECGExpertConfig, lead_names: Sequence[str]):
        super().__init__(config, lead_names)
        encoder_class, self._remap_key = _import_deepfade()
        s = self.settings
        if s["pooling"] not in POOLINGS:
            raise ValueError(f"Expert {config.name!r}: pooling must be one of {POOLINGS}, got {s['pooling']!r}")
        if not isinstance(s["chunk_size"], int) or s["chunk_size"] < 1:
            raise ValueError(f"Expert {config.name!r}: chunk_size must be a positive integer, got {s['chunk_size']!r}")
        self.downsampling = math.prod(s["pool_steps"])
        if config.input_length < self.downsampling:
            raise ValueError(
                f"Expert {config.name!r}: DeepFADE input_length ({config.input_length}) must be at least its "
                f"downsampling factor ({self.downsampling}); the network reads 10 s at 500 Hz: use 5000"
            )
        self.encoder = encoder_class(
            input_channels=1, layers=s["layers"], kernels=s["kernels"], growth_rate=s["growth_rate"],
            dropout_rate=s["dropout_rate"], bottleneck=s["bottleneck"], compression=s["compression"],
            activation=s["activation"], pool_steps=list(s["pool_steps"]), pool_type=s["pool_type"],
        )
        self.latent_channels = self.encoder.get_output_channels()
        self.beat_pooling = (None if s["beat_pooling"] is None else
                             EnECGBeatPooling(s["beat_pooling"], config.name, config.leads, config.input_length))
        self.embedding_dim = len(self.feature_names)

    @property
    def feature_names(self) -> list[str]:
        """Names of the embedding's columns, e.g. `II.latent0_mean`, ..., `II.latent7_std`."""
        stats = ("mean", "std") if self.settings["pooling"] == "mean_std" else ("mean",)
        names = [] if self.beat_pooling is None else self.beat_pooling.feature_names(
            [f"latent{c}" for c in range(self.latent_channels)])
        if self.beat_pooling is not None and self.beat_pooling.settings["mode"] == "only":
            return names
        return [
            f"{lead}.latent{c}_{stat}" for lead in self.expert_config.leads for stat in stats
            for c in range(self.latent_channels)
        ] + names

    @staticmethod
    def standardize(inputs: torch.Tensor) -> torch.Tensor:
        """Z-score the last axis as ecgdatakit does (in float64, population std; a flat signal becomes zeros);
        returns float32."""
        x = inputs.double()
        mean = x.mean(dim=-1, keepdim=True)
        std = x.std(dim=-1, keepdim=True, unbiased=False)
        flat = std == 0
        return ((x - mean) / torch.where(flat, torch.ones_like(std), std)).masked_fill(flat, 0.0).float()

    def latent(self, inputs: torch.Tensor) -> torch.Tensor:
        """(batch, leads, T) -> the encoder's latent for every lead, (batch, leads, 8, ceil(T / 40)).

        Leads go through the encoder `chunk_size` at a time (memory); batch norm runs on its running statistics (the
        expert is always in eval mode), so a record's latent does not depend on the rest of the batch."""
        batch, leads, length = inputs.shape
        z = self.standardize(inputs.reshape(batch * leads, 1, length))
        chunk = self.settings["chunk_size"]
        latent = torch.cat([self.encoder(z[i : i + chunk]) for i in range(0, len(z), chunk)])
        return latent.reshape(batch, leads, *latent.shape[1:])

    def embed(self, inputs: torch.Tensor) -> torch.Tensor:
        """(batch, leads, input_length) -> (batch, embedding_dim): pooled latents, lead after lead."""
        latent = self.latent(inputs)
        pooled = []
        if self.beat_pooling is None or self.beat_pooling.settings["mode"] == "beside":
            stats = [latent.mean(-1)]
            if self.settings["pooling"] == "mean_std":
                stats.append(latent.std(-1, unbiased=False))
            pooled.append(torch.cat(stats, dim=-1).flatten(start_dim=1))
        if self.beat_pooling is not None:
            pooled.append(self.beat_pooling.pool(inputs, latent, self.downsampling))
        return torch.cat(pooled, dim=-1)

    # ------------------------------------------------------------------------------------------------ weights
    def load_pretrained(self, source: str) -> None:
        """Load ecgdatakit's own checkpoint (`package:ecgdatakit/processing/nn/weights/deepfade_exp_1_ddp.pt` or a
        local copy), or a folder in our format (`EnECGExpert.save_pretrained`)."""
        path = resolve_checkpoint(source, self.name, ECGDATAKIT_REQUIREMENT,
                                  allow_patterns=[EXPERT_WEIGHTS_FILE, EXPERT_CONFIG_FILE])
        if path.is_dir():
            return super().load_pretrained(str(path))
        self.load_deepfade_checkpoint(path, source)

    def load_deepfade_checkpoint(self, path: str | Path, source: str | None = None) -> None:
        """Load a DeepFADE state dict file, read weights-only. Its keys are mapped to module names as ecgdatakit's
        loader does; the decoder's keys are dropped (not built here) and every encoder key must match."""
        source = source or str(path)
        state = load_weights_only(path, f"the DeepFADE weights of expert {self.name!r}")
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"Expert {self.name!r}: {source} is not a DeepFADE state dict (a dict of tensors)")
        remapped = {self._remap_key(key): value for key, value in state.items()}
        if not any(key.startswith("_decoder.") for key in remapped):
            raise ValueError(
                f"Expert {self.name!r}: {source} has no `_decoder.` keys after ecgdatakit's key mapping: not a "
                "DeepFADE checkpoint"
            )
        encoder_state = {k[len("_encoder."):]: v for k, v in remapped.items() if k.startswith("_encoder.")}
        others = sorted(k for k in remapped if not k.startswith(("_encoder.", "_decoder.")))
        if others:
            raise ValueError(f"Expert {self.name!r}: unexpected keys in {source}: {', '.join(others)}")
        load_state_dict_strict(self.encoder, encoder_state, f"DeepFADE expert {self.name!r} from {source}")


__all__ = ["EnECGDeepFadeExpert", "ECGDATAKIT_REQUIREMENT"]
