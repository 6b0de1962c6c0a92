"""TimesNet expert: 1-D series folded into 2-D by their dominant periods and processed with Inception convolutions."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .configuration_enecg import EnECGExpertConfig
from .expert_base import EnECGExpert


class EnECGTimesNetInception(nn.Module):
    """Inception block: the mean of 2-D convolutions with kernels 1, 3, 5, ... (TimesNet's `Inception_Block_V1`)."""

    def __init__(self, in_channels: int, out_channels: int, num_kernels: int):
        super().__init__()
        self.kernels = nn.ModuleList(
            nn.Conv2d(in_channels, out_channels, kernel_size=2 * i + 1, padding=i) for i in range(num_kernels)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([conv(x) for conv in self.kernels], dim=-1).mean(-1)


class EnECGTimesNetBlock(nn.Module):
    """One TimesBlock: for each of the `top_k` strongest periods, fold (length, d_model) into a 2-D grid, convolve,
    unfold, and mix the k results with softmax weights from the spectral amplitudes; then a residual connection."""

    def __init__(self, d_model: int, d_ff: int, top_k: int, num_kernels: int):
        super().__init__()
        self.top_k = top_k
        self.conv = nn.Sequential(
            EnECGTimesNetInception(d_model, d_ff, num_kernels), nn.GELU(), EnECGTimesNetInception(d_ff, d_model, num_kernels)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, length, d_model) -> same shape."""
        batch, length, channels = x.shape
        # Periods are picked per record from the amplitude of the complex spectrum (the research copy cast to half and
        # dropped the imaginary part). Upstream picks them per batch, which makes a record's output depend on its
        # batch-mates; per record keeps the expert a deterministic function of the record (needed for feature caching).
        amplitude = torch.fft.rfft(x, dim=1).abs().mean(-1)  # (batch, freqs)
        amplitude[:, 0] = 0
        top_amplitude, top_freq = torch.topk(amplitude, self.top_k, dim=1)
        outputs = []
        for i in range(batch):
            folded = []
            for freq in top_freq[i].tolist():
                period = length // max(freq, 1)
                rows = math.ceil(length / period)
                padded = F.pad(x[i : i + 1], (0, 0, 0, rows * period - length))
                grid = padded.reshape(1, rows, period, channels).permute(0, 3, 1, 2)
                out = self.conv(grid).permute(0, 2, 3, 1).reshape(1, -1, channels)[:, :length]
                folded.append(out)
            stacked = torch.stack(folded, dim=-1)  # (1, length, d_model, k)
            weights = F.softmax(top_amplitude[i], dim=0)
            outputs.append((stacked * weights).sum(-1))
        return torch.cat(outputs, dim=0) + x


class EnECGTimesNetEmbedding(nn.Module):
    """Token embedding (circular 1-D convolution over leads) plus a fixed sinusoidal position table."""

    def __init__(self, num_leads: int, d_model: int, max_len: int, dropout: float):
        super().__init__()
        self.token = nn.Conv1d(num_leads, d_model, kernel_size=3, padding=1, padding_mode="circular", bias=False)
        position = torch.arange(max_len).float().unsqueeze(1)
        div_term = torch.exp(torch.arange(0, d_model, 2).float() * (-math.log(10000.0) / d_model))
        table = torch.zeros(max_len, d_model)
        table[:, 0::2] = torch.sin(position * div_term)
        table[:, 1::2] = torch.cos(position * div_term[: d_model // 2])
        self.position = nn.Parameter(table, requires_grad=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, leads, length) -> (batch, length, d_model)."""
        return self.dropout(self.token(x).transpose(1, 2) + self.position[: x.shape[-1]])


class EnECGTimesNetExpert(EnECGExpert):
    """TimesNet (Wu et al., 2023) as a frozen EnECG expert.

    Input (batch, leads, input_length); output the mean over time of the last block's layer-normed features,
    (batch, d_model) — TimesNet's representation before its task projection.
    """

    expert_type = "timesnet"
    KEEP_IN_FP32 = True  # FFT period detection
    DEFAULT_PRESET = "tiny"
    PRESETS = {
        "paper": {"d_model": 16, "d_ff": 32, "e_layers": 3, "top_k": 3, "num_kernels": 6, "dropout": 0.1},
        "tiny": {"d_model": 8, "d_ff": 8, "e_layers": 1, "top_k": 2, "num_kernels": 2, "dropout": 0.1},
    }

    def __init__(self, config: EnECGExpertConfig, lead_names: Sequence[str]):
        super().__init__(config, lead_names)
        s = self.settings
        self.embedding = EnECGTimesNetEmbedding(self.num_leads, s["d_model"], config.input_length, s["dropout"])
        self.blocks = nn.ModuleList(
            EnECGTimesNetBlock(s["d_model"], s["d_ff"], s["top_k"], s["num_kernels"]) for _ in range(s["e_layers"])
        )
        self.layer_norm = nn.LayerNorm(s["d_model"])
        self.embedding_dim = s["d_model"]

    def embed(self, inputs: torch.Tensor) -> torch.Tensor:
        """(batch, leads, input_length) -> (batch, d_model)."""
        hidden = self.embedding(inputs)
        for block in self.blocks:
            hidden = self.layer_norm(block(hidden))
        return F.gelu(hidden).mean(dim=1)
