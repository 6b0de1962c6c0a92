"""The expert interface every EnECG backbone implements.

An expert takes the model's `input_values` (batch, leads, samples) at the config's sampling rate, keeps the leads it
reads, resamples them to its own input length and returns one pooled embedding per record, (batch, embedding_dim).
Experts are frozen feature extractors: the EnECG heads and gate learn on top of them.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

import torch
from torch import nn

from .configuration_enecg import EnECGExpertConfig, declared_fields
from .denormal_enecg import flush_denormals
from .signal_enecg import resample_fourier


if TYPE_CHECKING:
    from .configuration_enecg import EnECGConfig


logger = logging.getLogger(__name__)

# Files of an expert weight folder, as written by `EnECGExpert.save_pretrained` and `python -m enecg_hf.tools.convert`.
EXPERT_CONFIG_FILE = "expert_config.json"
EXPERT_WEIGHTS_FILE = "model.safetensors"
# `pretrained: "package:openecg/models/codec_v6.pt"` names a file shipped inside an installed Python package (a wheel).
PACKAGE_SOURCE_PREFIX = "package:"


class EnECGExpert(nn.Module):
    """Base class of the frozen EnECG experts.

    Subclasses set `expert_type`, `PRESETS` (named architecture settings; `"tiny"` is required for tests), build their
    backbone in `__init__`, set `self.embedding_dim`, and implement `embed`. Weight loading from a hub id or local
    folder is shared (`load_pretrained`); experts with an upstream format of their own (MOMENT) override it.
    """

    expert_type: ClassVar[str] = ""
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}
    DEFAULT_PRESET: ClassVar[str] = "tiny"
    # Licence and training data of the released weights a `pretrained` source loads (model cards print them); None
    # for experts without released weights.
    WEIGHTS_LICENSE: ClassVar[str | None] = None
    WEIGHTS_TRAINING_DATA: ClassVar[str | None] = None
    # Experts whose computation needs float32 (FFTs, which torch has no bfloat16/float16 CPU kernels for, or a
    # library's network fed by its own float32 preprocessing): they stay float32 when the model is loaded with
    # `from_pretrained(..., dtype=torch.bfloat16)` (`EnECGModel._keep_in_fp32_modules_strict`).
    KEEP_IN_FP32: ClassVar[bool] = False
    # Whether gradients flow from the embedding back to the input (saliency maps need them). An expert that computes
    # in numpy or on ranks sets False and says why in `NOT_DIFFERENTIABLE_REASON`, which explanations report.
    DIFFERENTIABLE: ClassVar[bool] = True
    NOT_DIFFERENTIABLE_REASON: ClassVar[str] = ""
    # The function of `enecg_hf.tools.convert` that turns the released upstream checkpoint into the folder
    # `load_pretrained` reads (`python -m enecg_hf.tools.convert <expert_type> SOURCE DEST`); None for experts that
    # read their upstream format themselves or have no released weights.
    CONVERTER: ClassVar[str | None] = None
    # Raised when the expert's code computes its embedding differently (even in the last bits) from the same weights
    # and settings: its feature-store fingerprint changes, so values of the old code are not mixed with new ones.
    COMPUTATION_VERSION: ClassVar[int] = 1
    # What the embedding is computed from besides the record and the weights (`frozen_dependencies`, which the feature
    # store's fingerprint of the expert's column hashes): every field of the expert's entry in `EnECGConfig.experts`
    # but `ENTRY_FIELDS_NOT_READ` (a renamed expert computes the same values), and the model config fields
    # `MODEL_CONFIG_FIELDS`: the base picks its leads by their index in `lead_names`, and `input_length /
    # sampling_rate` is the record's length that experts measuring in seconds check their `record_seconds` against.
    # An expert whose code reads another field of the model config lists it here, or its stored values go stale.
    ENTRY_FIELDS_NOT_READ: ClassVar[tuple[str, ...]] = ("name",)
    MODEL_CONFIG_FIELDS: ClassVar[tuple[str, ...]] = ("lead_names", "input_length", "sampling_rate")
    # Set per instance by `set_expert_precision` (precision_enecg.py): the backbone runs under `torch.autocast` in this
    # dtype (its weights stay float32). None: no autocast.
    autocast_dtype: torch.dtype | None = None

    def __init__(self, config: EnECGExpertConfig, lead_names: Sequence[str]):
        super().__init__()
        self.expert_config = config
        self.settings = self.resolve_settings(config.settings)
        # A plain list rather than a buffer: buffers created on the meta device by `from_pretrained` are not restored.
        self.lead_indices = [list(lead_names).index(lead) for lead in config.leads]
        self.embedding_dim: int = 0

    @property
    def name(self) -> str:
        return self.expert_config.name

    @property
    def num_leads(self) -> int:
        return len(self.lead_indices)

    @property
    def missing_indicators(self) -> list[tuple[int, int]]:
        """`(value column, flag column)` pairs of the embedding: the value is not measured where its flag is 1 (and
        then holds a placeholder). Heads with a linear path read such a value as the training records' mean of the
        measured ones, so that a placeholder is never extrapolated from. None by default."""
        return []

    @classmethod
    def validate_config(cls, expert_config: EnECGExpertConfig, config: EnECGConfig) -> None:
        """Check the expert's entry of a model `config` before anything is built; a `ValueError` names the field.

        `build_expert` calls it when the model is built. `EnECGConfig` checks only what every expert shares (type,
        input length, leads): calling this from the config would import every expert's libraries with the config. The
        base resolves the settings (known preset and keys); experts add checks that need the model's config."""
        cls.resolve_settings(expert_config.settings)

    @classmethod
    def resolve_settings(cls, settings: dict[str, Any]) -> dict[str, Any]:
        """Merge a preset with explicit overrides; unknown keys are an error naming the expert type."""
        settings = dict(settings or {})
        preset = settings.pop("preset", cls.DEFAULT_PRESET)
        if preset not in cls.PRESETS:
            raise ValueError(f"{cls.expert_type} expert: unknown preset {preset!r}; known: {sorted(cls.PRESETS)}")
        resolved = dict(cls.PRESETS[preset])
        unknown = set(settings) - set(resolved)
        if unknown:
            raise ValueError(
                f"{cls.expert_type} expert: unknown settings {sorted(unknown)}; known: {sorted(resolved)} (and 'preset')"
            )
        resolved.update(settings)
        return resolved

    def frozen_dependencies(self, config: EnECGConfig) -> dict[str, Any]:
        """What the embedding is computed from besides the record and the weights, as JSON-able data: the class, the
        expert's entry but `ENTRY_FIELDS_NOT_READ`, the model `config`'s `MODEL_CONFIG_FIELDS` and, from 2 on, the
        `COMPUTATION_VERSION` (left out at 1, so that the stores written before it existed stay valid)."""
        entry = {k: v for k, v in self.expert_config.to_dict().items() if k not in self.ENTRY_FIELDS_NOT_READ}
        dependencies = {"class": f"{type(self).__module__}.{type(self).__qualname__}", "expert": entry,
                        **vars(declared_fields(config, self.MODEL_CONFIG_FIELDS))}
        if self.COMPUTATION_VERSION > 1:
            dependencies["computation"] = self.COMPUTATION_VERSION
        return dependencies

    def prepare_inputs(self, input_values: torch.Tensor) -> torch.Tensor:
        """(batch, all_leads, samples) -> (batch, expert_leads, expert input_length)."""
        selected = input_values[:, self.lead_indices, :]
        return resample_fourier(selected, self.expert_config.input_length)

    def embed(self, inputs: torch.Tensor) -> torch.Tensor:
        """(batch, expert_leads, input_length) -> (batch, embedding_dim). Implemented by each expert."""
        raise NotImplementedError

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the backbone runs in: that of its floating-point weights (float32 without weights)."""
        return next((p.dtype for p in self.parameters() if p.is_floating_point()), torch.float32)

    def forward(self, input_values: torch.Tensor) -> torch.Tensor:
        """(batch, all_leads, samples) -> pooled embedding (batch, embedding_dim), in `compute_dtype`.

        Lead selection and resampling run in float32 (an FFT); the backbone then gets its input in its own dtype. The
        whole call flushes subnormal floats to zero on every thread that computes it (`flush_denormals`)."""
        dtype = self.compute_dtype
        if self.KEEP_IN_FP32 and dtype != torch.float32:
            raise ValueError(
                f"Expert {self.name!r} ({self.expert_type}) runs in float32 only, but its weights are {dtype}. Load the "
                "model with from_pretrained(..., dtype=...), which keeps such experts in float32, or cast only the heads "
                "and gates (model.tasks.to(dtype))."
            )
        # Subnormal floats are flushed to zero in every thread of the pass (denormal_enecg.py): pretrained weights
        # full of them would otherwise run up to 100x slower on many x86 CPUs, for the same values.
        with flush_denormals():
            inputs = self.prepare_inputs(input_values.float()).to(dtype)
            if self.autocast_dtype is None:
                return self.embed(inputs)
            with torch.autocast(inputs.device.type, dtype=self.autocast_dtype):
                return self.embed(inputs).float()

    # ------------------------------------------------------------------------------------------------ weights
    @property
    def has_weights(self) -> bool:
        return any(True for _ in self.parameters()) or any(True for _ in self.buffers())

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write the expert's weights as `model.safetensors` + `expert_config.json`, loadable by `load_pretrained`."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(folder / EXPERT_WEIGHTS_FILE), metadata={"format": "pt", "expert_type": self.expert_type})
        meta = {"type": self.expert_type, "settings": self.settings}
        (folder / EXPERT_CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
        return folder

    def load_pretrained(self, source: str) -> None:
        """Load backbone weights from a local folder or a Hub repo holding `model.safetensors` (our format).

        Every missing or unexpected key is an error: a partial load would silently leave random weights behind.
        """
        from safetensors.torch import load_file

        folder = resolve_source(source, self.name, allow_patterns=[EXPERT_WEIGHTS_FILE, EXPERT_CONFIG_FILE])
        weights = folder / EXPERT_WEIGHTS_FILE
        if not weights.is_file():
            hint = (f" Convert the upstream checkpoint with `python -m enecg_hf.tools.convert {self.expert_type} SOURCE "
                    "DEST` first." if self.CONVERTER else f" Write one with `{type(self).__name__}.save_pretrained`.")
            raise FileNotFoundError(f"Expert {self.name!r}: no {EXPERT_WEIGHTS_FILE} in {folder}.{hint}")
        config_file = folder / EXPERT_CONFIG_FILE
        if config_file.is_file():
            saved = json.loads(config_file.read_text())
            if saved.get("type") not in (None, self.expert_type):
                raise ValueError(f"Expert {self.name!r} is {self.expert_type!r} but {folder} holds a {saved['type']!r}")
            mismatched = {
                k: (v, self.settings.get(k)) for k, v in saved.get("settings", {}).items() if self.settings.get(k) != v
            }
            if mismatched:
                raise ValueError(
                    f"Expert {self.name!r}: settings differ from the checkpoint in {folder}: "
                    + ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in sorted(mismatched.items()))
                )
        load_state_dict_strict(self, load_file(str(weights)), f"expert {self.name!r} from {source}")


def check_record_seconds(expert_config: EnECGExpertConfig, config: EnECGConfig, record_seconds: float,
                         setting: str = "record_seconds", purpose: str = "to measure time in seconds") -> None:
    """An expert that works in seconds reads its sampling rate as `input_length / record_seconds`: `record_seconds`
    (its setting `setting`) must be the record's length in the model, else a `ValueError` naming the field."""
    expected = config.input_length / config.sampling_rate
    if abs(float(record_seconds) - expected) > 1e-6:
        raise ValueError(
            f"EnECGConfig.experts: expert {expert_config.name!r} ({expert_config.type}): settings.{setting} must be "
            f"{expected:g} (input_length / sampling_rate) {purpose}"
        )


def resolve_package_path(source: str, expert_name: str, requirement: str | None = None) -> Path:
    """The file or folder that `package:<package>/<path inside it>` names in an installed Python package.

    Found with `importlib.util.find_spec`, which locates the package without importing it. A missing package is an
    `ImportError` naming the pip command (`requirement`, e.g. `"openecg==0.11.0"`, else the package name).
    """
    spec_text = str(source)[len(PACKAGE_SOURCE_PREFIX):]
    package, _, relative = spec_text.partition("/")
    parts = Path(relative).parts
    if not package.isidentifier() or not parts or ".." in parts or Path(relative).is_absolute():
        raise ValueError(
            f"Expert {expert_name!r}: pretrained source {source!r} is not of the form "
            f"'{PACKAGE_SOURCE_PREFIX}<package>/<path inside the package>', e.g. "
            f"'{PACKAGE_SOURCE_PREFIX}openecg/models/codec_v6.pt'"
        )
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"Expert {expert_name!r}: pretrained source {source!r} is a file of the Python package {package!r}, which "
            f"is not installed. Install it with: pip install {requirement or package} (or pip install "
            "'enecg_hf[pretrained]'). A model folder that uses this expert needs the package wherever it is loaded, "
            "also with trust_remote_code=True."
        )
    for location in spec.submodule_search_locations:
        path = Path(location, relative)
        if path.exists():
            return path
    version = _installed_version(package)
    raise FileNotFoundError(
        f"Expert {expert_name!r}: the installed {package} {version} has no {relative} "
        f"(looked in {', '.join(spec.submodule_search_locations)})"
        + (f"; this expert expects {requirement}: pip install {requirement}" if requirement else "")
    )


def _installed_version(package: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "(version unknown)"


def resolve_source(source: str, expert_name: str, allow_patterns: list[str] | None = None) -> Path:
    """A local folder as is, a folder inside an installed package (`package:...`), or a Hub repo id downloaded with
    `huggingface_hub.snapshot_download`."""
    if str(source).startswith(PACKAGE_SOURCE_PREFIX):
        path = resolve_package_path(source, expert_name)
        if not path.is_dir():
            raise ValueError(f"Expert {expert_name!r}: pretrained source {source} is a file; this expert reads a folder")
        return path
    path = Path(os.path.expanduser(str(source)))
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"Expert {expert_name!r}: pretrained source {source} is a file; give its folder")
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=str(source), allow_patterns=allow_patterns))
    except Exception as err:  # offline, unknown repo, gated, ... all end the same way for the user
        raise OSError(
            f"Expert {expert_name!r}: cannot load pretrained weights from {source!r}: it is not a local folder and "
            f"the Hugging Face Hub could not provide it ({type(err).__name__}: {err}). Download the weights where the "
            "Hub is reachable and point `pretrained` at the local folder, or set `pretrained: null` for random weights."
        ) from err


def resolve_checkpoint(source: str, expert_name: str, requirement: str | None = None,
                       allow_patterns: list[str] | None = None) -> Path:
    """Where an expert that also reads its upstream checkpoint file finds its weights: a file or folder inside an
    installed package (`package:...`), a local file or folder, or a Hub repo (a folder, via `resolve_source`)."""
    if str(source).startswith(PACKAGE_SOURCE_PREFIX):
        return resolve_package_path(source, expert_name, requirement)
    path = Path(os.path.expanduser(str(source)))
    if path.is_file():
        return path
    return resolve_source(source, expert_name, allow_patterns=allow_patterns)


def load_weights_only(path: str | os.PathLike, what: str) -> Any:
    """`torch.load(path, weights_only=True)` on the CPU: tensors and plain containers only, no code in the file runs."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError, or a RuntimeError wrapping it
        raise ValueError(
            f"Cannot read {what} from {path} with torch.load(weights_only=True) ({type(err).__name__}: {err}). Only "
            "tensors and plain containers are accepted, so that no code in the file can run."
        ) from err


def state_dict_mismatch(what: str, missing: list[str], unexpected: list[str], mis_shaped: list[str]) -> str | None:
    """The message of a strict load that failed, listing every missing, unexpected and mis-shaped key (None if
    nothing is wrong). One reporter for loading weights and for converting upstream checkpoints."""
    if not (missing or unexpected or mis_shaped):
        return None
    lines = [f"Cannot load {what}:"]
    if missing:
        lines.append(f"  missing keys ({len(missing)}): {', '.join(missing)}")
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
    if mis_shaped:
        lines.append(f"  shape mismatches ({len(mis_shaped)}): {'; '.join(mis_shaped)}")
    return "\n".join(lines)


def load_state_dict_strict(module: nn.Module, state_dict: dict[str, torch.Tensor], what: str) -> None:
    """`load_state_dict(strict=True)` with a message that lists every missing, unexpected and mis-shaped key."""
    expected = module.state_dict()
    mis_shaped = sorted(
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(state_dict)
        if state_dict[k].shape != expected[k].shape
    )
    message = state_dict_mismatch(what, sorted(set(expected) - set(state_dict)), sorted(set(state_dict) - set(expected)),
                                  mis_shaped)
    if message:
        raise ValueError(message)
    module.load_state_dict(state_dict, strict=True)


__all__ = [
    "EnECGExpert", "check_record_seconds", "resolve_source", "resolve_package_path", "resolve_checkpoint",
    "load_weights_only", "load_state_dict_strict", "state_dict_mismatch", "PACKAGE_SOURCE_PREFIX",
]
