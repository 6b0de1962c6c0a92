"""Runtime precision of the frozen experts' pass: float32 (default), int8 dynamic quantisation of their `nn.Linear`
layers (CPU), or bfloat16 / float16 autocast.

A precision is a choice of how to *run* the experts, never a checkpoint format: the model keeps its float32 expert
weights (an int8 expert is a quantised copy, the original is kept aside), `save_pretrained` writes the float32 ones,
and `set_expert_precision(model, "fp32")` puts the originals back. Heads and gate are never touched.

    int8   `torch.ao.quantization.quantize_dynamic` on the expert's `nn.Linear` layers: int8 weights, activations
           quantised per call, float32 in and out of every layer (so experts that need float32 activations -
           `KEEP_IN_FP32` - can take it). CPU only. An expert without `nn.Linear` layers (a CNN such as DeepFADE, the
           ECG-features expert) is left as it is: nothing to quantise.
    bf16   `torch.autocast` of the expert's forward (its weights stay float32); skipped for `KEEP_IN_FP32` experts,
    fp16   whose computation needs float32 (FFTs, float32 ranks or z-scores). fp16 only on a GPU.

Every converted expert is run once on a random record; one that fails or gives non-finite values is put back to
float32. Every expert left at float32 is logged with the reason. The precision each expert actually runs at is in
`model.expert_precisions`; the feature store's fingerprints include it, so an int8 embedding is never served as a
float32 one, and vice versa.

Torch's quantised Linear cannot load a partial state dict (it reads its own keys even under `strict=False`): load
heads and gate into a model at fp32 (`train.py` puts the experts back to fp32 once their features are computed).
"""

from __future__ import annotations

import contextlib
import copy
import logging
from typing import Iterator

import torch
from torch import nn


logger = logging.getLogger(__name__)

EXPERT_PRECISIONS = ("fp32", "bf16", "fp16", "int8")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_ORIGINALS = "_fp32_experts"  # model attribute: {expert name: the float32 expert an int8 copy replaced}


def _device(module: nn.Module) -> torch.device:
    return next((t.device for t in [*module.parameters(), *module.buffers()]), torch.device("cpu"))


def _has_linear(module: nn.Module) -> bool:
    # nn.MultiheadAttention's out_proj (NonDynamicallyQuantizableLinear) is left alone by quantize_dynamic.
    from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

    return any(type(m) is nn.Linear or (isinstance(m, nn.Linear) and not isinstance(m, NonDynamicallyQuantizableLinear))
               for m in module.modules())


def _no_fast_path(_module, _args) -> None:
    """A forward pre-hook that does nothing. A hook on a `nn.TransformerEncoderLayer` makes it take its plain
    (module-by-module) path: its fused fast path reads `linear1.weight` as a tensor, which a quantised Linear does not
    have."""


def quantize_int8(expert: nn.Module) -> nn.Module:
    """An int8 copy of `expert`: `quantize_dynamic` on its `nn.Linear` layers (the original is left as it is)."""
    converted = torch.ao.quantization.quantize_dynamic(expert, {nn.Linear}, dtype=torch.qint8)
    for module in converted.modules():
        if isinstance(module, nn.TransformerEncoderLayer) and not isinstance(module.linear1, nn.Linear):
            module.register_forward_pre_hook(_no_fast_path)
    return converted.eval()


def _skip_reason(expert: nn.Module, precision: str) -> str | None:
    """Why `expert` stays float32 at `precision` (None: convert it)."""
    device = _device(expert)
    if not any(True for _ in expert.parameters()):
        return "it has no weights"
    if precision == "int8":
        if device.type != "cpu":
            return f"int8 dynamic quantisation runs on the CPU only (the expert is on {device})"
        if not _has_linear(expert):
            return "it has no nn.Linear layers (int8 dynamic quantisation covers only those)"
        return None
    if expert.KEEP_IN_FP32:
        return f"{type(expert).__name__}.KEEP_IN_FP32: its computation needs float32"
    if precision == "fp16" and device.type == "cpu":
        return "fp16 autocast is for the GPU (on the CPU use bf16 or int8)"
    return None


def _probe(expert: nn.Module, lead_count: int, length: int) -> str | None:
    """Run `expert` once on a random record; the error (or non-finite output) as a reason, else None."""
    generator = torch.Generator().manual_seed(0)
    record = torch.randn(1, lead_count, length, generator=generator).to(_device(expert))
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            out = expert(record)
    except Exception as err:  # noqa: BLE001 - any failure means: keep float32
        return f"it fails after conversion ({type(err).__name__}: {err})"
    if out.shape != (1, expert.embedding_dim) or not torch.isfinite(out.float()).all():
        return "its output after conversion is not finite or has the wrong shape"
    return None


def restore_fp32_experts(model) -> None:
    """Put every expert back to float32: the original modules of int8 copies, no autocast."""
    originals = model.__dict__.setdefault(_ORIGINALS, {})
    for name, original in list(originals.items()):
        model.experts[name] = original
        del originals[name]
    for expert in model.experts.values():
        expert.autocast_dtype = None


def set_expert_precision(model, precision: str, check: bool = True) -> dict[str, str]:
    """Run `model`'s frozen experts at `precision` (`EXPERT_PRECISIONS`; see the module docstring). Returns
    `{expert: precision it runs at}` (skipped experts: "fp32"), also kept as `model.expert_precisions`.

    `check=False` skips the one random record each converted expert is run on."""
    if precision not in EXPERT_PRECISIONS:
        raise ValueError(f"expert precision must be one of {', '.join(EXPERT_PRECISIONS)}; got {precision!r}")
    restore_fp32_experts(model)
    applied = {name: "fp32" for name in model.experts}
    if precision != "fp32":
        originals = model.__dict__[_ORIGINALS]
        for name, expert in list(model.experts.items()):
            reason = _skip_reason(expert, precision)
            if reason is None:
                if precision == "int8":
                    try:
                        model.experts[name], originals[name] = quantize_int8(expert), expert
                    except Exception as err:  # noqa: BLE001 - e.g. a torch without quantised kernels
                        reason = f"quantize_dynamic fails on it ({type(err).__name__}: {err})"
                else:
                    expert.autocast_dtype = AUTOCAST_DTYPES[precision]
                if check and reason is None:
                    reason = _probe(model.experts[name], len(model.config.lead_names), model.config.input_length)
                if reason is not None:  # back to float32
                    if name in originals:
                        model.experts[name] = originals.pop(name)
                    expert.autocast_dtype = None
            if reason is None:
                applied[name] = precision
            else:
                logger.warning("Expert %r stays float32 at expert precision %s: %s", name, precision, reason)
    model.expert_precisions = applied
    if precision != "fp32":
        logger.info("Expert precision %s: %s", precision, ", ".join(f"{k}={v}" for k, v in applied.items()))
    return applied


def expert_precision(model, name: str) -> str:
    """The precision expert `name` runs at ("fp32" unless `set_expert_precision` converted it)."""
    return getattr(model, "expert_precisions", {}).get(name, "fp32")


def fp32_expert(model, name: str) -> nn.Module:
    """Expert `name` with its float32 weights: the original of an int8 copy, else the expert itself."""
    return model.__dict__.get(_ORIGINALS, {}).get(name) or model.experts[name]


@contextlib.contextmanager
def fp32_experts_in_place(model) -> Iterator[None]:
    """Within the block, `model.experts` holds the float32 originals of int8 copies (for `state_dict`, saving)."""
    originals = dict(model.__dict__.get(_ORIGINALS, {}))
    converted = {name: model.experts[name] for name in originals}
    for name, original in originals.items():
        model.experts[name] = original
    try:
        yield
    finally:
        for name, module in converted.items():
            model.experts[name] = module


__all__ = ["EXPERT_PRECISIONS", "set_expert_precision", "quantize_int8", "restore_fp32_experts", "expert_precision", "fp32_expert",
           "fp32_experts_in_place"]
