"""ECG-FM expert (McKeen et al., 2024; bowang-lab/ECG-FM on fairseq-signals): a wav2vec 2.0-style transformer over the
12 leads at once.

The fairseq-signals `ecg_transformer` is the wav2vec 2.0 encoder with a 12-channel first convolution: a convolutional
feature extractor (16x downsampling), LayerNorm + Linear projection, a convolutional positional encoding, and a post-LN
transformer. `transformers.Wav2Vec2Model` hosts it exactly once its feature encoder takes the leads as channels, which
is all this module changes. Weights: `python -m enecg_hf.tools.convert ecgfm checkpoint.pt DEST`.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from transformers import Wav2Vec2Config, Wav2Vec2Model
from transformers.models.wav2vec2.modeling_wav2vec2 import Wav2Vec2FeatureEncoder

from .configuration_enecg import EnECGExpertConfig
from .expert_base import EnECGExpert
from .signal_enecg import zscore


class EnECGEcgFmFeatureEncoder(Wav2Vec2FeatureEncoder):
    """wav2vec 2.0 feature encoder whose first convolution reads `in_channels` leads: (batch, leads, samples) ->
    (batch, conv_dim[-1], frames). Upstream wav2vec 2.0 reads one audio channel and adds that axis itself."""

    def __init__(self, config: Wav2Vec2Config, in_channels: int):
        super().__init__(config)
        first = self.conv_layers[0].conv
        self.conv_layers[0].conv = nn.Conv1d(
            in_channels, first.out_channels, first.kernel_size, stride=first.stride, bias=first.bias is not None
        )

    def forward(self, input_values: torch.Tensor) -> torch.Tensor:
        hidden_states = input_values
        for conv_layer in self.conv_layers:
            hidden_states = conv_layer(hidden_states)
        return hidden_states


class EnECGEcgFmExpert(EnECGExpert):
    """ECG-FM as a frozen EnECG expert.

    Input (batch, leads, input_length) at 500 Hz for the released weights (pretrained on 5 s = 2500 samples; longer
    records work, the positional encoding is convolutional). Each lead is standardised inside the expert (ECG-FM's own
    preprocessing). Output of `embed`: the transformer's last hidden states averaged over frames, (batch, hidden_size);
    with `output="logits"` the fine-tuned classifier's `proj` logits instead, (batch, num_labels).
    """

    expert_type = "ecgfm"
    CONVERTER = "convert_ecgfm"
    DEFAULT_PRESET = "tiny"
    WEIGHTS_LICENSE = "MIT"
    WEIGHTS_TRAINING_DATA = "MIMIC-IV-ECG v1.0 and PhysioNet 2021 v1.0.3 (fine-tune: PhysioNet 2021)"
    PRESETS = {
        # fairseq-signals `ecg_transformer` defaults used by ECG-FM; `proj` is the PhysioNet 2021 fine-tune's 26-way head.
        "ecg-fm": {
            "in_channels": 12, "conv_layers": [[256, 2, 2]] * 4, "hidden_size": 768, "num_layers": 12,
            "num_heads": 12, "intermediate_size": 3072, "conv_pos": 128, "conv_pos_groups": 16, "num_labels": 26,
            "output": "embedding", "standardize_eps": 1e-6,
        },
        # The pretrained-only checkpoint: no classifier.
        "ecg-fm-pretrained": {
            "in_channels": 12, "conv_layers": [[256, 2, 2]] * 4, "hidden_size": 768, "num_layers": 12,
            "num_heads": 12, "intermediate_size": 3072, "conv_pos": 128, "conv_pos_groups": 16, "num_labels": 0,
            "output": "embedding", "standardize_eps": 1e-6,
        },
        "tiny": {
            "in_channels": 12, "conv_layers": [[16, 2, 2]] * 4, "hidden_size": 32, "num_layers": 2, "num_heads": 2,
            "intermediate_size": 64, "conv_pos": 16, "conv_pos_groups": 4, "num_labels": 26, "output": "embedding",
            "standardize_eps": 1e-6,
        },
    }

    def __init__(self, config: EnECGExpertConfig, lead_names: Sequence[str]):
        super().__init__(config, lead_names)
        s = self.settings
        if self.num_leads != s["in_channels"]:
            raise ValueError(
                f"Expert {config.name!r}: ECG-FM reads {s['in_channels']} leads (in_channels) but the config gives "
                f"{self.num_leads}: {config.leads}"
            )
        if s["output"] not in ("embedding", "logits") or (s["output"] == "logits" and not s["num_labels"]):
            raise ValueError(f"Expert {config.name!r}: output must be 'embedding', or 'logits' with num_labels > 0")
        self.wav2vec2_config = self.build_wav2vec2_config(s)
        self.wav2vec2 = Wav2Vec2Model(self.wav2vec2_config)
        self.wav2vec2.feature_extractor = EnECGEcgFmFeatureEncoder(self.wav2vec2_config, s["in_channels"])
        self.proj = nn.Linear(s["hidden_size"], s["num_labels"]) if s["num_labels"] else None
        if config.input_length < self.receptive_field():
            raise ValueError(
                f"Expert {config.name!r}: input_length {config.input_length} is shorter than the feature extractor's "
                f"receptive field ({self.receptive_field()} samples)"
            )
        self.embedding_dim = s["num_labels"] if s["output"] == "logits" else s["hidden_size"]

    @staticmethod
    def build_wav2vec2_config(s: dict) -> Wav2Vec2Config:
        """The `Wav2Vec2Config` equal to fairseq-signals' `ecg_transformer` with the given settings."""
        return Wav2Vec2Config(
            hidden_size=s["hidden_size"], num_hidden_layers=s["num_layers"], num_attention_heads=s["num_heads"],
            intermediate_size=s["intermediate_size"], hidden_act="gelu", feat_extract_activation="gelu",
            conv_dim=[c[0] for c in s["conv_layers"]], conv_kernel=[c[1] for c in s["conv_layers"]],
            conv_stride=[c[2] for c in s["conv_layers"]], conv_bias=False, feat_extract_norm="group",
            num_conv_pos_embeddings=s["conv_pos"], num_conv_pos_embedding_groups=s["conv_pos_groups"],
            do_stable_layer_norm=False, apply_spec_augment=False, mask_time_prob=0.0, mask_feature_prob=0.0,
            layer_norm_eps=1e-5, add_adapter=False,
        )

    def receptive_field(self) -> int:
        field = 1
        for _, kernel, stride in reversed(self.settings["conv_layers"]):
            field = (field - 1) * stride + kernel
        return field

    def standardize(self, inputs: torch.Tensor) -> torch.Tensor:
        """Per-lead, per-record z-score; a flat lead becomes zeros."""
        return zscore(inputs, (-1,), self.settings["standardize_eps"])

    def hidden_states(self, inputs: torch.Tensor) -> torch.Tensor:
        """(batch, leads, input_length) -> last hidden states (batch, frames, hidden_size)."""
        return self.wav2vec2(input_values=self.standardize(inputs)).last_hidden_state

    def classify(self, inputs: torch.Tensor) -> torch.Tensor:
        """The fine-tuned classifier: mean-pooled hidden states through `proj`, (batch, num_labels) logits."""
        if self.proj is None:
            raise ValueError(f"Expert {self.name!r} has no classifier (num_labels 0)")
        return self.proj(self.hidden_states(inputs).mean(dim=1))

    def embed(self, inputs: torch.Tensor) -> torch.Tensor:
        """(batch, leads, input_length) -> (batch, hidden_size), or (batch, num_labels) with `output="logits"`."""
        if self.settings["output"] == "logits":
            return self.classify(inputs)
        return self.hidden_states(inputs).mean(dim=1)


__all__ = ["EnECGEcgFmExpert", "EnECGEcgFmFeatureEncoder"]
