"""TEMPO expert (Cao et al., ICLR 2024; DC-research/TEMPO): a GPT-2 over decomposed, patched and prompted series.

Each lead is one series. It is RevIN-normalised, split into trend (moving average, then a learned map), season
(learned map of the detrended series) and residual; each component is cut into overlapping patches, projected to the
GPT-2 width and prefixed with its fixed text prompt ("Predict the future time step given the trend/season/residual",
as GPT-2 token ids, embedded with the GPT-2 `wte`). The released TEMPO-80M runs ONE GPT-2 over the three prompted
components concatenated (`shared_backbone=True`); the paper's description of one GPT-2 per component is available as
`shared_backbone=False`. Built from a `GPT2Config`: nothing is downloaded.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F
from transformers import GPT2Config, GPT2Model

from .configuration_enecg import EnECGExpertConfig
from .expert_base import EnECGExpert
from .signal_enecg import moving_average


COMPONENTS = ("trend", "season", "noise")
# GPT-2 BPE ids of the upstream prompts "Predict the future time step given the {trend,season,residual}", computed
# offline with the GPT-2 tokenizer (which would need the Hub). Listed in ../shared/REFERENCE.md.
PROMPT_TOKEN_IDS = {
    "trend": [47, 17407, 262, 2003, 640, 2239, 1813, 262, 5182],
    "season": [47, 17407, 262, 2003, 640, 2239, 1813, 262, 1622],
    "noise": [47, 17407, 262, 2003, 640, 2239, 1813, 262, 29598],
}


class EnECGTempoRevIN(nn.Module):
    """Reversible instance normalisation with a learned affine map (TEMPO's `RevIn`, one feature per series)."""

    def __init__(self, num_features: int = 1, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.affine_weight = nn.Parameter(torch.ones(num_features))
        self.affine_bias = nn.Parameter(torch.zeros(num_features))

    def normalize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(series, length, features) -> normalised x, mean and std (series, 1, features). Stats are not detached
        upstream-style: they are constants for a frozen expert but keep the input gradient exact for saliency."""
        mean = x.mean(dim=1, keepdim=True)
        std = torch.sqrt(x.var(dim=1, keepdim=True, unbiased=False) + self.eps)
        return (x - mean) / std * self.affine_weight + self.affine_bias, mean, std

    def denormalize(self, x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        return (x - self.affine_bias) / (self.affine_weight + self.eps * self.eps) * std + mean


class EnECGTempoExpert(EnECGExpert):
    """TEMPO as a frozen EnECG expert.

    Input (batch, leads, input_length) with `input_length == seq_len` (336 for TEMPO-80M). Every lead is encoded on
    its own. Output of `embed`: the GPT-2 last hidden states of the patch tokens (prompt tokens excluded), averaged over
    patches, the three components and the leads, (batch, d_model). `forecast` gives TEMPO's own output, the next
    `pred_len` steps of each lead, (batch, leads, pred_len).

    Weights: convert the released `TEMPO-80M_v1.pth` with `python -m enecg_hf.tools.convert tempo SOURCE DEST`.
    """

    expert_type = "tempo"
    CONVERTER = "convert_tempo"
    DEFAULT_PRESET = "tiny"
    WEIGHTS_LICENSE = "Apache-2.0"
    WEIGHTS_TRAINING_DATA = "public forecasting benchmarks (ETT and others; see the Melady/TEMPO Hub card), from GPT-2"
    PRESETS = {
        # Hub `Melady/TEMPO` config.json (prompt 1, pool false, use_token 0) and the GPT-2 base architecture.
        "tempo-80m": {
            "seq_len": 336, "pred_len": 96, "patch_size": 16, "stride": 8, "gpt_layers": 6, "d_model": 768,
            "n_head": 12, "vocab_size": 50257, "n_positions": 1024, "moving_avg": 25, "shared_backbone": True,
        },
        # Keeps GPT-2's full vocabulary so the real prompt token ids (up to 29598) are valid; 50257 x 16 weights.
        "tiny": {
            "seq_len": 64, "pred_len": 8, "patch_size": 16, "stride": 8, "gpt_layers": 1, "d_model": 16,
            "n_head": 2, "vocab_size": 50257, "n_positions": 64, "moving_avg": 25, "shared_backbone": True,
        },
    }

    def __init__(self, config: EnECGExpertConfig, lead_names: Sequence[str]):
        super().__init__(config, lead_names)
        s = self.settings
        if config.input_length != s["seq_len"]:
            raise ValueError(
                f"Expert {config.name!r}: TEMPO input_length ({config.input_length}) must equal its seq_len "
                f"({s['seq_len']}); its output layers are sized for that length"
            )
        if s["seq_len"] < s["patch_size"] or s["moving_avg"] % 2 == 0:
            raise ValueError(f"Expert {config.name!r}: need seq_len >= patch_size and an odd moving_avg, got {s}")
        if max(max(ids) for ids in PROMPT_TOKEN_IDS.values()) >= s["vocab_size"]:
            raise ValueError(f"Expert {config.name!r}: vocab_size {s['vocab_size']} does not cover the prompt token ids")
        self.num_patches = (s["seq_len"] - s["patch_size"]) // s["stride"] + 2  # +1: the replicate-padded tail
        self.prompt_length = len(PROMPT_TOKEN_IDS["trend"])
        tokens_per_stack = (3 if s["shared_backbone"] else 1) * (self.prompt_length + self.num_patches)
        if tokens_per_stack > s["n_positions"]:
            raise ValueError(f"Expert {config.name!r}: {tokens_per_stack} tokens exceed n_positions {s['n_positions']}")

        seq_len, d_model = s["seq_len"], s["d_model"]
        self.rev_in = EnECGTempoRevIN(1)
        self.map_trend = nn.Linear(seq_len, seq_len)
        self.map_season = nn.Sequential(nn.Linear(seq_len, 4 * seq_len), nn.ReLU(), nn.Linear(4 * seq_len, seq_len))
        gpt2_config = GPT2Config(
            vocab_size=s["vocab_size"], n_positions=s["n_positions"], n_embd=d_model, n_layer=s["gpt_layers"],
            n_head=s["n_head"], activation_function="gelu_new",
        )
        stacks = ("trend",) if s["shared_backbone"] else COMPONENTS
        # Attribute names as upstream (`gpt2_trend`, ...), which keeps the converter's key map readable.
        for component in stacks:
            setattr(self, f"gpt2_{component}", GPT2Model(gpt2_config))
        for component in COMPONENTS:
            setattr(self, f"in_layer_{component}", nn.Linear(s["patch_size"], d_model))
            setattr(self, f"prompt_layer_{component}", nn.Linear(d_model, d_model))
            setattr(self, f"out_layer_{component}", nn.Linear(d_model * self.num_patches, s["pred_len"]))
        self.embedding_dim = d_model

    # ------------------------------------------------------------------------------------------------ pieces
    def _stack(self, component: str) -> GPT2Model:
        return self.gpt2_trend if self.settings["shared_backbone"] else getattr(self, f"gpt2_{component}")

    def _patch(self, x: torch.Tensor) -> torch.Tensor:
        """(series, length) -> (series, num_patches, patch_size), the end padded by repeating the last value."""
        padded = F.pad(x.unsqueeze(1), (0, self.settings["stride"]), mode="replicate").squeeze(1)
        return padded.unfold(-1, self.settings["patch_size"], self.settings["stride"])

    def _prompt(self, component: str, batch: int) -> torch.Tensor:
        """The component's prompt embedded by the GPT-2 `wte` and projected, (batch, prompt_length, d_model)."""
        wte = self._stack(component).wte
        ids = torch.tensor(PROMPT_TOKEN_IDS[component], device=wte.weight.device)
        prompt = getattr(self, f"prompt_layer_{component}")(wte(ids))
        return prompt.unsqueeze(0).expand(batch, -1, -1)

    def encode(self, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run TEMPO on every lead.

        Args:
            inputs: (batch, leads, seq_len).

        Returns:
            dict with `hidden` (batch * leads, 3, num_patches, d_model): last hidden states of the patch tokens per
            component; `mean`, `std` (batch * leads, 1, 1): RevIN statistics.
        """
        batch, leads, length = inputs.shape
        x = inputs.reshape(batch * leads, length, 1)
        x, mean, std = self.rev_in.normalize(x)
        x = x.squeeze(-1)
        trend = self.map_trend(moving_average(x.unsqueeze(1), self.settings["moving_avg"]).squeeze(1))
        season = self.map_season(x - trend)
        parts = {"trend": trend, "season": season, "noise": x - trend - season}
        series = x.shape[0]
        tokens = {
            c: torch.cat(
                [self._prompt(c, series), getattr(self, f"in_layer_{c}")(self._patch(parts[c]))], dim=1
            )
            for c in COMPONENTS
        }
        block = self.prompt_length + self.num_patches
        if self.settings["shared_backbone"]:
            joint = self.gpt2_trend(inputs_embeds=torch.cat([tokens[c] for c in COMPONENTS], dim=1)).last_hidden_state
            outputs = [joint[:, i * block : (i + 1) * block] for i in range(len(COMPONENTS))]
        else:
            outputs = [getattr(self, f"gpt2_{c}")(inputs_embeds=tokens[c]).last_hidden_state for c in COMPONENTS]
        hidden = torch.stack([out[:, self.prompt_length :] for out in outputs], dim=1)
        return {"hidden": hidden, "mean": mean, "std": std}

    # ------------------------------------------------------------------------------------------------ outputs
    def embed(self, inputs: torch.Tensor) -> torch.Tensor:
        """(batch, leads, seq_len) -> (batch, d_model): patch tokens averaged over patches, components and leads."""
        hidden = self.encode(inputs)["hidden"]
        return hidden.mean(dim=(1, 2)).reshape(inputs.shape[0], inputs.shape[1], -1).mean(dim=1)

    def forecast(self, inputs: torch.Tensor) -> torch.Tensor:
        """TEMPO's forecast: (batch, leads, seq_len) -> the next `pred_len` steps, (batch, leads, pred_len)."""
        encoded = self.encode(inputs)
        hidden = encoded["hidden"]
        output = sum(
            getattr(self, f"out_layer_{c}")(hidden[:, i].flatten(start_dim=1)) for i, c in enumerate(COMPONENTS)
        )
        output = self.rev_in.denormalize(output.unsqueeze(-1), encoded["mean"], encoded["std"]).squeeze(-1)
        return output.reshape(inputs.shape[0], inputs.shape[1], -1)


__all__ = ["EnECGTempoExpert", "PROMPT_TOKEN_IDS"]
