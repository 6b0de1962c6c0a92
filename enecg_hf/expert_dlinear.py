"""DLinear expert: moving-average decomposition into trend and seasonal parts, each mapped by a linear layer."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .configuration_enecg import EnECGExpertConfig
from .expert_base import EnECGExpert
from .signal_enecg import moving_average


class EnECGDLinearExpert(EnECGExpert):
    """DLinear (Zeng et al., 2023) as a frozen EnECG expert.

    Each lead is decomposed into trend (moving average) and seasonal remainder; shared linear maps take each part from
    `input_length` samples to `pred_len` outputs and are summed, as in DLinear. The research code used `pred_len=1`,
    a one-number bottleneck per lead; we keep `pred_len` outputs per lead as the embedding, (batch, leads * pred_len).
    """

    expert_type = "dlinear"
    DEFAULT_PRESET = "tiny"
    PRESETS = {
        # The research configuration's kernel (1001 on 500 samples: the trend is close to the lead's mean).
        "paper": {"moving_avg": 1001, "pred_len": 64},
        "tiny": {"moving_avg": 25, "pred_len": 16},
    }

    def __init__(self, config: EnECGExpertConfig, lead_names: Sequence[str]):
        super().__init__(config, lead_names)
        pred_len = self.settings["pred_len"]
        self.linear_seasonal = nn.Linear(config.input_length, pred_len)
        self.linear_trend = nn.Linear(config.input_length, pred_len)
        self.embedding_dim = self.num_leads * pred_len

    def embed(self, inputs: torch.Tensor) -> torch.Tensor:
        """(batch, leads, input_length) -> (batch, leads * pred_len)."""
        trend = moving_average(inputs, self.settings["moving_avg"])
        output = self.linear_seasonal(inputs - trend) + self.linear_trend(trend)
        return output.flatten(start_dim=1)
