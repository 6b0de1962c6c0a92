"""Convert upstream expert checkpoints into the folder an EnECG expert loads as its `pretrained` source.

    python -m enecg_hf.tools.convert tempo  TEMPO-80M_v1.pth            converted/tempo-80m
    python -m enecg_hf.tools.convert ecgfm  mimic_iv_ecg_finetuned.pt   converted/ecg-fm
    python -m enecg_hf.tools.convert moment path/to/MOMENT-1-large      converted/moment-large

The output folder holds `model.safetensors` + `expert_config.json` (`EnECGExpert.save_pretrained`). Every upstream key
is accounted for: converted, merged (LoRA), or dropped for a stated reason (optimizer state, pretraining-only heads,
modules the upstream forward never uses). Anything else is an error that names the keys; nothing is skipped silently.
Checkpoints are read with `torch.load(weights_only=True)`: no code in a checkpoint ever runs.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..configuration_enecg import EnECGExpertConfig
from ..expert_base import EXPERT_CONFIG_FILE, EXPERT_WEIGHTS_FILE, EnECGExpert, state_dict_mismatch
from ..expert_registry import EXPERT_TYPES, expert_class


class CheckpointError(ValueError):
    """An upstream checkpoint that cannot be converted faithfully (unsafe, unknown or missing keys, wrong shape)."""


@dataclass
class ConversionReport:
    """What a conversion did with every upstream key."""

    expert_type: str
    source: str
    destination: str
    settings: dict[str, Any]
    converted: list[str] = field(default_factory=list)
    merged_lora: list[str] = field(default_factory=list)
    dropped: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [
            f"Converted {self.expert_type} checkpoint {self.source} -> {self.destination}",
            f"  settings: {json.dumps(self.settings, sort_keys=True)}",
            f"  converted tensors: {len(self.converted)}",
        ]
        if self.merged_lora:
            lines.append(f"  merged LoRA pairs: {len(self.merged_lora)} ({', '.join(self.merged_lora)})")
        if self.dropped:
            reasons: dict[str, list[str]] = {}
            for key, reason in self.dropped.items():
                reasons.setdefault(reason, []).append(key)
            lines.append(f"  dropped: {len(self.dropped)}")
            for reason, keys in reasons.items():
                lines.append(f"    {len(keys)} x {reason}: {', '.join(sorted(keys))}")
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- safe loading
def _allowed_globals() -> dict[str, Any]:
    """Globals a weights-only load may meet in training checkpoints, all inert data types: argparse namespaces (older
    fairseq `args`) and numpy scalars/arrays (metric meters in `extra_state`)."""
    import argparse as argparse_module

    import numpy as np

    allowed: dict[str, Any] = {"argparse.Namespace": argparse_module.Namespace, "numpy.ndarray": np.ndarray,
                               "numpy.dtype": np.dtype}
    # numpy >= 2 pickles these as numpy._core.multiarray.*, numpy 1 as numpy.core.multiarray.*: same functions.
    multiarray = getattr(getattr(np, "_core", None), "multiarray", None) or np.core.multiarray
    for module_name in ("numpy.core.multiarray", "numpy._core.multiarray"):
        for name in ("scalar", "_reconstruct"):
            allowed[f"{module_name}.{name}"] = getattr(multiarray, name)
    for dtype_name in ("Float64DType", "Float32DType", "Float16DType", "Int64DType", "Int32DType", "BoolDType"):
        if hasattr(np, "dtypes") and hasattr(np.dtypes, dtype_name):
            allowed[f"numpy.dtypes.{dtype_name}"] = getattr(np.dtypes, dtype_name)
    return allowed


def load_torch_checkpoint(path: str | Path) -> Any:
    """`torch.load(path, weights_only=True)`, retried with a small allow-list of inert data types if the file needs
    them. A checkpoint that references anything else (a class, a function such as `os.system`) is refused."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint file at {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as first_error:  # UnpicklingError, or RuntimeError wrapping it
        try:
            needed = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception:  # not a zip checkpoint (legacy or plain pickle): no allow-list can be checked
            needed = None
        allowed = _allowed_globals()
        refused = sorted(set(needed) - set(allowed)) if needed is not None else None
        if needed is None or refused or not needed:
            what = f"it references {', '.join(refused)}" if refused else f"{type(first_error).__name__}: {first_error}"
            raise CheckpointError(
                f"Refusing to load {path}: a weights-only load failed ({what}). Only tensors, plain containers and "
                f"inert data types ({', '.join(sorted(allowed))}) are accepted, so that no code in the file can run. "
                "If you trust the file, re-save just its weights where you trust it, e.g. "
                "`torch.save(torch.load(p, weights_only=False)['model'], 'weights.pt')`, and convert that."
            ) from first_error
        # The whole (inert) list: the scan does not report every type a numpy dtype unpickles into.
        with torch.serialization.safe_globals(list(allowed.values())):
            return torch.load(path, map_location="cpu", weights_only=True)


def _state_dict_of(checkpoint: Any, source: str) -> dict[str, torch.Tensor]:
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{source} holds a {type(checkpoint).__name__}, not a state dict")
    bad = [k for k, v in checkpoint.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{source}: entries that are not tensors: {', '.join(map(str, bad[:10]))}")
    return dict(checkpoint)


@dataclass
class _KeyMapping:
    """Upstream tensors under our key names, while a converter sorts a state dict.

    Attributes:
        tensors: our key -> tensor.
        origin: our key -> the upstream key it came from (`"<identity>"` for a tensor the converter made).
        unknown: upstream keys nothing maps.
    """

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)
    unknown: list[str] = field(default_factory=list)

    def add(self, ours: str, tensor: torch.Tensor, upstream: str) -> None:
        self.tensors[ours], self.origin[ours] = tensor, upstream


def _raise_on_mismatch(what: str, mapping: _KeyMapping, expected: dict[str, torch.Tensor]) -> None:
    """Fail listing upstream keys nothing maps (`mapping.unknown`), our keys nothing fills, and mis-shaped tensors."""
    unknown, mapped, origin = mapping.unknown, mapping.tensors, mapping.origin
    missing = sorted(set(expected) - set(mapped))
    unexpected = sorted(unknown) + sorted(origin[k] for k in set(mapped) - set(expected))
    mis_shaped = sorted(
        f"{origin[k]} -> {k}: checkpoint {tuple(mapped[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(mapped) & set(expected) if mapped[k].shape != expected[k].shape
    )
    message = state_dict_mismatch(what, missing, unexpected, mis_shaped)
    if message:
        raise CheckpointError(message)


def _preset_differences(preset_settings: dict[str, Any], inferred: dict[str, Any]) -> str:
    """`"key value (preset p), ..."` for each inferred setting that differs from the preset's (empty if none)."""
    changed = {k: (preset_settings[k], v) for k, v in inferred.items() if preset_settings.get(k) != v}
    return ", ".join(f"{k} {v} (preset {p})" for k, (p, v) in sorted(changed.items()))


def _finish(expert: EnECGExpert, mapped: dict[str, torch.Tensor], report: ConversionReport, destination: str) -> None:
    expert.load_state_dict(mapped, strict=True)
    expert.save_pretrained(destination)
    report.settings = expert.settings


# ---------------------------------------------------------------------------------------------------- TEMPO
TEMPO_UNUSED = {
    "mul_season.a": "MultiFourier season parameters, not used by TEMPO.forward",
    "mul_season.b": "MultiFourier season parameters, not used by TEMPO.forward",
    "map_resid.weight": "map_resid is not used by TEMPO.forward (residual = x - trend - season)",
    "map_resid.bias": "map_resid is not used by TEMPO.forward (residual = x - trend - season)",
    "rev_in_season.affine_weight": "RevIN of the season, not used by TEMPO.forward (only rev_in_trend is)",
    "rev_in_season.affine_bias": "RevIN of the season, not used by TEMPO.forward (only rev_in_trend is)",
    "rev_in_noise.affine_weight": "RevIN of the residual, not used by TEMPO.forward (only rev_in_trend is)",
    "rev_in_noise.affine_bias": "RevIN of the residual, not used by TEMPO.forward (only rev_in_trend is)",
}
_GPT2_KEY = re.compile(r"^gpt2_(trend|season|noise)\.(?:base_model\.model\.)?(.+)$")
_LORA_KEY = re.compile(r"^(.+)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight$")


def convert_tempo(source: str, destination: str, preset: str = "tempo-80m", lora_alpha: float = 16.0,
                  n_head: int | None = None, stride: int | None = None, seq_len: int | None = None) -> ConversionReport:
    """Convert the released TEMPO `.pth` state dict (PEFT-wrapped GPT-2, LoRA r=16 alpha=16 on `c_attn`).

    The patch stride is not stored: the weights only give the number of patches, which several strides may produce
    (seq_len 64, patch 16: strides 13 to 16 all give 5). It is taken from `stride`, else from the preset when the
    checkpoint has the preset's seq_len and patch size and the stride fits, else from the weights when exactly one
    stride fits; otherwise the conversion is refused, listing the candidates. `seq_len`, if given, must match the
    weights (`map_trend` is seq_len x seq_len)."""
    from ..expert_tempo import EnECGTempoExpert

    report = ConversionReport("tempo", str(source), str(destination), {})
    state = _without_data_parallel_prefix(_state_dict_of(load_torch_checkpoint(source), source), report)
    mapping, lora = _sort_tempo_keys(state, report)
    _merge_tempo_lora(mapping, lora, lora_alpha, report)
    mapped = mapping.tensors

    settings = dict(EnECGTempoExpert.PRESETS[preset])
    inferred = _tempo_shapes(source, state, mapped)
    if seq_len is not None and seq_len != inferred["seq_len"]:
        raise CheckpointError(f"{source}: --seq-len {seq_len}, but map_trend is {inferred['seq_len']} x "
                              f"{inferred['seq_len']} (the checkpoint's seq_len)")
    inferred["stride"] = _tempo_stride(source, mapped["out_layer_trend.weight"].shape[1] // inferred["d_model"],
                                       inferred, settings, preset, stride, report)
    if n_head is not None:
        inferred["n_head"] = n_head
    if differences := _preset_differences(settings, inferred):
        report.notes.append(f"checkpoint differs from preset {preset!r}: {differences}; use these settings in the "
                            "expert config")
    settings.update(inferred)
    expert = EnECGTempoExpert(
        EnECGExpertConfig("tempo", "tempo", settings["seq_len"], ["II"], settings=settings), ["II"]
    )
    _raise_on_mismatch(f"TEMPO checkpoint {source}", mapping, expert.state_dict())
    report.converted = sorted(mapping.origin.values())
    _finish(expert, mapped, report, destination)
    return report


def _without_data_parallel_prefix(state: dict[str, torch.Tensor], report: ConversionReport) -> dict[str, torch.Tensor]:
    """`state` with the `module.` prefix `nn.DataParallel` puts before every key removed (noted in `report`)."""
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
        report.notes.append("stripped the DataParallel prefix 'module.'")
    return state


def _sort_tempo_keys(state: dict[str, torch.Tensor],
                     report: ConversionReport) -> tuple[_KeyMapping, dict[str, dict[str, tuple[str, torch.Tensor]]]]:
    """Sort every key of a TEMPO state dict: modules `TEMPO.forward` never uses and GPT-2's old causal-mask buffers
    are dropped (with the reason, in `report.dropped`); GPT-2, RevIN and projection tensors get our names; LoRA
    factors are set aside for `_merge_tempo_lora`; anything else is unknown.

    Returns:
        The mapping, and the LoRA factors: our module name -> {"lora_A" / "lora_B": (upstream key, tensor)}.
    """
    mapping = _KeyMapping()
    lora: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, tensor in state.items():
        gpt2 = _GPT2_KEY.match(key)
        if key in TEMPO_UNUSED:
            report.dropped[key] = TEMPO_UNUSED[key]
        elif gpt2:
            stack, inner = gpt2.groups()
            if re.fullmatch(r"h\.\d+\.attn\.(bias|masked_bias)", inner):
                report.dropped[key] = "GPT-2 causal-mask buffer of older transformers, rebuilt at run time"
                continue
            lora_match = _LORA_KEY.match(inner)
            if lora_match:
                module, which = lora_match.groups()
                lora.setdefault(f"gpt2_{stack}.{module}", {})[which] = (key, tensor)
                continue
            inner = inner.replace(".base_layer.", ".")
            mapping.add(f"gpt2_{stack}.{inner}", tensor, key)
        elif key.startswith("rev_in_trend."):
            mapping.add("rev_in." + key[len("rev_in_trend."):], tensor, key)
        elif re.match(r"^(map_trend|map_season|(in|out|prompt)_layer_(trend|season|noise))\.", key):
            mapping.add(key, tensor, key)
        else:
            mapping.unknown.append(key)
    return mapping, lora


def _merge_tempo_lora(mapping: _KeyMapping, lora: dict[str, dict[str, tuple[str, torch.Tensor]]], lora_alpha: float,
                      report: ConversionReport) -> None:
    """Fold every LoRA pair of `lora` (from `_sort_tempo_keys`) into its base weight in `mapping`, listing the merged
    modules in `report.merged_lora`; a lone factor, or a pair without its base weight, is unknown.

    Raises:
        CheckpointError: a pair's product does not have its base weight's shape.
    """
    # W += (B @ A)^T * alpha / r (GPT-2's Conv1D stores W as (in, out)).
    for module, pair in sorted(lora.items()):
        if set(pair) != {"lora_A", "lora_B"}:
            mapping.unknown.extend(k for k, _ in pair.values())
            continue
        (key_a, a), (key_b, b) = pair["lora_A"], pair["lora_B"]
        base_key = f"{module}.weight"
        if base_key not in mapping.tensors:
            mapping.unknown.extend([key_a, key_b])
            continue
        delta = (b.double() @ a.double()) * (lora_alpha / a.shape[0])
        base = mapping.tensors[base_key]
        if delta.T.shape == base.shape:
            delta = delta.T
        elif delta.shape != base.shape:
            raise CheckpointError(f"LoRA {key_a} / {key_b}: delta {tuple(delta.shape)} does not fit {tuple(base.shape)}")
        mapping.tensors[base_key] = (base.double() + delta).to(base.dtype)
        report.merged_lora.append(module)
    if lora:
        report.notes.append(f"LoRA scaling alpha/r = {lora_alpha:g}/r (alpha is not stored in the state dict; "
                            "upstream LoraConfig uses r=16, lora_alpha=16)")


def _tempo_shapes(source: str, state: dict[str, torch.Tensor], mapped: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The TEMPO settings the converted weights (`mapped`) determine: sizes, GPT-2 layers, one or three backbones.

    Raises:
        CheckpointError: a tensor every TEMPO checkpoint has is missing (`state` is listed in the message).
    """
    stacks = sorted({k.split(".")[0][len("gpt2_"):] for k in mapped if k.startswith("gpt2_")})
    try:
        return {
            "shared_backbone": stacks == ["trend"],
            "gpt_layers": 1 + max(int(k.split(".")[2]) for k in mapped if re.match(r"^gpt2_\w+\.h\.\d+\.", k)),
            "vocab_size": mapped["gpt2_trend.wte.weight"].shape[0],
            "d_model": mapped["gpt2_trend.wte.weight"].shape[1],
            "n_positions": mapped["gpt2_trend.wpe.weight"].shape[0],
            "seq_len": mapped["map_trend.weight"].shape[0],
            "pred_len": mapped["out_layer_trend.weight"].shape[0],
            "patch_size": mapped["in_layer_trend.weight"].shape[1],
        }
    except (KeyError, ValueError) as err:
        raise CheckpointError(f"{source} is not a TEMPO state dict: cannot find {err}; keys: {sorted(state)[:20]}...")


def _tempo_stride(source: str, num_patches: int, inferred: dict, preset_settings: dict, preset: str,
                  stride: int | None, report: ConversionReport) -> int:
    """The patch stride of a TEMPO checkpoint (see `convert_tempo`)."""
    seq_len, patch_size = inferred["seq_len"], inferred["patch_size"]
    fitting = [s for s in range(1, patch_size + 1) if (seq_len - patch_size) // s + 2 == num_patches]
    if stride is not None:
        if stride not in fitting:
            raise CheckpointError(f"{source}: --stride {stride} gives {(seq_len - patch_size) // stride + 2} patches of "
                                  f"{patch_size} over {seq_len} samples; out_layer_trend takes {num_patches} "
                                  f"(strides that give it: {fitting or 'none'})")
        return stride
    if not fitting:
        raise CheckpointError(f"{source}: out_layer_trend takes {num_patches} patches, which no stride gives")
    same_shape = (preset_settings["seq_len"], preset_settings["patch_size"]) == (seq_len, patch_size)
    if same_shape and preset_settings["stride"] in fitting:
        if len(fitting) > 1:
            report.notes.append(f"stride {preset_settings['stride']} from preset {preset!r} (strides {fitting} all fit "
                                "the weights)")
        return preset_settings["stride"]
    if len(fitting) > 1:
        raise CheckpointError(f"{source}: the stride is not stored and strides {fitting} all give the {num_patches} "
                              f"patches out_layer_trend takes (seq_len {seq_len}, patch {patch_size}); pass --stride")
    return fitting[0]


# ---------------------------------------------------------------------------------------------------- ECG-FM
# Pretraining-only parts of a fairseq-signals wav2vec 2.0 checkpoint (not used to embed or classify: the target
# quantizer and its projections, which `remove_pretraining_modules` deletes, and the mask embedding).
ECGFM_PRETRAINING_ONLY = ("mask_emb", "quantizer.", "project_q.", "final_proj.", "target_glu.")
# Present only with `quantize_input=True`, and used by the upstream forward also to embed (features -> input_quantizer
# -> project_inp -> transformer): this expert has no input quantizer, so such checkpoints are refused.
ECGFM_QUANTIZED_INPUT = ("input_quantizer.", "project_inp.")
ECGFM_RENAMES = [  # fairseq-signals (after the `encoder.` prefix of fine-tuned models) -> ours
    (r"^feature_extractor\.conv_layers\.(\d+)\.0\.weight$", r"wav2vec2.feature_extractor.conv_layers.\1.conv.weight"),
    (r"^feature_extractor\.conv_layers\.0\.2\.(weight|bias)$", r"wav2vec2.feature_extractor.conv_layers.0.layer_norm.\1"),
    (r"^layer_norm\.(weight|bias)$", r"wav2vec2.feature_projection.layer_norm.\1"),
    (r"^post_extract_proj\.(weight|bias)$", r"wav2vec2.feature_projection.projection.\1"),
    (r"^conv_pos\.pos_conv\.0\.bias$", r"wav2vec2.encoder.pos_conv_embed.conv.bias"),
    # weight norm over dim 2: torch.nn.utils.weight_norm's g/v are parametrizations' original0/original1.
    (r"^conv_pos\.pos_conv\.0\.(?:weight_g|parametrizations\.weight\.original0)$",
     r"wav2vec2.encoder.pos_conv_embed.conv.parametrizations.weight.original0"),
    (r"^conv_pos\.pos_conv\.0\.(?:weight_v|parametrizations\.weight\.original1)$",
     r"wav2vec2.encoder.pos_conv_embed.conv.parametrizations.weight.original1"),
    (r"^encoder\.layers\.(\d+)\.self_attn\.(q|k|v|out)_proj\.(weight|bias)$",
     r"wav2vec2.encoder.layers.\1.attention.\2_proj.\3"),
    (r"^encoder\.layers\.(\d+)\.self_attn_layer_norm\.(weight|bias)$", r"wav2vec2.encoder.layers.\1.layer_norm.\2"),
    (r"^encoder\.layers\.(\d+)\.fc1\.(weight|bias)$", r"wav2vec2.encoder.layers.\1.feed_forward.intermediate_dense.\2"),
    (r"^encoder\.layers\.(\d+)\.fc2\.(weight|bias)$", r"wav2vec2.encoder.layers.\1.feed_forward.output_dense.\2"),
    (r"^encoder\.layers\.(\d+)\.final_layer_norm\.(weight|bias)$", r"wav2vec2.encoder.layers.\1.final_layer_norm.\2"),
    (r"^encoder\.layer_norm\.(weight|bias)$", r"wav2vec2.encoder.layer_norm.\1"),
]


def _parse_conv_layers(spec: Any) -> list[list[int]] | None:
    """fairseq's `conv_feature_layers` string, e.g. "[(256, 2, 2)] * 4", parsed without eval."""
    if not isinstance(spec, str):
        return None
    layers: list[list[int]] = []
    for part in spec.split("+"):
        match = re.fullmatch(r"\s*(\[.*\])\s*(?:\*\s*(\d+))?\s*", part)
        if not match:
            return None
        try:
            block = ast.literal_eval(match.group(1))
        except (ValueError, SyntaxError):
            return None
        layers.extend([list(map(int, item)) for item in block] * int(match.group(2) or 1))
    return layers


def _ecgfm_model_config(checkpoint: dict, report: ConversionReport) -> dict[str, Any]:
    """The model settings of a fairseq checkpoint: `cfg["model"]` (hydra-era), or the flat `args` namespace of older
    checkpoints that carry `cfg: None` (read without unpickling code: `argparse.Namespace` is on the allow-list)."""
    cfg = checkpoint.get("cfg")
    model_cfg = cfg.get("model") if isinstance(cfg, dict) else getattr(cfg, "model", None)
    if model_cfg is None and checkpoint.get("args") is not None:
        model_cfg = checkpoint["args"]
        report.notes.append("model settings read from the checkpoint's `args` namespace (no `cfg`)")
    if model_cfg is None:
        return {}
    if isinstance(model_cfg, dict):
        return model_cfg
    return dict(vars(model_cfg)) if hasattr(model_cfg, "__dict__") else {}


def convert_ecgfm(source: str, destination: str, preset: str | None = None) -> ConversionReport:
    """Convert a fairseq-signals ECG-FM checkpoint (`.pt` dict with `model` and `cfg`)."""
    from ..expert_ecgfm import EnECGEcgFmExpert

    report = ConversionReport("ecgfm", str(source), str(destination), {})
    state, model_cfg = _ecgfm_weights_and_config(load_torch_checkpoint(source), source, report)
    prefix = "encoder." if any(k.startswith("encoder.feature_extractor.") for k in state) else ""
    _refuse_quantized_input(state, prefix, model_cfg, source)
    mapping = _sort_ecgfm_keys(state, prefix, source, report)
    try:
        base, inferred = _ecgfm_preset_and_shapes(mapping, model_cfg, preset, report)
    except (KeyError, ValueError, IndexError) as err:
        raise CheckpointError(f"{source} does not look like an ECG-FM checkpoint: cannot find {err}") from err
    if model_cfg.get("encoder_attention_heads"):
        inferred["num_heads"] = int(model_cfg["encoder_attention_heads"])
    else:
        report.notes.append(f"encoder_attention_heads not in cfg; {base['num_heads']} from the preset")
    if model_cfg.get("in_d") not in (None, inferred["in_channels"]):
        raise CheckpointError(f"{source}: cfg in_d {model_cfg['in_d']} but the first conv reads {inferred['in_channels']}")
    if differences := _preset_differences(base, inferred):
        report.notes.append(f"checkpoint differs from the preset: {differences}")
    settings = {**base, **inferred}
    expert = EnECGEcgFmExpert(
        EnECGExpertConfig("ecgfm", "ecgfm", 2500, [f"lead{i}" for i in range(settings["in_channels"])], settings=settings),
        [f"lead{i}" for i in range(settings["in_channels"])],
    )
    _raise_on_mismatch(f"ECG-FM checkpoint {source}", mapping, expert.state_dict())
    report.converted = sorted(k for k in mapping.origin.values() if k != "<identity>")
    _finish(expert, mapping.tensors, report, destination)
    return report


def _ecgfm_weights_and_config(checkpoint: Any, source: str,
                              report: ConversionReport) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The model state dict and model settings of a fairseq checkpoint; its other entries (config, optimizer, training
    state) are listed in `report.dropped`.

    Raises:
        CheckpointError: not a fairseq checkpoint, or an architecture this expert does not have (pre-LN, another
            feature extractor mode).
    """
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        raise CheckpointError(f"{source} is not a fairseq checkpoint: expected a dict with a 'model' entry")
    for entry in sorted(set(checkpoint) - {"model"}):
        report.dropped[f"<{entry}>"] = "checkpoint entry that is not model weights (config, optimizer, training state)"
    state = _state_dict_of(checkpoint["model"], f"{source}['model']")
    model_cfg = _ecgfm_model_config(checkpoint, report)
    if model_cfg.get("layer_norm_first"):
        raise CheckpointError(f"{source}: layer_norm_first=True (pre-LN) is not the ECG-FM architecture this expert has")
    if model_cfg.get("extractor_mode", "default") != "default":
        raise CheckpointError(f"{source}: extractor_mode {model_cfg['extractor_mode']!r} is not supported (need 'default')")
    return state, model_cfg


def _refuse_quantized_input(state: dict[str, torch.Tensor], prefix: str, model_cfg: dict[str, Any], source: str) -> None:
    """Raise `CheckpointError` for a checkpoint trained with `quantize_input=True` (see `ECGFM_QUANTIZED_INPUT`)."""
    quantized = sorted(k for k in state if k[len(prefix):].startswith(ECGFM_QUANTIZED_INPUT)
                       or k.startswith(ECGFM_QUANTIZED_INPUT))
    if model_cfg.get("quantize_input") or quantized:
        raise CheckpointError(
            f"{source} was trained with quantize_input=True: upstream wav2vec 2.0 feeds the transformer quantized "
            "features (input_quantizer, then project_inp) also when it embeds, and this expert has no input quantizer, "
            f"so a conversion would not compute what the checkpoint does. Keys: {', '.join(quantized[:6]) or 'none'}")


def _sort_ecgfm_keys(state: dict[str, torch.Tensor], prefix: str, source: str, report: ConversionReport) -> _KeyMapping:
    """Sort every key of a fairseq-signals state dict (`prefix`: `"encoder."` for fine-tuned models): the classifier
    `proj` is kept, pretraining-only modules are dropped (in `report.dropped`), the encoder is renamed by
    `ECGFM_RENAMES`; anything else is unknown.

    Raises:
        CheckpointError: two upstream keys give the same key of ours.
    """
    mapping = _KeyMapping()
    for key, tensor in state.items():
        if key in ("proj.weight", "proj.bias"):
            mapping.add(key, tensor, key)
            continue
        inner = key[len(prefix):] if key.startswith(prefix) else None
        if inner is not None and inner.startswith(ECGFM_PRETRAINING_ONLY) or key.startswith(ECGFM_PRETRAINING_ONLY):
            report.dropped[key] = "wav2vec 2.0 pretraining-only module (quantizer / projections / mask embedding)"
            continue
        for pattern, replacement in ECGFM_RENAMES:
            if inner is not None and re.match(pattern, inner):
                ours = re.sub(pattern, replacement, inner)
                if ours in mapping.tensors:
                    raise CheckpointError(f"{source}: {key} and {mapping.origin[ours]} both give {ours}")
                mapping.add(ours, tensor, key)
                break
        else:
            mapping.unknown.append(key)
    if any(k.endswith(("weight_g", "weight_v")) for k in mapping.origin.values()):
        report.notes.append("positional conv in the older weight_g/weight_v layout, mapped to original0/original1")
    return mapping


def _ecgfm_preset_and_shapes(mapping: _KeyMapping, model_cfg: dict[str, Any], preset: str | None,
                             report: ConversionReport) -> tuple[dict[str, Any], dict[str, Any]]:
    """The preset's settings (`preset`, by default "ecg-fm" for a checkpoint with a classifier, else
    "ecg-fm-pretrained"), and the settings the converted weights determine (conv strides from the cfg, else from the
    preset, saying so). Adds the identity projection upstream implies when it has none (`_add_identity_projection`).

    Raises:
        KeyError, ValueError, IndexError: a tensor every ECG-FM checkpoint has is missing.
    """
    from ..expert_ecgfm import EnECGEcgFmExpert

    mapped = mapping.tensors
    conv_keys = sorted((k for k in mapped if k.endswith(".conv.weight") and "feature_extractor" in k),
                       key=lambda k: int(k.split(".")[3]))
    conv_weights = [mapped[k] for k in conv_keys]
    strides = [c[2] for c in _parse_conv_layers(model_cfg.get("conv_feature_layers")) or []]
    base = dict(EnECGEcgFmExpert.PRESETS[preset or ("ecg-fm" if "proj.weight" in mapped else "ecg-fm-pretrained")])
    if len(strides) != len(conv_weights):
        strides = [c[2] for c in base["conv_layers"]]
        report.notes.append(f"conv strides not in cfg; taken from the preset: {strides}")
    pos_v = mapped["wav2vec2.encoder.pos_conv_embed.conv.parametrizations.weight.original1"]
    hidden = mapped["wav2vec2.encoder.layer_norm.weight"].shape[0]
    _add_identity_projection(mapping, conv_weights[-1].shape[0], hidden, pos_v.dtype, report)
    inferred = {
        "in_channels": conv_weights[0].shape[1],
        "conv_layers": [[w.shape[0], w.shape[2], s] for w, s in zip(conv_weights, strides)],
        "hidden_size": hidden,
        "num_layers": 1 + max(int(k.split(".")[3]) for k in mapped if ".encoder.layers." in k),
        "intermediate_size": mapped["wav2vec2.encoder.layers.0.feed_forward.intermediate_dense.weight"].shape[0],
        "conv_pos": pos_v.shape[2],
        "conv_pos_groups": hidden // pos_v.shape[1],
        "num_labels": mapped["proj.weight"].shape[0] if "proj.weight" in mapped else 0,
    }
    return base, inferred


def _add_identity_projection(mapping: _KeyMapping, width: int, hidden: int, dtype: torch.dtype,
                             report: ConversionReport) -> None:
    """Without `post_extract_proj`, and with the conv `width` equal to the `hidden` width, add an identity projection:
    upstream builds post_extract_proj only when the conv width differs from encoder_embed_dim."""
    if "wav2vec2.feature_projection.projection.weight" not in mapping.tensors and width == hidden:
        mapping.add("wav2vec2.feature_projection.projection.weight", torch.eye(hidden, dtype=dtype), "<identity>")
        mapping.add("wav2vec2.feature_projection.projection.bias", torch.zeros(hidden, dtype=dtype), "<identity>")
        report.notes.append(f"no post_extract_proj: the conv width equals the hidden width ({hidden}), upstream "
                            "passes the features on unprojected (identity projection)")


# ---------------------------------------------------------------------------------------------------- MOMENT
def convert_moment(source: str, destination: str, preset: str | None = None) -> ConversionReport:
    """Convert a `momentfm` folder (`config.json` + `model.safetensors` or `pytorch_model.bin`), including older
    MOMENT-1-large configs without `t5_config`, into our folder format."""
    from safetensors.torch import save_file

    from ..expert_moment import EnECGMomentExpert

    folder = Path(source)
    report = ConversionReport("moment", str(source), str(destination), {})
    if not folder.is_dir():
        raise CheckpointError(f"{source} is not a folder: give the momentfm folder (config.json + weights)")
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    if not preset:
        by_width = {s["d_model"]: name for name, s in EnECGMomentExpert.PRESETS.items() if name != "tiny"}
        if config.get("d_model") not in by_width:
            raise CheckpointError(f"{source}: cannot tell the MOMENT size from config.json (d_model "
                                  f"{config.get('d_model')}); pass --preset")
        preset = by_width[config["d_model"]]
    if config and "t5_config" not in config:
        report.notes.append("config.json has no t5_config (older MOMENT-1 release): T5 settings from preset "
                            f"{preset!r}")
    with tempfile.TemporaryDirectory() as tmp:
        weights = folder / "model.safetensors"
        if not weights.is_file():
            if not (folder / "pytorch_model.bin").is_file():
                raise CheckpointError(f"{source}: no model.safetensors or pytorch_model.bin")
            state = _state_dict_of(load_torch_checkpoint(folder / "pytorch_model.bin"), f"{source}/pytorch_model.bin")
            save_file({k: v.contiguous() for k, v in state.items()}, str(Path(tmp) / "model.safetensors"))
            report.notes.append("read pytorch_model.bin (weights-only)")
            if (folder / "config.json").is_file():
                (Path(tmp) / "config.json").write_text((folder / "config.json").read_text())
            folder = Path(tmp)
        from safetensors import safe_open

        with safe_open(str(folder / "model.safetensors"), "pt") as handle:
            upstream_keys = list(handle.keys())
        expert = EnECGMomentExpert(
            EnECGExpertConfig("moment", "moment", int(config.get("seq_len", 512)), ["II"], settings={"preset": preset}),
            ["II"],
        )
        try:
            expert.load_momentfm_folder(folder, str(source))
        except ValueError as err:
            raise CheckpointError(str(err)) from err
    for key in upstream_keys:
        if key.startswith("head."):
            report.dropped[key] = "pretraining reconstruction head, not part of the embedding model"
        else:
            report.converted.append(key)
    expert.save_pretrained(destination)
    report.settings = expert.settings
    return report


def converters() -> dict[str, Callable[..., ConversionReport]]:
    """Expert type -> the function above that converts its upstream checkpoint, as the expert class names it
    (`EnECGExpert.CONVERTER`)."""
    names = {expert_type: expert_class(expert_type).CONVERTER for expert_type in EXPERT_TYPES}
    return {expert_type: globals()[name] for expert_type, name in names.items() if name}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m enecg_hf.tools.convert",
        description="Convert an upstream expert checkpoint into an EnECG expert folder.",
    )
    available = converters()
    parser.add_argument("expert_type", choices=sorted(available))
    parser.add_argument("source", help="tempo: the .pth state dict; ecgfm: the fairseq .pt; moment: the momentfm folder")
    parser.add_argument("destination", help=f"output folder ({EXPERT_WEIGHTS_FILE} + {EXPERT_CONFIG_FILE})")
    parser.add_argument("--preset", help="expert preset the checkpoint is checked against (default: by type/size)")
    parser.add_argument("--lora-alpha", type=float, default=16.0, help="tempo: LoRA alpha of the checkpoint (16)")
    parser.add_argument("--n-head", type=int, help="tempo: GPT-2 attention heads, not stored in the weights (12)")
    parser.add_argument("--stride", type=int, help="tempo: patch stride, not stored in the weights (needed when "
                        "several strides fit them)")
    parser.add_argument("--seq-len", type=int, help="tempo: input length, checked against the weights")
    args = parser.parse_args(argv)
    kwargs: dict[str, Any] = {}
    if args.preset:
        kwargs["preset"] = args.preset
    if args.expert_type == "tempo":
        kwargs.update(lora_alpha=args.lora_alpha, n_head=args.n_head, stride=args.stride, seq_len=args.seq_len)
    elif args.stride is not None or args.seq_len is not None:
        parser.error("--stride and --seq-len are TEMPO options")
    try:
        report = available[args.expert_type](args.source, args.destination, **kwargs)
    except (CheckpointError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["convert_tempo", "convert_ecgfm", "convert_moment", "converters", "load_torch_checkpoint",
           "CheckpointError", "ConversionReport", "main"]
