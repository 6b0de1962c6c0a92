"""Signal operations the model and several experts share: Fourier resampling, z-scoring and a centred moving average.

They run inside the model's forward pass, in torch: they batch on the model's device and stay differentiable for
saliency maps. A flat sibling of the model code, so saved model folders carry it (`trust_remote_code`).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch.nn import functional as F



def resample_fourier(x: torch.Tensor, num: int) -> torch.Tensor:
    """Resample the last axis of `x` to `num` samples with the Fourier method of `scipy.signal.resample`.

    Written in torch rather than calling scipy because it runs inside the model's forward pass: it must batch on the
    model's device and stay differentiable for saliency maps. A test checks it against `scipy.signal.resample`.

    Args:
        x: (..., samples) real tensor.
        num: output length.

    Returns:
        (..., num) tensor.
    """
    n = x.shape[-1]
    if n == num:
        return x
    spectrum = torch.fft.rfft(x, dim=-1)
    kept = min(n, num)
    nyquist = kept // 2 + 1
    resampled = spectrum.new_zeros(*spectrum.shape[:-1], num // 2 + 1)
    resampled[..., :nyquist] = spectrum[..., :nyquist]
    if kept % 2 == 0:
        # The Nyquist bin of an even-length signal is shared by +/- frequencies: split or join it as scipy does.
        factor = 2.0 if num < n else 0.5
        resampled[..., kept // 2] = resampled[..., kept // 2] * factor
    return torch.fft.irfft(resampled, n=num, dim=-1) * (num / n)


def zscore(x: torch.Tensor, dims: Sequence[int], eps: float) -> torch.Tensor:
    """`(x - mean) / (std + eps)` over `dims`, with the population standard deviation; a flat part becomes zeros."""
    mean = x.mean(dim=dims, keepdim=True)
    std = x.std(dim=dims, keepdim=True, unbiased=False)
    return (x - mean) / (std + eps)


def normalize_ecg(input_values: torch.Tensor, mode: str, eps: float = 1e-6) -> torch.Tensor:
    """Z-score (batch, leads, samples) over the whole record (`"record"`, the research code) or per lead (`"lead"`)."""
    if mode == "none":
        return input_values
    return zscore(input_values, (1, 2) if mode == "record" else (2,), eps)


def moving_average(x: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Centred moving average of (batch, channels, length) over `kernel_size` samples, the ends repeated (replicate
    padding, as DLinear and TEMPO decompose a series), so any kernel fits any length; same shape out."""
    left = (kernel_size - 1) // 2
    padded = F.pad(x, (left, kernel_size - 1 - left), mode="replicate")
    return F.avg_pool1d(padded, kernel_size=kernel_size, stride=1)


__all__ = ["resample_fourier", "zscore", "normalize_ecg", "moving_average"]
