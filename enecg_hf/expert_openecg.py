"""openecg expert (vitaldb `openecg`, Apache-2.0): the pretrained "layered codec", a single-lead conv-tokeniser
transformer with per-sample frame (P/QRS/T), beat and rhythm heads, whose weights ship inside the PyPI wheel.

The network is `openecg.stage2.model_variants.FrameClassifierTransformerSampleResConvTokMH1Ch` (arch
`vit_transformer_sample_res_convtok_mh_1ch`), built and run by `openecg` itself; this module only loads its checkpoint
weights-only, rank-normalises the input as `openecg.encode` does, and pools what the heads see into one embedding.

    {"name": "openecg", "type": "openecg", "input_length": 5000, "leads": ["II"],
     "pretrained": "package:openecg/models/codec_v6.pt", "settings": {"preset": "codec-v6"}}
"""

from __future__ import annotations

import threading
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Sequence

import numpy as np
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


OPENECG_REQUIREMENT = "openecg==0.11.0"
OPENECG_ARCH = "vit_transformer_sample_res_convtok_mh_1ch"
# Settings that fix the network's shapes; a checkpoint's `model_config` must agree on each one it states.
_ARCHITECTURE_KEYS = ("patch_size", "d_model", "n_heads", "n_layers", "mid_split", "lower_kernel", "ff", "n_classes",
                      "beat_n_classes", "rhythm_n_classes", "pos_type", "dropout")
_CHECKPOINT_METADATA_KEYS = {"arch", "n_leads", "use_lead_emb", "conv_stem", "n_reg", "aux_target", "n_input_channels",
                             "use_aux", "use_reg", "sample_res_frame", "tokenizer"}


def _import_openecg():
    """The library's network class, its rank-normalisation and class names, or an ImportError with the pip command."""
    try:
        from openecg.dsp import rank_normalize
        from openecg.eval import SUPER_NAMES, SUPER_PACED_QRS, SUPER_QRS
        from openecg.layered import BEAT_NAMES, RHYTHM_NAMES
        from openecg.stage2.model_variants import FrameClassifierTransformerSampleResConvTokMH1Ch
    except ImportError as err:
        raise ImportError(
            f"The openecg expert needs the `openecg` package, which ships the network and its weights: pip install "
            f"{OPENECG_REQUIREMENT}, or pip install 'enecg_hf[pretrained]'. A model folder that uses this "
            f"expert needs it wherever it is loaded, also with trust_remote_code=True. ({type(err).__name__}: {err})"
        ) from err
    return {
        "network": FrameClassifierTransformerSampleResConvTokMH1Ch, "rank_normalize": rank_normalize,
        "frame_names": SUPER_NAMES, "qrs_classes": (SUPER_QRS, SUPER_PACED_QRS), "beat_names": BEAT_NAMES,
        "rhythm_names": RHYTHM_NAMES,
    }


class EnECGOpenEcgOutputs(NamedTuple):
    """What the codec computes for each lead of each record (`T` = input_length samples).

    Attributes:
        hidden_states: (batch, leads, T, d_model) the sample-resolution features all three heads read.
        frame_logits: (batch, leads, T, n_classes) other / P / QRS / T.
        beat_logits: (batch, leads, T, beat_n_classes) none / sinus / vpc / paced / fusion / unknown.
        rhythm_logits: (batch, leads, T, rhythm_n_classes) sinus / avb / paced / afib / bbb / ventricular.
    """

    hidden_states: torch.Tensor
    frame_logits: torch.Tensor
    beat_logits: torch.Tensor
    rhythm_logits: torch.Tensor


class EnECGOpenEcgExpert(EnECGExpert):
    """The openecg layered codec as a frozen EnECG expert.

    Input (batch, leads, input_length): each lead is encoded on its own (the codec is single-lead, trained on lead II
    at 500 Hz over 10 s windows: `input_length` 5000 for 10 s records). Each lead is rank-normalised to [-1, 1] first,
    as `openecg.encode` does (`openecg.dsp.rank_normalize`); ranks do not change under a positive affine map, so the
    model's record or lead z-score in front of the expert leaves the result unchanged, and they carry no gradient
    (saliency maps get nothing from this expert).

    Output per lead, concatenated over leads (batch, leads * (d_model + n_classes + beat_n_classes +
    rhythm_n_classes)): the heads' shared input averaged over samples (d_model), the frame probabilities averaged over
    samples (the fraction of the record in P, QRS, T), the beat probabilities averaged over samples weighted by the
    probability that the sample is in a QRS (the beat head is only meaningful inside QRS complexes), and the rhythm
    probabilities averaged over samples. `feature_names` names the columns.
    `"beat_pooling": {"mode": "beside"}` (or `"only"`) adds (or uses only) the heads' input and the frame probabilities
    pooled over windows aligned to the R peaks, the median over beats at each point of the window
    (`EnECGBeatPooling`).
    """

    expert_type = "openecg"
    KEEP_IN_FP32 = True  # the library's network reads float32 ranks
    DIFFERENTIABLE = False
    NOT_DIFFERENTIABLE_REASON = ("reads rank-normalised samples (piecewise constant): no gradient flows from its "
                                 "embedding to the input")
    DEFAULT_PRESET = "codec-v6"
    WEIGHTS_LICENSE = "Apache-2.0"
    WEIGHTS_TRAINING_DATA = ("expert annotations only: LUDB, QTDB, ISP (waves), MIT-BIH DS1 and VitalDB arrhythmia "
                             "(beats), a Korean hospital rhythm set (openecg codec_v6 model card)")
    PRESETS = {
        # The `model_config` of codec_v1 ... codec_v6.pt in openecg 0.11.0 (1.16 M parameters).
        "codec-v6": {
            "patch_size": 10, "d_model": 128, "n_heads": 4, "n_layers": 8, "mid_split": 4, "lower_kernel": 7, "ff": 256,
            "n_classes": 4, "beat_n_classes": 6, "rhythm_n_classes": 6, "pos_type": "sinusoidal", "dropout": 0.1,
            "beat_pooling": None,
        },
        "tiny": {
            "patch_size": 10, "d_model": 16, "n_heads": 2, "n_layers": 2, "mid_split": 1, "lower_kernel": 7, "ff": 32,
            "n_classes": 4, "beat_n_classes": 6, "rhythm_n_classes": 6, "pos_type": "sinusoidal", "dropout": 0.1,
            "beat_pooling": None,
        },
    }

    @classmethod
    def validate_config(cls, expert_config: EnECGExpertConfig, config: EnECGConfig) -> None:
        super().validate_config(expert_config, config)
        validate_beat_pooling(expert_config, config)

    def __init__(self, config: EnECGExpertConfig, lead_names: Sequence[str]):
        super().__init__(config, lead_names)
        library = _import_openecg()
        self._rank_normalize = library["rank_normalize"]
        s = self.settings
        with warnings.catch_warnings():
            # torch warns that nested tensors are off for pre-LN transformer layers; the codec is pre-LN by design.
            warnings.filterwarnings("ignore", message="enable_nested_tensor is True")
            self.codec = library["network"](
                patch_size=s["patch_size"], d_model=s["d_model"], n_heads=s["n_heads"], n_layers=s["n_layers"],
                mid_split=s["mid_split"], lower_kernel=s["lower_kernel"], ff=s["ff"], n_classes=s["n_classes"],
                beat_n_classes=s["beat_n_classes"], rhythm_n_classes=s["rhythm_n_classes"], pos_type=s["pos_type"],
                dropout=s["dropout"], use_lead_emb=False, conv_stem=False,
            )
        # The heads' shared input is not among the library forward's outputs: a hook keeps it, per thread (a served
        # model may run several forwards at once).
        self._head_inputs: dict[int, torch.Tensor] = {}
        self.codec.head_sample.register_forward_pre_hook(self._keep_head_input)
        max_positions = self.codec.pos_enc.shape[1] if self.codec.pos_enc is not None else None
        length, patch = config.input_length, s["patch_size"]
        if length % patch or (max_positions is not None and length // patch > max_positions):
            longest = f" and at most {patch * max_positions} samples" if max_positions is not None else ""
            raise ValueError(
                f"Expert {config.name!r}: openecg input_length must be a multiple of its patch size ({patch}){longest}; "
                f"got {length}. The codec reads 10 s at 500 Hz: use 5000."
            )
        self.qrs_classes = [c for c in library["qrs_classes"] if c < s["n_classes"]]
        self.class_names = {
            "frame": [library["frame_names"].get(i, str(i)) for i in range(s["n_classes"])],
            "beat": [library["beat_names"].get(i, str(i)) for i in range(s["beat_n_classes"])],
            "rhythm": [library["rhythm_names"].get(i, str(i)) for i in range(s["rhythm_n_classes"])],
        }
        self.beat_pooling = (None if s["beat_pooling"] is None else
                             EnECGBeatPooling(s["beat_pooling"], config.name, config.leads, config.input_length))
        self.embedding_dim = len(self.feature_names)

    @property
    def feature_names(self) -> list[str]:
        """Names of the embedding's columns, e.g. `II.hidden_0`, ..., `II.frame_QRS`, `II.beat_vpc`, `II.rhythm_afib`."""
        per_lead = [f"hidden_{i}" for i in range(self.settings["d_model"])]
        for head in ("frame", "beat", "rhythm"):
            per_lead += [f"{head}_{name}" for name in self.class_names[head]]
        names = [] if self.beat_pooling is None else self.beat_pooling.feature_names(
            per_lead[: self.settings["d_model"] + self.settings["n_classes"]])  # hidden and frame channels
        if self.beat_pooling is not None and self.beat_pooling.settings["mode"] == "only":
            return names
        return [f"{lead}.{name}" for lead in self.expert_config.leads for name in per_lead] + names

    def rank_normalize(self, inputs: torch.Tensor) -> torch.Tensor:
        """(batch, leads, T) -> (batch * leads, T) float32 ranks in [-1, 1], ties averaged: openecg's own
        `rank_normalize` on each lead, as `openecg.encode` applies it. Not differentiable (ranks are piecewise
        constant)."""
        rows = inputs.detach().to("cpu", torch.float32).reshape(-1, inputs.shape[-1]).numpy()
        ranks = np.stack([self._rank_normalize(row) for row in rows]).astype(np.float32, copy=False)
        return torch.from_numpy(ranks).to(inputs.device)

    def _keep_head_input(self, _module, args) -> None:
        self._head_inputs[threading.get_ident()] = args[0]

    def codec_outputs(self, inputs: torch.Tensor) -> EnECGOpenEcgOutputs:
        """(batch, leads, T) -> the codec's per-sample features and logits for every lead (see
        [`EnECGOpenEcgOutputs`]). The library's forward runs unchanged."""
        batch, leads, length = inputs.shape
        ranks = self.rank_normalize(inputs)
        # The lead id only feeds a lead embedding, which this codec does not have.
        frame, beat, rhythm = self.codec(ranks, torch.zeros(len(ranks), dtype=torch.long, device=ranks.device))
        hidden = self._head_inputs.pop(threading.get_ident())
        return EnECGOpenEcgOutputs(*(t.reshape(batch, leads, length, t.shape[-1]) for t in (hidden, frame, beat, rhythm)))

    def embed(self, inputs: torch.Tensor) -> torch.Tensor:
        """(batch, leads, input_length) -> (batch, embedding_dim); see the class docstring for the columns."""
        out = self.codec_outputs(inputs)
        frame = out.frame_logits.softmax(-1)
        beat = out.beat_logits.softmax(-1)
        qrs = frame[..., self.qrs_classes].sum(-1, keepdim=True)  # (batch, leads, T, 1)
        beat_in_qrs = (qrs * beat).sum(2) / qrs.sum(2).clamp_min(1e-6)
        pooled = []
        if self.beat_pooling is None or self.beat_pooling.settings["mode"] == "beside":
            pooled.append(torch.cat(
                [out.hidden_states.mean(2), frame.mean(2), beat_in_qrs, out.rhythm_logits.softmax(-1).mean(2)], dim=-1
            ).flatten(start_dim=1))
        if self.beat_pooling is not None:  # per-sample channels (batch, leads, channels, T), one step per sample
            sequence = torch.cat([out.hidden_states, frame], dim=-1).transpose(2, 3)
            pooled.append(self.beat_pooling.pool(inputs, sequence, 1.0))
        return torch.cat(pooled, dim=-1)

    # ------------------------------------------------------------------------------------------------ weights
    def load_pretrained(self, source: str) -> None:
        """Load `openecg`'s own checkpoint (`package:openecg/models/codec_v6.pt`, or a local copy of such a `.pt`
        file), or a folder in our format (`EnECGExpert.save_pretrained`)."""
        path = resolve_checkpoint(source, self.name, OPENECG_REQUIREMENT,
                                  allow_patterns=[EXPERT_WEIGHTS_FILE, EXPERT_CONFIG_FILE])
        if path.is_dir():
            return super().load_pretrained(str(path))
        self.load_codec_checkpoint(path, source)

    def load_codec_checkpoint(self, path: str | Path, source: str | None = None) -> None:
        """Load a `codec_v*.pt` file: a dict with `model_state` (state dict) and `model_config` (architecture), read
        weights-only. Its architecture must be the one of the expert's settings, and every key must match."""
        source = source or str(path)
        blob = load_weights_only(path, f"the openecg codec of expert {self.name!r}")
        if not isinstance(blob, dict) or not {"model_state", "model_config"} <= set(blob):
            raise ValueError(
                f"Expert {self.name!r}: {source} is not an openecg codec checkpoint (a dict with `model_state` and "
                f"`model_config`), got {type(blob).__name__}" + (f" with keys {sorted(blob)}" if isinstance(blob, dict) else "")
            )
        saved = dict(blob["model_config"])
        if saved.get("arch") != OPENECG_ARCH or saved.get("use_lead_emb") or saved.get("conv_stem"):
            raise ValueError(
                f"Expert {self.name!r}: {source} holds an openecg network of arch {saved.get('arch')!r} "
                f"(use_lead_emb={saved.get('use_lead_emb')}, conv_stem={saved.get('conv_stem')}); this expert runs "
                f"{OPENECG_ARCH!r} without lead embedding or conv stem (the codec_v*.pt files)"
            )
        unknown = set(saved) - set(_ARCHITECTURE_KEYS) - _CHECKPOINT_METADATA_KEYS
        mismatched = {k: (saved[k], self.settings[k]) for k in _ARCHITECTURE_KEYS if k in saved and saved[k] != self.settings[k]}
        if unknown or mismatched:
            raise ValueError(
                f"Expert {self.name!r}: the architecture in {source} differs from the expert's settings: "
                + ", ".join([f"{k}: checkpoint {a!r} vs settings {b!r}" for k, (a, b) in sorted(mismatched.items())]
                            + [f"unknown checkpoint setting {k}={saved[k]!r}" for k in sorted(unknown)])
                + ". Use the preset matching the file (codec-v6 for openecg's codec_v*.pt)."
            )
        load_state_dict_strict(self.codec, blob["model_state"], f"openecg expert {self.name!r} from {source}")


__all__ = ["EnECGOpenEcgExpert", "EnECGOpenEcgOutputs", "OPENECG_REQUIREMENT"]
