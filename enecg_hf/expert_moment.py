"""MOMENT expert (AutonLab, `momentfm`): a T5 encoder over 8-sample patches, each lead encoded independently."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch

from .configuration_enecg import EnECGExpertConfig
from .expert_base import EXPERT_CONFIG_FILE, EnECGExpert, load_state_dict_strict, resolve_source


try:  # optional at import time so that configs without MOMENT load where momentfm is absent
    from momentfm import MOMENTPipeline
    from momentfm.models.layers.revin import RevIN, nanstd
except ImportError:  # pragma: no cover - exercised only without momentfm
    MOMENTPipeline = None
    RevIN, nanstd = torch.nn.Module, None


logger = logging.getLogger(__name__)

# T5 settings of the AutonLab MOMENT-1 checkpoints (their config.json `t5_config`), plus a tiny test size.
_T5_COMMON = {"d_kv": 64, "feed_forward_proj": "gated-gelu", "dropout_rate": 0.1, "layer_norm_epsilon": 1e-6,
              "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128, "vocab_size": 32128}


class EnECGMomentRevIN(RevIN):
    """momentfm's RevIN normalisation without its per-call state, so that one expert can serve several threads.

    Upstream `RevIN.forward(x, mode="norm")` stores the call's mean and standard deviation on the module
    (`self.mean`, `self.stdev`) and then normalises with what is stored: two threads embedding different records at
    once read each other's statistics (wrong embeddings, or a shape error when their batch sizes differ). This one
    computes the same statistics, with the same operations, as locals: (batch, channels, seq_len) in, the same shape
    out, bit-identical to upstream. Only `"norm"` exists: the embedding task never denormalises.
    """

    def forward(self, x: torch.Tensor, mode: str = "norm", mask: torch.Tensor | None = None) -> torch.Tensor:
        if mode != "norm":
            raise NotImplementedError(f"{type(self).__name__} only normalises (mode='norm'), got mode={mode!r}")
        if mask is None:
            mask = torch.ones((x.shape[0], x.shape[-1]))
        masked_x = torch.where(mask.unsqueeze(1).repeat(1, x.shape[1], 1).bool(), x, torch.nan)
        mean = torch.nanmean(masked_x, dim=-1, keepdim=True).detach()
        stdev = nanstd(masked_x, dim=-1, keepdim=True).detach() + self.eps
        x = (x - mean) / stdev
        if self.affine:
            x = x * self.affine_weight + self.affine_bias
        return x


class EnECGMomentExpert(EnECGExpert):
    """MOMENT-1 as a frozen EnECG expert.

    Input (batch, leads, input_length) — each lead is a separate channel of MOMENT; `input_length` must be a multiple
    of the patch length (8). Output: MOMENT's embedding, averaged over leads and patches, (batch, d_model).

    Pretrained weights load from a Hub id such as `AutonLab/MOMENT-1-large` or from a local folder written by
    `momentfm`'s `save_pretrained` (`config.json` + `model.safetensors`), or from our converted folder format.
    """

    expert_type = "moment"
    CONVERTER = "convert_moment"
    DEFAULT_PRESET = "tiny"
    WEIGHTS_LICENSE = "MIT"
    WEIGHTS_TRAINING_DATA = "the Time-series Pile (AutonLab: public time series from many domains)"
    PRESETS = {
        "small": {"d_model": 512, "d_ff": 1024, "num_layers": 8, "num_heads": 6, "patch_len": 8, "vocab_size": 32128},
        "base": {"d_model": 768, "d_ff": 2048, "num_layers": 12, "num_heads": 12, "patch_len": 8, "vocab_size": 32128},
        "large": {"d_model": 1024, "d_ff": 2816, "num_layers": 24, "num_heads": 16, "patch_len": 8, "vocab_size": 32128},
        # vocab_size only sizes T5's token embedding, which MOMENT never uses: keep it minimal for tests.
        "tiny": {"d_model": 32, "d_ff": 64, "num_layers": 2, "num_heads": 2, "patch_len": 8, "vocab_size": 8},
    }

    def __init__(self, config: EnECGExpertConfig, lead_names: Sequence[str]):
        super().__init__(config, lead_names)
        if MOMENTPipeline is None:
            raise ImportError(
                f"Expert {config.name!r} needs the `momentfm` package: pip install --no-deps momentfm==0.1.4"
            )
        patch_len = self.settings["patch_len"]
        if config.input_length % patch_len:
            raise ValueError(
                f"Expert {config.name!r}: MOMENT input_length ({config.input_length}) must be a multiple of its patch "
                f"length ({patch_len})"
            )
        with warnings.catch_warnings():
            # momentfm warns that non-reconstruction heads are untrained; the embedding task has no head at all.
            warnings.filterwarnings("ignore", message="Only reconstruction head is pre-trained")
            self.backbone = MOMENTPipeline(
                self.momentfm_config(), model_kwargs={"task_name": "embedding", "enable_gradient_checkpointing": False}
            )
            self.backbone.init()
        upstream = self.backbone.normalizer
        self.backbone.normalizer = EnECGMomentRevIN(upstream.num_features, eps=upstream.eps, affine=upstream.affine)
        self.backbone.normalizer.load_state_dict(upstream.state_dict())
        self.embedding_dim = self.settings["d_model"]

    def momentfm_config(self) -> dict[str, Any]:
        """The dict config `MOMENTPipeline` is built from, in the layout of the AutonLab `config.json`."""
        s = self.settings
        t5_config = {**_T5_COMMON, "d_model": s["d_model"], "d_ff": s["d_ff"], "num_layers": s["num_layers"],
                     "num_heads": s["num_heads"], "vocab_size": s["vocab_size"], "model_type": "t5"}
        return {
            "task_name": "reconstruction", "model_name": "MOMENT", "transformer_type": "encoder_only",
            "d_model": s["d_model"], "seq_len": self.expert_config.input_length, "patch_len": s["patch_len"],
            "patch_stride_len": s["patch_len"], "transformer_backbone": "google/flan-t5-large",
            "t5_config": t5_config, "revin_affine": False, "add_positional_embedding": True,
            "value_embedding_bias": False, "orth_gain": 1.41, "mask_ratio": 0.0,
            "enable_gradient_checkpointing": False,
        }

    def embed(self, inputs: torch.Tensor) -> torch.Tensor:
        """(batch, leads, input_length) -> (batch, d_model). Safe to call from several threads at once (the backbone's
        normaliser is [`EnECGMomentRevIN`])."""
        return self.backbone(x_enc=inputs).embeddings

    def load_pretrained(self, source: str) -> None:
        folder = resolve_source(source, self.name, allow_patterns=["config.json", "model.safetensors", EXPERT_CONFIG_FILE])
        if (folder / EXPERT_CONFIG_FILE).is_file():
            return super().load_pretrained(str(folder))
        self.load_momentfm_folder(folder, source)

    def load_momentfm_folder(self, folder: Path, source: str) -> None:
        """Load a folder in `momentfm`'s own layout (what `MOMENTPipeline.save_pretrained` and the Hub repos hold)."""
        from safetensors.torch import load_file

        config_file, weights_file = folder / "config.json", folder / "model.safetensors"
        if not weights_file.is_file():
            raise FileNotFoundError(f"Expert {self.name!r}: {folder} has no model.safetensors (not a MOMENT folder)")
        if config_file.is_file():
            saved = json.loads(config_file.read_text())
            saved_t5 = saved.get("t5_config") or {}  # older MOMENT-1-large configs lack it
            checks = {"d_model": saved.get("d_model"), "patch_len": saved.get("patch_len"),
                      "num_layers": saved_t5.get("num_layers"), "num_heads": saved_t5.get("num_heads"),
                      "d_ff": saved_t5.get("d_ff")}
            wrong = {k: v for k, v in checks.items() if v is not None and v != self.settings[k]}
            if wrong:
                raise ValueError(
                    f"Expert {self.name!r}: {source} is a different MOMENT size: "
                    + ", ".join(f"{k} {v} (config says {self.settings[k]})" for k, v in sorted(wrong.items()))
                    + ". Pick the matching preset (small/base/large)."
                )
        state = load_file(str(weights_file))
        # The pretraining reconstruction head is not part of the embedding model; everything else must match.
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        expected = self.backbone.state_dict()
        if "encoder.embed_tokens.weight" in expected and "encoder.embed_tokens.weight" not in state:
            # T5 ties embed_tokens to `shared`; checkpoints may store only one of the two names.
            if "encoder.shared.weight" in state:
                state["encoder.embed_tokens.weight"] = state["encoder.shared.weight"]
        for key in expected:
            # The sinusoidal position table is a fixed function of d_model; some exports omit it.
            if key.endswith("position_embedding.pe") and key not in state:
                state[key] = expected[key]
        load_state_dict_strict(self.backbone, state, f"MOMENT expert {self.name!r} from {source}")
