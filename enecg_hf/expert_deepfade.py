"""DeepFADE expert (`ecgdatakit`, Apache-2.0): the encoder of DeepFADE, a DenseNet encoder-decoder ECG denoiser whose
weights ship inside the ecgdatakit wheel. Each lead is encoded on its own into an 8-channel latent sequence.

The encoder is `ecgdatakit.processing.nn.deepfade.DenseEncoder`, built with the arguments `DeepFADE(**DEFAULT_ARGS)`
gives it; the decoder (signal and baseline heads) is not needed for an embedding and is not built.

    {"name": "deepfade", "type": "deepfade", "input_length": 5000, "leads": [all 12],
     "pretrained": "package:ecgdatakit/processing/nn/weights/deepfade_exp_1_ddp.pt", "settings": {"preset": "deepfade"}}
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch
from torch import nn
from torch.nn import functional as F

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


logger = logging.getLogger(__name__)

ECGDATAKIT_REQUIREMENT = "ecgdatakit==2.0.3"
POOLINGS = ("mean_std", "mean")


def _import_deepfade():
    """The library's encoder class and checkpoint key mapping, or an ImportError with the pip command."""
    try:
        from ecgdatakit.processing.denoise import _remap_state_dict_key
        from ecgdatakit.processing.nn.deepfade import DenseEncoder
    except ImportError as err:
        raise ImportError(
            f"The deepfade expert needs the `ecgdatakit` package, which ships the network and its weights: pip install "
            f"{ECGDATAKIT_REQUIREMENT}, or pip install 'enecg_hf[pretrained]'. A model folder that uses this expert "
            f"needs it wherever it is loaded, also with trust_remote_code=True. ({type(err).__name__}: {err})"
        ) from err
    # `_remap_state_dict_key` is how ecgdatakit's own loader maps the DDP-era key names of its file onto the current
    # module names (private, hence the exact version pin).
    return DenseEncoder, _remap_state_dict_key

# A channel whose weights are all zero outputs the constant activation(bias); it is dropped as zero when that constant
# is at most this large (the checkpoint's are at most 7e-10, against activations of order 1: see the plan's docstring).
ZERO_CHANNEL_TOLERANCE = 1e-6


@dataclass
class EnECGDeepFadeStep:
    """One convolution of the compiled encoder: batch norm folded in, only the channels that carry signal.

    `sources` index the outputs it reads, concatenated along channels (0 is the encoder's input, k the output of step
    k - 1); a source that kept no channel is skipped."""

    weight: torch.Tensor  # (out channels, in channels, kernel)
    bias: torch.Tensor  # (out channels,)
    stride: int
    padding: int
    activation: nn.Module
    sources: tuple[int, ...]


class EnECGDeepFadeInferencePlan:
    """DeepFADE's encoder compiled for the frozen pass: the same latent to float32 rounding, 5-7x faster on a CPU.

    Training drove most of the released network towards zero: 76 % of its weights are subnormal floats (below
    1.2e-38), and of the 5,745 channels its convolutions compute, 3,334 are zero for every input - all their weights
    are, and their constant output (activation of the folded bias) is at most 7e-10 - and 0 more are read by no later
    layer with a non-zero weight. Computing them costs the full price (and, in microcode, far more on CPUs that do not
    flush subnormals to zero); this plan computes the rest:

    - batch norm (running statistics: the expert is always in eval mode) is folded into the convolution before it;
    - subnormal weights and biases become 0 (what flush-to-zero hardware does with them);
    - a channel is dropped when it is zero (all-zero weights on the channels that reach it, |activation(bias)| <=
      `ZERO_CHANNEL_TOLERANCE`) or when no kept channel reads it with a non-zero weight; the latent's 8 channels are
      always kept.

    The plan is derived from the encoder's weights, which stay the checkpoint's: the state dict, saving and the
    feature store's fingerprint are those of the library's module. `EnECGDeepFadeExpert` rebuilds the plan when the
    weights change. Encoders of another shape than DeepFADE's (bottleneck layers, pooling other than strided
    convolutions) raise `NotImplementedError` and run the library's module.
    """

    def __init__(self, encoder: nn.Module, zero_tolerance: float = ZERO_CHANNEL_TOLERANCE):
        blocks = _trace_encoder(encoder)
        with torch.no_grad():
            fused = [_fold_batch_norm(block) for block, _ in blocks]
        sources = [s for _, s in blocks]
        widths = [1] + [w.shape[0] for w, _, _ in fused]  # channels of every output; 0 is the input
        # Forward: which channels are zero whatever the input.
        zero = [torch.zeros(1, dtype=torch.bool)]
        for (weight, bias, activation), reads in zip(fused, sources):
            live_inputs = ~torch.cat([zero[s] for s in reads])
            silent = (weight[:, live_inputs] == 0).flatten(1).all(dim=1)
            constant = activation(bias)
            zero.append(silent & (constant.abs() <= zero_tolerance))
        # Backward: which channels some kept channel reads with a non-zero weight.
        needed = [torch.zeros(width, dtype=torch.bool) for width in widths]
        needed[-1][:] = True
        for step in range(len(fused) - 1, -1, -1):
            weight = fused[step][0]
            rows = needed[step + 1] & ~zero[step + 1] if step < len(fused) - 1 else needed[step + 1]
            reads = (weight[rows] != 0).any(-1) if rows.any() else None  # (kept rows, input channels)
            offset = 0
            for s in sources[step]:
                if reads is not None:
                    needed[s] |= reads[:, offset : offset + widths[s]].any(0) & ~zero[s]
                offset += widths[s]
        needed[0][:] = True
        kept = [needed[0]] + [needed[k] & ~zero[k] for k in range(1, len(widths) - 1)] + [needed[-1]]
        self.steps: list[EnECGDeepFadeStep] = []
        for step, ((weight, bias, activation), reads) in enumerate(zip(fused, sources)):
            columns = torch.cat([kept[s] for s in reads])
            rows = kept[step + 1]
            conv = blocks[step][0]._layers[0]
            self.steps.append(EnECGDeepFadeStep(
                weight[rows][:, columns].contiguous(), bias[rows].contiguous(), conv.stride[0], conv.padding[0],
                activation, tuple(s for s in reads if kept[s].any()),
            ))
        self.kept_channels = int(sum(k.sum() for k in kept[1:]))
        self.total_channels = int(sum(widths[1:]))
        if not all(step.weight.shape[1] for step in self.steps if step.weight.shape[0]):
            raise NotImplementedError("a kept channel reads no input channel")
        # The last step that reads each output: an output is let go after it (memory).
        self._last_reader = {s: k for k, step in enumerate(self.steps) for s in step.sources}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, 1, T) z-scored leads -> latent (batch, 8, ceil(T / 40)), as `DenseEncoder.forward`."""
        outputs: dict[int, torch.Tensor] = {0: x}
        for k, step in enumerate(self.steps):
            if not step.weight.shape[0]:
                continue
            inputs = [outputs[s] for s in step.sources]
            h = inputs[0] if len(inputs) == 1 else torch.cat(inputs, dim=1)
            outputs[k + 1] = step.activation(F.conv1d(h, step.weight, step.bias, step.stride, step.padding))
            for s in step.sources:
                if self._last_reader[s] == k:
                    del outputs[s]
        return outputs[len(self.steps)]


def _trace_encoder(encoder: nn.Module) -> list[tuple[nn.Module, tuple[int, ...]]]:
    """DeepFADE's `DenseEncoder` as its convolution blocks in execution order, each with the outputs it reads
    (concatenated: a dense layer reads its block's input and every earlier layer of the block)."""
    from ecgdatakit.processing.nn.dense_net import DenseBlock, TransitionBlock

    blocks: list[tuple[nn.Module, tuple[int, ...]]] = []

    def add(block: nn.Module, reads: tuple[int, ...]) -> tuple[int, ...]:
        layers = getattr(block, "_layers", None)
        if (getattr(block, "bottleneck", True) or not isinstance(layers, nn.Sequential) or len(layers) < 3
                or not isinstance(layers[0], nn.Conv1d) or not isinstance(layers[1], nn.BatchNorm1d)
                or layers[0].dilation != (1,) or layers[0].groups != 1):
            raise NotImplementedError(f"{type(block).__name__} is not conv -> batch norm -> activation")
        blocks.append((block, reads))
        return (len(blocks),)

    current = add(encoder._trunk._initial_layer, (0,))
    for block in encoder._trunk._blocks:
        if isinstance(block, DenseBlock):
            features = current
            for layer in block._layer_list:
                features = features + add(layer, features)
            current = features
        elif isinstance(block, TransitionBlock) and block.pool_type == "convolution":
            if block.enable_compression_block:
                current = add(block.compression_block, current)
            current = add(block.pooling_layer, current)
        else:
            raise NotImplementedError(f"transition {getattr(block, 'pool_type', type(block).__name__)!r}")
    add(encoder._latent_conv, current)
    return blocks


def _fold_batch_norm(block: nn.Module) -> tuple[torch.Tensor, torch.Tensor, nn.Module]:
    """A conv -> batch norm -> activation block as (weight, bias, activation) of one convolution, with subnormal
    values set to 0. Dropout after the activation is the identity in eval mode."""
    conv, norm, activation = block._layers[0], block._layers[1], block._layers[2]
    scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
    weight = conv.weight * scale[:, None, None]
    bias = (conv.bias - norm.running_mean) * scale + norm.bias
    smallest_normal = torch.finfo(weight.dtype).tiny
    return (weight.masked_fill(weight.abs() < smallest_normal, 0.0).detach(),
            bias.masked_fill(bias.abs() < smallest_normal, 0.0).detach(), activation)


class EnECGDeepFadeExpert(EnECGExpert):
    """DeepFADE's encoder as a frozen EnECG expert.

    Input (batch, leads, input_length) at 500 Hz (the network was trained on 10 s windows: `input_length` 5000). Each
    lead is z-scored on its own (mean 0, population std 1; a flat lead becomes zeros), as ecgdatakit's
    `denoise_deepfade` does before the network; a per-lead z-score does not change under the model's record or lead
    z-score in front of the expert. The encoder maps each lead to a latent of 8 channels x input_length / 40 steps
    ((8, 125) for 5000 samples).

    Output: per lead, each latent channel's mean over time (`pooling="mean"`), or its mean then its standard
    deviation over time (`"mean_std"`, the presets), concatenated over leads: (batch, leads * 8 * 2) for
    `"mean_std"`. Time pooling makes the embedding independent of where the beats fall in the window.
    `"beat_pooling": {"mode": "beside"}` (or `"only"`) adds (or uses only) the latent pooled over windows aligned to
    the R peaks, the median over beats of every latent channel at each point of the window (`EnECGBeatPooling`).
    """

    expert_type = "deepfade"
    KEEP_IN_FP32 = True  # the library's network reads float32 z-scores
    COMPUTATION_VERSION = 2  # 2: the compiled inference plan (same values to float32 rounding as the library module)
    DEFAULT_PRESET = "deepfade"
    WEIGHTS_LICENSE = "Apache-2.0"
    WEIGHTS_TRAINING_DATA = "a large private multi-source ECG database with noise augmentation (ecgdatakit)"
    PRESETS = {
        # `DeepFADE.DEFAULT_ARGS` of ecgdatakit 2.0.3, encoder part (8.6 M parameters), plus our pooling and batching.
        "deepfade": {
            "layers": 8, "kernels": 3, "growth_rate": 12, "compression": 1.0, "bottleneck": False,
            "dropout_rate": 0.2, "pool_steps": [2, 2, 2, 5], "pool_type": "convolution",
            "activation": {"name": "elu", "args": {"alpha": 0.1}}, "pooling": "mean_std", "chunk_size": 4,
            "beat_pooling": None,
        },
        "tiny": {
            "layers": 1, "kernels": 3, "growth_rate": 4, "compression": 1.0, "bottleneck": False,
            "dropout_rate": 0.2, "pool_steps": [2, 2, 2, 5], "pool_type": "convolution",
            "activation": {"name": "elu", "args": {"alpha": 0.1}}, "pooling": "mean_std", "chunk_size": 4,
            "beat_pooling": None,
        },
    }

    @classmethod
    def validate_config(cls, expert_config: EnECGExpertConfig, config: EnECGConfig) -> None:
        super().validate_config(expert_config, config)
        validate_beat_pooling(expert_config, config)

    def __init__(self, config: EnECGExpertConfig, lead_names: Sequence[str]):
        super().__init__(config, lead_names)
        encoder_class, self._remap_key = _import_deepfade()
        s = self.settings
        if s["pooling"] not in POOLINGS:
            raise ValueError(f"Expert {config.name!r}: pooling must be one of {POOLINGS}, got {s['pooling']!r}")
        if not isinstance(s["chunk_size"], int) or s["chunk_size"] < 1:
            raise ValueError(f"Expert {config.name!r}: chunk_size must be a positive integer, got {s['chunk_size']!r}")
        self.downsampling = math.prod(s["pool_steps"])
        if config.input_length < self.downsampling:
            raise ValueError(
                f"Expert {config.name!r}: DeepFADE input_length ({config.input_length}) must be at least its "
                f"downsampling factor ({self.downsampling}); the network reads 10 s at 500 Hz: use 5000"
            )
        self.encoder = encoder_class(
            input_channels=1, layers=s["layers"], kernels=s["kernels"], growth_rate=s["growth_rate"],
            dropout_rate=s["dropout_rate"], bottleneck=s["bottleneck"], compression=s["compression"],
            activation=s["activation"], pool_steps=list(s["pool_steps"]), pool_type=s["pool_type"],
        )
        self.latent_channels = self.encoder.get_output_channels()
        # (weights key, EnECGDeepFadeInferencePlan or None): not a submodule, so neither saved nor moved by `.to()`.
        self._plan: tuple | None = None
        self.use_inference_plan = True  # False runs the library's module (benchmarks compare the two)
        self._plan_lock = threading.Lock()
        self.beat_pooling = (None if s["beat_pooling"] is None else
                             EnECGBeatPooling(s["beat_pooling"], config.name, config.leads, config.input_length))
        self.embedding_dim = len(self.feature_names)

    @property
    def feature_names(self) -> list[str]:
        """Names of the embedding's columns, e.g. `II.latent0_mean`, ..., `II.latent7_std`."""
        stats = ("mean", "std") if self.settings["pooling"] == "mean_std" else ("mean",)
        names = [] if self.beat_pooling is None else self.beat_pooling.feature_names(
            [f"latent{c}" for c in range(self.latent_channels)])
        if self.beat_pooling is not None and self.beat_pooling.settings["mode"] == "only":
            return names
        return [
            f"{lead}.latent{c}_{stat}" for lead in self.expert_config.leads for stat in stats
            for c in range(self.latent_channels)
        ] + names

    @staticmethod
    def standardize(inputs: torch.Tensor) -> torch.Tensor:
        """Z-score the last axis as ecgdatakit does (in float64, population std; a flat signal becomes zeros);
        returns float32."""
        x = inputs.double()
        mean = x.mean(dim=-1, keepdim=True)
        std = x.std(dim=-1, keepdim=True, unbiased=False)
        flat = std == 0
        return ((x - mean) / torch.where(flat, torch.ones_like(std), std)).masked_fill(flat, 0.0).float()

    def latent(self, inputs: torch.Tensor) -> torch.Tensor:
        """(batch, leads, T) -> the encoder's latent for every lead, (batch, leads, 8, ceil(T / 40)).

        Leads go through the encoder `chunk_size` at a time (memory); batch norm runs on its running statistics (the
        expert is always in eval mode), so a record's latent does not depend on the rest of the batch."""
        batch, leads, length = inputs.shape
        z = self.standardize(inputs.reshape(batch * leads, 1, length))
        chunk = self.settings["chunk_size"]
        plan = self.inference_plan() if self.use_inference_plan and not self.encoder.training else None
        encode = plan or self.encoder
        latent = torch.cat([encode(z[i : i + chunk]) for i in range(0, len(z), chunk)])
        return latent.reshape(batch, leads, *latent.shape[1:])

    def inference_plan(self) -> EnECGDeepFadeInferencePlan | None:
        """The compiled encoder of the current weights (built on first use and again whenever a weight changes), or
        None for an encoder the plan does not cover (the library's module then runs)."""
        tensors = [*self.encoder.parameters(), *self.encoder.buffers()]
        key = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)
        cached = self._plan
        if cached is not None and cached[0] == key:
            return cached[1]
        with self._plan_lock:  # concurrent first calls build it once
            if self._plan is None or self._plan[0] != key:
                try:
                    plan = EnECGDeepFadeInferencePlan(self.encoder)
                except NotImplementedError as reason:
                    logger.info("Expert %r: the library's DeepFADE module runs (no compiled plan: %s)", self.name,
                                reason)
                    plan = None
                else:
                    logger.debug("Expert %r: compiled DeepFADE plan keeps %d of %d channels", self.name,
                                 plan.kept_channels, plan.total_channels)
                self._plan = (key, plan)
            return self._plan[1]

    def embed(self, inputs: torch.Tensor) -> torch.Tensor:
        """(batch, leads, input_length) -> (batch, embedding_dim): pooled latents, lead after lead."""
        latent = self.latent(inputs)
        pooled = []
        if self.beat_pooling is None or self.beat_pooling.settings["mode"] == "beside":
            stats = [latent.mean(-1)]
            if self.settings["pooling"] == "mean_std":
                stats.append(latent.std(-1, unbiased=False))
            pooled.append(torch.cat(stats, dim=-1).flatten(start_dim=1))
        if self.beat_pooling is not None:
            pooled.append(self.beat_pooling.pool(inputs, latent, self.downsampling))
        return torch.cat(pooled, dim=-1)

    # ------------------------------------------------------------------------------------------------ weights
    def load_pretrained(self, source: str) -> None:
        """Load ecgdatakit's own checkpoint (`package:ecgdatakit/processing/nn/weights/deepfade_exp_1_ddp.pt` or a
        local copy), or a folder in our format (`EnECGExpert.save_pretrained`)."""
        path = resolve_checkpoint(source, self.name, ECGDATAKIT_REQUIREMENT,
                                  allow_patterns=[EXPERT_WEIGHTS_FILE, EXPERT_CONFIG_FILE])
        if path.is_dir():
            return super().load_pretrained(str(path))
        self.load_deepfade_checkpoint(path, source)

    def load_deepfade_checkpoint(self, path: str | Path, source: str | None = None) -> None:
        """Load a DeepFADE state dict file, read weights-only. Its keys are mapped to module names as ecgdatakit's
        loader does; the decoder's keys are dropped (not built here) and every encoder key must match."""
        source = source or str(path)
        state = load_weights_only(path, f"the DeepFADE weights of expert {self.name!r}")
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"Expert {self.name!r}: {source} is not a DeepFADE state dict (a dict of tensors)")
        remapped = {self._remap_key(key): value for key, value in state.items()}
        if not any(key.startswith("_decoder.") for key in remapped):
            raise ValueError(
                f"Expert {self.name!r}: {source} has no `_decoder.` keys after ecgdatakit's key mapping: not a "
                "DeepFADE checkpoint"
            )
        encoder_state = {k[len("_encoder."):]: v for k, v in remapped.items() if k.startswith("_encoder.")}
        others = sorted(k for k in remapped if not k.startswith(("_encoder.", "_decoder.")))
        if others:
            raise ValueError(f"Expert {self.name!r}: unexpected keys in {source}: {', '.join(others)}")
        load_state_dict_strict(self.encoder, encoder_state, f"DeepFADE expert {self.name!r} from {source}")


__all__ = ["EnECGDeepFadeExpert", "ECGDATAKIT_REQUIREMENT"]
