"""EnECG: a gated mixture of frozen ECG / time-series foundation-model experts with small adapted heads.

Data flow for a batch of records `input_values` (batch, leads, samples):

    normalise ─┬─> expert_1 (frozen) ─> embedding_1 ─> head_1 ─┐
               ├─> ...                                          ├─> gate-weighted sum ─> logits
               ├─> expert_E (frozen) ─> embedding_E ─> head_E ─┘
               └─> gate leads ─> gate MLP ─> softmax weights (batch, E)

Every model is a list of tasks (`config.tasks`; a single-task model has one): the experts run once, and every task
has its own heads and gate ([`EnECGTaskEnsemble`], under `model.tasks[name]`). Folders saved before, whose one task's
heads and gate were `heads.*` and `gate.*`, load into `tasks.<name>.*` (`single_task_key_mapping`).
"""

from __future__ import annotations

import copy
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from torch.nn import functional as F
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_enecg import EnECGConfig, EnECGTaskConfig, declared_fields
from .expert_registry import build_expert
from .denormal_enecg import flush_denormals
from .precision_enecg import expert_precision, fp32_expert, fp32_experts_in_place, set_expert_precision
from .signal_enecg import normalize_ecg, resample_fourier
from .shipped_models import resolve_model


logger = logging.getLogger(__name__)

ADAPTER_FOLDER = "adapter"
# The name of the LoRA adapter `EnECGModel._inject_lora` adds (PEFT's default).
LORA_ADAPTER = "default"
# Folders saved before adapters were kept un-merged held the pre-adaptation head and gate weights here.
LEGACY_ADAPTER_BASE_WEIGHTS = "head_base_weights.safetensors"


@dataclass
class EnECGModelOutput(ModelOutput):
    """
    Output of [`EnECGModel`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*): returned when `labels` are given; Huber or MSE,
            cross-entropy or BCE according to the task's `problem_type` (several tasks: the sum of each task's loss
            times its `loss_weight`).
        logits (`torch.FloatTensor` of shape `(batch, num_labels)`): the gate-weighted sum of the experts' outputs
            (regression values in the label's unit; classification logits).
        expert_logits (`torch.FloatTensor` of shape `(batch, num_experts, num_labels)`): each expert head's own output.
        gate_weights (`torch.FloatTensor` of shape `(batch, num_experts)`): softmax weights of the gate (rows sum to 1).
        hidden_states (`tuple` of `torch.FloatTensor` of shape `(batch, embedding_dim_e)`, *optional*): returned with
            `output_hidden_states=True`: every expert's embedding (what its head reads), in expert order.
        task_losses (`dict[str, torch.FloatTensor]`, *optional*): a model with several tasks: the loss of each task
            that had labels in the batch (`loss` is their sum weighted by each task's `loss_weight`).

    A model with one task (a single-task model) returns its task's tensors, as above. A model with several tasks
    returns `logits`, `expert_logits` and `gate_weights` as dicts keyed by task name, each value shaped as above with
    that task's `num_labels` ([`EnECGModel.forward_tasks`] gives every model's outputs that way).

    Outputs are float32 whatever the model's dtype (heads and gate may run in bfloat16; label units need the
    precision: bfloat16 resolves 800 ms to 4 ms).
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    expert_logits: torch.FloatTensor | None = None
    gate_weights: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    task_losses: dict[str, torch.FloatTensor] | None = None


@dataclass
class EnECGFeatures(ModelOutput):
    """What the frozen part of the model computes from a record: enough to run heads and gate without the experts.

    Args:
        expert_embeddings (`tuple` of `torch.FloatTensor` of shape `(batch, embedding_dim_e)`): one per expert.
        gate_inputs (`torch.FloatTensor` of shape `(batch, gate_leads * gate_input_length)`).
    """

    expert_embeddings: tuple[torch.FloatTensor, ...] | None = None
    gate_inputs: torch.FloatTensor | None = None


# ---------------------------------------------------------------------------------------------------- the frozen pass
# What the frozen pass reads of the config, declared next to the code that reads it (which reads the config only
# through `declared_fields` of these): the feature store's fingerprint of a column hashes exactly its declared fields,
# its expert's entry and weights, and the computation version, so a field read but not declared would serve values
# computed under another config. Experts declare theirs themselves (`EnECGExpert.MODEL_CONFIG_FIELDS`).
# Every column: the record as the model takes it (`lead_names` rows of `input_length` samples at `sampling_rate`),
# normalised as `normalization` says.
RECORD_FIELDS = ("lead_names", "input_length", "sampling_rate", "normalization")
# The gate input: the gate leads, by their index in `lead_names`, resampled to `gate_input_length` samples.
GATE_INPUT_FIELDS = ("lead_names", "gate_leads", "gate_input_length")
# Raised when the gate input is computed differently from the same record and fields (as an expert's).
GATE_INPUT_COMPUTATION_VERSION = 1
GATE_INPUTS_COLUMN = "gate_inputs"


def embedding_column(expert_name: str) -> str:
    """The column of the frozen pass that holds expert `expert_name`'s embedding."""
    return f"embedding_{expert_name}"


@dataclass
class EnECGFrozenColumn:
    """One column of the frozen pass ([`EnECGModel.frozen_columns`]): an expert's embedding or the gate input.

    Args:
        name: `embedding_<expert name>` or `gate_inputs`.
        kind: the expert's type, or `gate` (the prefix of the column's folder in the feature store).
        dim: values per record.
        depends_on: what the values are computed from besides the record and the weights, as JSON-able data: the
            config fields the column's code declares, the expert's entry, the computation version (from 2 on) and the
            precision the expert runs at (unless float32).
        weights: the module with the float32 weights the values are computed from (None for the gate input).
    """

    name: str
    kind: str
    dim: int
    depends_on: dict[str, Any]
    weights: nn.Module | None = None


# Hub and cache arguments of `from_pretrained`, which also locate the config it reads first.
CONFIG_LOCATION_KWARGS = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision",
                          "subfolder")


def single_task_key_mapping(config: EnECGConfig) -> dict[str, str]:
    """How the weights of a folder saved before every model was a list of tasks load: its one task's heads and gate
    were `heads.<expert>.*` and `gate.*`, and are now `tasks.<name>.heads.<expert>.*` and `tasks.<name>.gate.*`. As
    `from_pretrained`'s `key_mapping` (regex -> replacement; it matches no key of a folder saved since). Empty for a
    model with several tasks, which were always saved under `tasks.`."""
    if len(config.tasks) != 1:
        return {}
    name = config.task_names[0]
    return {r"^heads\.": f"tasks.{name}.heads.", r"^gate\.": f"tasks.{name}.gate."}


def map_single_task_keys(state: dict[str, torch.Tensor], config: EnECGConfig) -> dict[str, torch.Tensor]:
    """`state` (read from a saved `model.safetensors`) with [`single_task_key_mapping`] applied."""
    mapping = single_task_key_mapping(config).items()
    renamed = {}
    for key, value in state.items():
        for pattern, replacement in mapping:
            key = re.sub(pattern, replacement, key)
        renamed[key] = value
    return renamed


def labels_present(labels: torch.Tensor) -> torch.Tensor:
    """(batch,) True where a record has its label: finite, and not -100 (the ignore index of a class label)."""
    flat = labels.reshape(labels.shape[0], -1)
    present = flat != -100
    if flat.is_floating_point():
        present &= torch.isfinite(flat)
    return present.all(dim=1)


def regression_loss(scaled_predictions: torch.Tensor, scaled_target: torch.Tensor, config) -> torch.Tensor:
    """Mean loss of predictions of the standardised target: MSE, or the Huber loss divided by `config.huber_delta`
    (the absolute error beyond `huber_delta` standard deviations, a parabola within), as `config.regression_loss`
    says."""
    if config.regression_loss == "mse":
        return F.mse_loss(scaled_predictions, scaled_target)
    delta = float(config.huber_delta)
    return F.huber_loss(scaled_predictions, scaled_target, delta=delta) / delta


def mix_experts(expert_outputs: torch.Tensor, gate_weights: torch.Tensor) -> torch.Tensor:
    """Gate-weighted sum: (batch, experts, num_labels) and (batch, experts) -> (batch, num_labels)."""
    return (gate_weights.unsqueeze(-1) * expert_outputs).sum(dim=1)


class EnECGHead(nn.Module):
    """Per-expert head: (standardise) -> [linear path +] FFN hidden -> hidden -> num_labels, with ReLU.

    Expert embeddings differ in scale by orders of magnitude (column standard deviations of 0.01-0.5 from the tiny
    experts, 0/1 indicators from the features expert), so a head first standardises its input with a mean and standard
    deviation fitted on the training records (`input_mean`, `input_std`; see `EnECGModel.fit_head_standardization`).
    The FFN (the paper's head) reads it clipped to +-`input_clip`, which keeps one odd record from producing an absurd
    prediction through it.

    With `linear_path` (`config.head_type="linear_ffn"`) the head adds a linear map of the standardised embedding,
    clipped far wider (`linear_clip`), to the FFN's output: `linear(clip_wide(z)) + FFN(clip(z))`. Both `linear` and
    the FFN's `out_proj` start at zero, so a new head outputs zero; training fits `linear` as a regularised convex
    problem and the FFN on what is left (`enecg_hf.training.linear_heads`). A measurement that is the answer (RR from R-peak intervals) then keeps its
    meaning beyond the training records' range instead of being bent by a ReLU network that never saw such values."""

    def __init__(self, embedding_dim: int, hidden_size: int, num_labels: int, dropout: float,
                 standardize: bool = False, input_clip: float = 6.0, linear_path: bool = False,
                 missing_indicators: list[tuple[int, int]] | None = None, linear_clip: float = 24.0):
        super().__init__()
        self.standardize = standardize
        self.input_clip = input_clip
        self.linear_clip = linear_clip
        if standardize:
            self.register_buffer("input_mean", torch.zeros(embedding_dim))
            self.register_buffer("input_std", torch.ones(embedding_dim))
        self.dense1 = nn.Linear(embedding_dim, hidden_size)
        self.dense2 = nn.Linear(hidden_size, hidden_size)
        self.out_proj = nn.Linear(hidden_size, num_labels)
        self.linear = nn.Linear(embedding_dim, num_labels) if linear_path else None
        if linear_path:  # zero output until fitted (also here: see EnECGGate)
            for layer in (self.linear, self.out_proj):
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)
        self.dropout = nn.Dropout(dropout)
        # A linear-path head reads a value its expert could not measure (flag column 1, placeholder value) as the
        # training mean (standardised: 0), and the flag as a column of its own: mean imputation with an indicator.
        # Derived from the expert, so not saved; plain lists (buffers made on the meta device by `from_pretrained`
        # would not be restored).
        pairs = list(missing_indicators or []) if linear_path and standardize else []
        self.impute_columns = [int(v) for v, _ in pairs]
        self.impute_flags = [int(f) for _, f in pairs]

    @property
    def linear_path(self) -> bool:
        return self.linear is not None

    def unmeasured(self, embedding: torch.Tensor) -> torch.Tensor:
        """(batch, len(impute_columns)) True where a value of `impute_columns` was not measured."""
        return embedding[:, self.impute_flags] > 0.5

    def standardize_input(self, embedding: torch.Tensor) -> torch.Tensor:
        """(batch, embedding_dim) -> the standardised embedding (unclipped; unmeasured values at 0, the mean)."""
        if not self.standardize:
            return embedding
        if self.impute_columns:
            columns = torch.tensor(self.impute_columns, device=embedding.device)
            imputed = torch.where(self.unmeasured(embedding), self.input_mean[columns].to(embedding.dtype),
                                  embedding[:, columns])
            embedding = embedding.index_copy(1, columns, imputed)
        return (embedding - self.input_mean) / self.input_std

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        """(batch, embedding_dim) -> (batch, num_labels)."""
        embedding = self.standardize_input(embedding)
        clipped = embedding.clamp(-self.input_clip, self.input_clip) if self.standardize else embedding
        hidden = self.dropout(F.relu(self.dense1(clipped)))
        hidden = self.dropout(F.relu(self.dense2(hidden)))
        output = self.out_proj(hidden)
        if self.linear is not None:
            output = output + self.linear(self.clip_for_linear_path(embedding))
        return output

    def clip_for_linear_path(self, standardized: torch.Tensor) -> torch.Tensor:
        """The standardised embedding as the linear path reads it: within +-`linear_clip` (unchanged without
        standardisation)."""
        return standardized.clamp(-self.linear_clip, self.linear_clip) if self.standardize else standardized

    @torch.no_grad()
    def fit_standardization(self, embedding: torch.Tensor) -> None:
        """Set `input_mean` / `input_std` from the training records' `(records, embedding_dim)` embeddings; a
        constant column keeps a standard deviation of 1. Columns with a missing flag: over their measured values."""
        embedding = embedding.float()
        if embedding.shape[0] > 1:
            mean, std = embedding.mean(dim=0), embedding.std(dim=0)
        else:
            mean, std = embedding.mean(dim=0), torch.ones_like(self.input_std)
        if self.impute_columns:
            measured = (~self.unmeasured(embedding)).float()
            values = embedding[:, self.impute_columns]
            count = measured.sum(dim=0)
            value_mean = (values * measured).sum(dim=0) / count.clamp_min(1)
            value_var = (((values - value_mean) * measured) ** 2).sum(dim=0) / (count - 1).clamp_min(1)
            mean[self.impute_columns] = torch.where(count > 0, value_mean, mean[self.impute_columns])
            std[self.impute_columns] = torch.where(count > 1, value_var.sqrt(), std[self.impute_columns])
        self.input_mean.copy_(mean)
        self.input_std.copy_(torch.where(std > 1e-6, std, torch.ones_like(std)))


class EnECGGate(nn.Module):
    """Gating network: an MLP over the gate leads' samples, softmax over experts.

    `out_proj` starts at zero, so a new gate is the uniform average and its input-dependent part only grows as far as
    training moves it; `out_proj.bias` holds the input-independent (stacked) log-weights of the experts."""

    def __init__(self, input_size: int, hidden_size: int, num_experts: int):
        super().__init__()
        self.dense = nn.Linear(input_size, hidden_size)
        self.out_proj = nn.Linear(hidden_size, num_experts)
        # Here rather than only in `_init_weights`: transformers skips modules without parameters of their own when it
        # initialises a remote-code model.
        nn.init.zeros_(self.out_proj.weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, gate_inputs: torch.Tensor) -> torch.Tensor:
        """(batch, input_size) -> softmax weights (batch, num_experts)."""
        return F.softmax(self.out_proj(F.relu(self.dense(gate_inputs))), dim=-1)

    @torch.no_grad()
    def set_stacked_log_weights(self, log_weights: torch.Tensor) -> None:
        """Set the experts' input-independent log-weights, `(num_experts,)`: the bias of `out_proj` (of the layer a
        LoRA adapter wraps, which the adapter leaves as it is). While `out_proj`'s weight is zero (a new gate), every
        record gets `softmax(log_weights)`."""
        unadapted_linear(self.out_proj).bias.copy_(log_weights)


def unadapted_linear(layer: nn.Module) -> nn.Linear:
    """The `nn.Linear` of a head or gate layer: the layer itself, or the base layer its LoRA adapter wraps."""
    return getattr(layer, "base_layer", layer)


class EnECGStackedHeads:
    """All heads of a task as tensors with a leading experts axis, trained together in one batched pass.

    Fitting trains every head on its own loss; the heads are independent, so one step for all of them is the same
    arithmetic as one step per head. Done module by module (three PEFT LoRA layers per head, each a handful of small
    kernels and Python calls) a step of six tiny heads costs ~20 ms on a CPU core; as batched matrix products over
    `(experts, batch, features)` it costs about a millisecond. [`EnECGHead.forward`] stays the definition, and
    `tests/test_fitting.py` checks that both compute the same.

    Heads read embeddings of different sizes; they are zero-padded to the largest, with zero columns in the first
    layer's weights. Zero inputs give those columns zero gradients (and AdamW's decay keeps zeros at zero), so padding
    changes nothing. What trains (`parameters`) follows the model's adaptation: the LoRA A/B matrices (`lora`), or the
    layers' weights and biases (`full`); the base weights of a LoRA head stay as they are. A head's linear path
    (`head_type="linear_ffn"`) is fitted before and stays as it is: the FFN learns what it leaves.

    Made by [`EnECGTaskEnsemble.stacked_heads`], from copies of the heads' weights: training it leaves the heads as they
    are until `head_state(name)` is loaded into the task (`load_state_dict(..., strict=False)`).
    """

    LAYERS = ("dense1", "dense2", "out_proj")

    def __init__(self, heads: nn.ModuleDict, lora: bool):
        self.names = list(heads.keys())
        heads = [heads[name] for name in self.names]
        self.widths = [h.dense1.in_features for h in heads]
        self.width = max(self.widths)
        self.lora = lora
        first = heads[0]
        self.standardize = first.standardize
        self.clip = first.input_clip
        self.linear_clip = first.linear_clip
        self.head_dropout = first.dropout.p
        self.has_linear_paths = first.linear_path
        self.tensors: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            if self.standardize:
                self.tensors["input_mean"] = torch.stack([self._pad(h.input_mean, 0.0) for h in heads])
                self.tensors["input_std"] = torch.stack([self._pad(h.input_std, 1.0) for h in heads])
            for layer in self.LAYERS:
                modules = [getattr(h, layer) for h in heads]
                base = [unadapted_linear(m) for m in modules]
                pad = self._pad if layer == "dense1" else (lambda t, _: t.detach().clone())
                self.tensors[f"{layer}.weight"] = torch.stack([pad(b.weight, 0.0) for b in base])
                self.tensors[f"{layer}.bias"] = torch.stack([b.bias.detach() for b in base]).clone()
                if self.lora:
                    self.tensors[f"{layer}.lora_A"] = torch.stack(
                        [pad(m.lora_A[LORA_ADAPTER].weight, 0.0) for m in modules])
                    self.tensors[f"{layer}.lora_B"] = torch.stack(
                        [m.lora_B[LORA_ADAPTER].weight.detach() for m in modules]).clone()
                    self.scaling = modules[0].scaling[LORA_ADAPTER]
                    dropout = modules[0].lora_dropout[LORA_ADAPTER]
                    self.lora_dropout = dropout.p if isinstance(dropout, torch.nn.Dropout) else 0.0
            if self.has_linear_paths:
                self.tensors["linear.weight"] = torch.stack([self._pad(h.linear.weight, 0.0) for h in heads])
                self.tensors["linear.bias"] = torch.stack([h.linear.bias.detach() for h in heads]).clone()
        # Mean imputation of unmeasured values (`EnECGHead.standardize_input`): per expert and column, the column of
        # its missing flag, or -1.
        self.flag_index = None
        if any(h.impute_columns for h in heads):
            self.flag_index = torch.full((len(heads), self.width), -1, dtype=torch.long)
            for e, head in enumerate(heads):
                self.flag_index[e, head.impute_columns] = torch.tensor(head.impute_flags, dtype=torch.long)
        trainable = ("lora_A", "lora_B") if self.lora else ("weight", "bias")
        self.parameters = [t.requires_grad_() for k, t in self.tensors.items()
                           if k.endswith(trainable) and not k.startswith("linear.")]

    def _pad(self, tensor: torch.Tensor, value: float) -> torch.Tensor:
        """Pad the embedding axis (the last) of a first-layer tensor to the widest head's."""
        return F.pad(tensor.detach(), (0, self.width - tensor.shape[-1]), value=value)

    def stack_inputs(self, embeddings: Sequence[torch.Tensor]) -> torch.Tensor:
        """One `(batch, embedding_dim_e)` tensor per expert -> `(experts, batch, width)`, zero-padded."""
        return torch.stack([F.pad(e.float(), (0, self.width - e.shape[-1])) for e in embeddings])

    def _linear(self, layer: str, x: torch.Tensor, training: bool) -> torch.Tensor:
        t = self.tensors
        out = torch.baddbmm(t[f"{layer}.bias"].unsqueeze(1), x, t[f"{layer}.weight"].transpose(1, 2))
        if self.lora:
            lora_in = F.dropout(x, self.lora_dropout, training) if self.lora_dropout else x
            out = out + torch.bmm(torch.bmm(lora_in, t[f"{layer}.lora_A"].transpose(1, 2)),
                                  t[f"{layer}.lora_B"].transpose(1, 2)) * self.scaling
        return out

    def forward(self, inputs: torch.Tensor, training: bool = False) -> torch.Tensor:
        """`(experts, batch, width)` stacked embeddings (`stack_inputs`) -> `(batch, experts, num_labels)`, as
        `compute_expert_logits` (regression on the standardised scale); `training`: with dropout."""
        z = inputs
        if self.standardize:
            mean, std = self.tensors["input_mean"].unsqueeze(1), self.tensors["input_std"].unsqueeze(1)
            if self.flag_index is not None:
                index = self.flag_index.unsqueeze(1).expand(-1, z.shape[1], -1)
                flags = torch.gather(z, 2, index.clamp(min=0))
                z = torch.where((index >= 0) & (flags > 0.5), mean.expand_as(z), z)
            z = (z - mean) / std  # padded columns: (0 - 0) / 1 stays zero
        x = z.clamp(-self.clip, self.clip) if self.standardize else z
        hidden = F.dropout(F.relu(self._linear("dense1", x, training)), self.head_dropout, training)
        hidden = F.dropout(F.relu(self._linear("dense2", hidden, training)), self.head_dropout, training)
        output = self._linear("out_proj", hidden, training)
        if self.has_linear_paths:
            t = self.tensors
            wide = z.clamp(-self.linear_clip, self.linear_clip) if self.standardize else z
            output = output + torch.baddbmm(t["linear.bias"].unsqueeze(1), wide, t["linear.weight"].transpose(1, 2))
        return output.transpose(0, 1)

    def head_state(self, expert: str) -> dict[str, torch.Tensor]:
        """The task's state-dict entries of one head (`heads.<expert>.*`: buffers, base weights, LoRA weights, linear
        path), copied from the stacked tensors."""
        e = self.names.index(expert)
        width = self.widths[e]
        prefix = f"heads.{expert}."
        state = {}
        if self.standardize:
            state[prefix + "input_mean"] = self.tensors["input_mean"][e, :width]
            state[prefix + "input_std"] = self.tensors["input_std"][e, :width]
        for layer in self.LAYERS:
            base = f"{prefix}{layer}.base_layer." if self.lora else f"{prefix}{layer}."
            weight = self.tensors[f"{layer}.weight"][e]
            state[base + "weight"] = weight[:, :width] if layer == "dense1" else weight
            state[base + "bias"] = self.tensors[f"{layer}.bias"][e]
            if self.lora:
                a = self.tensors[f"{layer}.lora_A"][e]
                state[f"{prefix}{layer}.lora_A.{LORA_ADAPTER}.weight"] = a[:, :width] if layer == "dense1" else a
                state[f"{prefix}{layer}.lora_B.{LORA_ADAPTER}.weight"] = self.tensors[f"{layer}.lora_B"][e]
        if self.has_linear_paths:
            state[prefix + "linear.weight"] = self.tensors["linear.weight"][e, :, :width]
            state[prefix + "linear.bias"] = self.tensors["linear.bias"][e]
        return {k: v.detach().clone() for k, v in state.items()}


class EnECGTaskEnsemble(nn.Module):
    """One task of an [`EnECGModel`] (`model.tasks[name]`): a head per expert and a gate over the shared experts'
    embeddings, and what the task computes from them: every head's output, the gate's weights, their mixture, the loss
    and the label units. Its `task_config` is its entry of `config.tasks` ([`EnECGTaskConfig`]).

    `forward(expert_embeddings, gate_inputs, labels=None)` returns an [`EnECGModelOutput`] of this task alone
    (`logits` `(batch, num_labels)`, `expert_logits` `(batch, experts, num_labels)`, `gate_weights` `(batch, experts)`);
    the training core fits it on cached features (`enecg_hf.training.fit_enecg(model.tasks[name], ...)`)."""

    def __init__(self, task_config: EnECGTaskConfig, embedding_dims: dict[str, int], gate_input_size: int,
                 missing_indicators: dict[str, list[tuple[int, int]]] | None = None):
        super().__init__()
        self._task_config = task_config
        self.heads = nn.ModuleDict(
            {
                name: EnECGHead(dim, task_config.head_hidden_size, task_config.num_labels, task_config.head_dropout,
                                standardize=task_config.head_standardize, input_clip=task_config.head_input_clip,
                                linear_path=task_config.head_type == "linear_ffn",
                                linear_clip=task_config.head_linear_clip,
                                missing_indicators=(missing_indicators or {}).get(name))
                for name, dim in embedding_dims.items()
            }
        )
        if task_config.gate_input == "predictions":  # every head's prediction, standardised (fitted with the gate)
            gate_input_size = len(embedding_dims) * task_config.num_labels
            self.register_buffer("gate_input_mean", torch.zeros(gate_input_size))
            self.register_buffer("gate_input_std", torch.ones(gate_input_size))
        self.gate = EnECGGate(gate_input_size, task_config.gate_hidden_size, len(embedding_dims))

    @property
    def task_config(self) -> EnECGTaskConfig:
        return self._task_config

    @property
    def expert_names(self) -> list[str]:
        return list(self.heads.keys())

    def forward(self, expert_embeddings, gate_inputs=None, labels=None) -> EnECGModelOutput:
        loss, logits, expert_logits, gate_weights = self.predict_task(expert_embeddings, gate_inputs, labels)
        return EnECGModelOutput(loss=loss, logits=logits, expert_logits=expert_logits, gate_weights=gate_weights)

    def predict_task(self, expert_embeddings: tuple[torch.Tensor, ...] | list[torch.Tensor],
                     gate_inputs: torch.Tensor | None, labels: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss or None, logits, expert_logits, gate_weights) of this task, in the label's unit (see
        [`EnECGModelOutput`]); records whose label is missing (NaN, or -100 for a class index) are left out of the
        loss."""
        scaled_expert_logits = self.compute_expert_logits(expert_embeddings).float()
        gate_weights = self.compute_gate_weights(gate_inputs, scaled_expert_logits.shape[0],
                                                 scaled_expert_logits).float()
        scaled_logits = mix_experts(scaled_expert_logits, gate_weights)
        loss = None
        if labels is not None:
            if self.training:
                self._warn_if_target_scaling_is_unset()
            loss = self.loss_function(scaled_logits, labels)
            if self.task_config.expert_loss_weight > 0:
                loss = loss + self.task_config.expert_loss_weight * self.loss_function(scaled_expert_logits, labels)
        logits = self.to_label_units(self.calibrated(scaled_logits))
        return loss, logits, self.to_label_units(scaled_expert_logits), gate_weights

    def calibrated(self, logits: torch.Tensor) -> torch.Tensor:
        """Classification logits divided by `logit_temperature` (temperature scaling; regression unchanged)."""
        temperature = float(self.task_config.logit_temperature)
        if self.task_config.is_regression or temperature == 1.0:
            return logits
        return logits / temperature

    def _warn_if_target_scaling_is_unset(self) -> None:
        """A regression model trained with the default `target_mean=0, target_std=1` learns labels in their own unit
        (hundreds of ms): the loss is huge and training goes nowhere, without an error. Say so, once."""
        config = self.task_config
        if config.target_scaling_is_set:
            return
        if not getattr(self, "_warned_target_scaling", False):
            self._warned_target_scaling = True
            logger.warning(
                "Training a regression EnECG model whose target scaling is unset (config.target_mean=0, "
                "config.target_std=1): the heads must then output %s in its own unit, and training will not get far. "
                "Set it from the training labels first: enecg_hf.training.fit_label_statistics(model, labels), or "
                "train with transformers.Trainer and enecg_hf.training.EnECGTrainerCallback (train.py does it itself).",
                config.label_name or "the label",
            )

    def compute_expert_logits(self, expert_embeddings: tuple[torch.Tensor, ...] | list[torch.Tensor]) -> torch.Tensor:
        """Every head on its expert's embedding: (batch, experts, num_labels), regression on the standardised scale."""
        if len(expert_embeddings) != len(self.heads):
            raise ValueError(f"Expected {len(self.heads)} expert embeddings, got {len(expert_embeddings)}")
        return torch.stack([head(e.to(head.dense1.weight.dtype)) for head, e in zip(self.heads.values(), expert_embeddings)],
                           dim=1)

    def compute_gate_weights(self, gate_inputs: torch.Tensor | None, batch_size: int,
                             scaled_expert_logits: torch.Tensor | None = None) -> torch.Tensor:
        """Softmax weights of the experts, (batch, experts), from what the gate reads ([`gate_features`]);
        `gate_inputs` may be None for the uniform gate or a gate that reads the heads' predictions."""
        if self.task_config.gate_type == "uniform":
            device = next(self.heads.parameters()).device
            return torch.full((batch_size, len(self.heads)), 1.0 / len(self.heads), device=device)
        return self.gate(self.gate_features(gate_inputs, scaled_expert_logits))

    def gate_features(self, gate_inputs: torch.Tensor | None, scaled_expert_logits: torch.Tensor | None
                      ) -> torch.Tensor:
        """What the learned gate reads, (batch, gate input size): the gate leads' samples `gate_inputs`, or with
        `gate_input="predictions"` the heads' predictions `scaled_expert_logits` (batch, experts, labels; on the
        heads' scale, as [`compute_expert_logits`] gives them), detached and standardised."""
        dtype = self.gate.dense.weight.dtype
        if self.task_config.gate_input != "predictions":
            return gate_inputs.to(dtype)
        if scaled_expert_logits is None:
            raise ValueError("A gate that reads the heads' predictions needs them (scaled_expert_logits)")
        flat = scaled_expert_logits.detach().float().flatten(1)
        return ((flat - self.gate_input_mean) / self.gate_input_std).to(dtype)

    @torch.no_grad()
    def fit_gate_input_standardization(self, scaled_expert_logits: torch.Tensor) -> None:
        """Set the standardisation of a gate that reads the heads' predictions from `scaled_expert_logits`
        (records, experts, labels): the out-of-fold predictions the gate is fitted on (a column that does not vary
        keeps a standard deviation of 1)."""
        if self.task_config.gate_input != "predictions":
            return
        flat = scaled_expert_logits.detach().float().flatten(1)
        std = flat.std(0) if len(flat) > 1 else torch.ones_like(self.gate_input_std)
        self.gate_input_mean.copy_(flat.mean(0))
        self.gate_input_std.copy_(torch.where(std > 1e-6, std, torch.ones_like(std)))

    def to_label_units(self, values: torch.Tensor) -> torch.Tensor:
        """Regression heads learn a standardised target; report it in the label's unit."""
        if not self.task_config.is_regression:
            return values
        return values.float() * self.task_config.target_std + self.task_config.target_mean

    def loss_function(self, scaled_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Loss of `(batch, num_labels)` outputs, or the mean over experts of `(batch, experts, num_labels)` outputs.

        MSE on the standardised target, cross-entropy (weighted by `config.class_weights`) or BCE. Records whose label
        is missing (NaN, or -100 as a class index) are left out; a batch without any label gives a zero loss."""
        present = labels_present(labels)
        if not bool(present.all()):  # a missing label is left out of the loss, never imputed
            if not bool(present.any()):
                return scaled_logits.sum() * 0.0
            scaled_logits, labels = scaled_logits[present], labels[present]
        per_expert = scaled_logits.dim() == 3
        if per_expert:  # every expert predicts every label: fold the experts into the batch
            labels = labels.unsqueeze(1).expand(-1, scaled_logits.shape[1], *labels.shape[1:])
            scaled_logits, labels = scaled_logits.flatten(0, 1), labels.flatten(0, 1)
        problem_type = self.task_config.problem_type
        if problem_type == "regression":
            target = (labels.float() - self.task_config.target_mean) / self.task_config.target_std
            return regression_loss(scaled_logits, target.reshape(scaled_logits.shape), self.task_config)
        if problem_type == "single_label_classification":
            weight = None
            if self.task_config.class_weights is not None:
                weight = torch.tensor(self.task_config.class_weights, dtype=scaled_logits.dtype, device=scaled_logits.device)
            return F.cross_entropy(scaled_logits, labels.long().reshape(-1), weight=weight)
        return F.binary_cross_entropy_with_logits(scaled_logits, labels.float().reshape(scaled_logits.shape))

    @torch.no_grad()
    def fit_head_standardization(self, expert_embeddings: tuple[torch.Tensor, ...] | list[torch.Tensor]) -> None:
        """Set every head's input mean and standard deviation from the training records' embeddings
        (`(records, embedding_dim)` per expert). A constant column keeps a standard deviation of 1."""
        if not self.task_config.head_standardize:
            return
        for head, embedding in zip(self.heads.values(), expert_embeddings):
            head.fit_standardization(embedding)

    def stacked_heads(self) -> EnECGStackedHeads:
        """Every head's weights copied into tensors with a leading experts axis, to train all heads in one batched
        pass ([`EnECGStackedHeads`]: `forward` from stacked embeddings, trainable `parameters`, `head_state(name)` to
        load a head back)."""
        return EnECGStackedHeads(self.heads, lora=self.task_config.adaptation == "lora")

    def init_heads_and_gate(self) -> None:
        """Draw every head's and the gate's initial weights again from the global RNG, module by module (heads in
        order, then the gate): [`init_head_or_gate`], then the module's LoRA adapters as PEFT starts them (A random,
        B zero)."""
        for module in [*self.heads.values(), self.gate]:
            init_head_or_gate(module)
            for layer in module.modules():
                if hasattr(layer, "reset_lora_parameters"):  # a peft LoRA layer (its A and B are nn.Linear too)
                    for adapter in layer.lora_A:
                        layer.reset_lora_parameters(adapter, init_lora_weights=True)

    @torch.no_grad()
    def set_linear_paths(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        """Load every head's linear path (`head_type="linear_ffn"`) from `(experts, num_labels, width)` weights,
        zero-padded to the widest embedding, and `(experts, num_labels)` biases."""
        for e, head in enumerate(self.heads.values()):
            dim = head.linear.in_features
            head.linear.weight.copy_(weight[e, :, :dim])
            head.linear.bias.copy_(bias[e])

    @property
    def has_linear_paths(self) -> bool:
        """Whether the heads have linear paths (`head_type="linear_ffn"`): fitted (`set_linear_paths`), not trained."""
        return any(head.linear_path for head in self.heads.values())

    def trained_parameters(self) -> list[nn.Parameter]:
        """What a gradient step of the heads and gate trains: the parameters that require gradients, the fitted linear
        paths left out."""
        fitted = {id(p) for head in self.heads.values() if head.linear_path for p in head.linear.parameters()}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in fitted]

    def head_standardization_is_set(self) -> bool:
        """Whether the heads' input standardisation was fitted (`fit_head_standardization`), or is switched off."""
        heads = [head for head in self.heads.values() if head.standardize]
        return not heads or any(bool(head.input_mean.any()) or bool((head.input_std != 1).any()) for head in heads)

    def gate_state(self) -> dict[str, torch.Tensor]:
        """A copy of what a fitted gate is, keyed as in this module's state dict: the gate's weights and the
        standardisation of its input."""
        state = {f"gate.{k}": v.detach().clone() for k, v in self.gate.state_dict().items()}
        return state | {k: v.detach().clone() for k, v in self.named_buffers() if k.startswith("gate_input_")}



class EnECGPreTrainedModel(PreTrainedModel):
    config_class = EnECGConfig
    base_model_prefix = "enecg"
    main_input_name = "input_values"
    supports_gradient_checkpointing = False
    # `forward` computes a per-batch mean loss and takes no `num_items_in_batch`: `transformers.Trainer` then scales
    # the loss for gradient accumulation itself.
    accepts_loss_kwargs = False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # Only the heads and the gate are ours to initialise. Experts initialise themselves (and are usually
        # overwritten by pretrained weights): the transformers default would re-draw every Linear/Conv/Norm in them.
        init_head_or_gate(module)


@torch.no_grad()
def init_head_or_gate(module: nn.Module) -> None:
    """Initialise an [`EnECGHead`] or [`EnECGGate`] (any other module is left alone): `nn.Linear`'s own default, and
    zeros for the gate's `out_proj` and for a linear-path head's `linear` and `out_proj`. One call per tensor:
    transformers guards the torch.nn.init functions so that each tensor is initialised once."""
    if isinstance(module, (EnECGHead, EnECGGate)):
        # The gate's out_proj starts at zero: a new gate is the uniform average (a random gate starts on a random
        # expert, and a few hundred records rarely undo it). A linear-path head starts at zero output: its FFN then
        # adds only what training gives it on top of the linear fit.
        if isinstance(module, EnECGGate):
            zero = [module.out_proj]
        else:
            zero = [module.linear, module.out_proj] if module.linear_path else []
        zero += [getattr(layer, "base_layer", None) for layer in zero]
        for layer in module.modules():
            if not isinstance(layer, nn.Linear):
                continue
            if any(layer is z for z in zero if z is not None):
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)
                continue
            nn.init.kaiming_uniform_(layer.weight, a=5**0.5)  # nn.Linear's own default
            if layer.bias is not None:
                bound = 1 / layer.in_features**0.5
                nn.init.uniform_(layer.bias, -bound, bound)
    if isinstance(module, EnECGHead) and module.standardize:
        module.input_mean.zero_()
        module.input_std.fill_(1.0)


class EnECGModel(EnECGPreTrainedModel):
    """The EnECG ensemble: frozen experts, and for every task of `config.tasks` one FFN head per expert (adapted with
    LoRA or trained fully) and a gate ([`EnECGTaskEnsemble`], in `model.tasks`), over one pass of the experts.

    Create one with random expert weights with `EnECGModel(config)`, with each expert's pretrained weights with
    `EnECGModel.from_expert_sources(config)`, or load a saved one with `from_pretrained`.
    """

    def __init__(self, config: EnECGConfig):
        super().__init__(config)
        self.experts = nn.ModuleDict({e.name: build_expert(e, config) for e in config.expert_configs})
        gate_input_size = len(config.gate_leads) * config.gate_input_length
        # Heads and gate get their initial values in `post_init` (`_init_weights`), so building them must not move the
        # global RNG: transformers re-initialises an expert that nests a transformers model (ECG-FM's wav2vec 2.0) in
        # `post_init` too, and its random weights would otherwise depend on the tasks' head shapes (a model for
        # another label would have other experts and miss the feature store).
        with torch.random.fork_rng(devices=[]):
            dims = {name: expert.embedding_dim for name, expert in self.experts.items()}
            missing = {name: expert.missing_indicators for name, expert in self.experts.items()}
            self.tasks = nn.ModuleDict({task.label_name: EnECGTaskEnsemble(task, dims, gate_input_size, missing)
                                        for task in config.task_configs})
        # Experts that need float32 stay float32 under `from_pretrained(..., dtype=torch.bfloat16 / float16)`; the
        # other experts, the heads and the gate take the requested dtype.
        self._keep_in_fp32_modules_strict = {rf"^experts\.{name}\." for name in self._fp32_expert_names()}
        self.post_init()
        if config.adaptation == "lora":
            self._inject_lora()
        # Light checkpoints leave out backbones that have a pretrained source; they are re-attached after loading.
        self._keys_to_ignore_on_load_missing = set(self._keys_to_ignore_on_load_missing or ()) | {
            rf"^experts\.{name}\." for name in self._left_out_expert_names()
        }
        self.freeze_experts()

    # ------------------------------------------------------------------------------------------------ set-up
    def _inject_lora(self) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        lora_config = LoraConfig(
            r=self.config.lora_r,
            lora_alpha=self.config.lora_alpha,
            lora_dropout=self.config.lora_dropout,
            bias="none",
            target_modules=r"^tasks\.[^.]+\.(heads\.[^.]+\.(dense1|dense2|out_proj)|gate\.(dense|out_proj))$",
        )
        inject_adapter_in_model(lora_config, self, adapter_name=LORA_ADAPTER)

    def freeze_experts(self) -> None:
        """Set what trains: never the experts; LoRA parameters only (`lora`) or heads and gate (`full`).

        Called at construction and again after `from_pretrained`, which re-enables gradients on every parameter."""
        for name, param in self.named_parameters():
            if name.startswith("experts."):
                param.requires_grad_(False)
            elif self.config.adaptation == "lora":
                param.requires_grad_("lora_" in name)
            else:
                param.requires_grad_(True)
        self.experts.eval()

    def train(self, mode: bool = True) -> "EnECGModel":
        super().train(mode)
        self.experts.eval()  # frozen experts never see dropout or batch-norm updates
        return self

    def _fp32_expert_names(self) -> list[str]:
        return [name for name, expert in self.experts.items() if expert.KEEP_IN_FP32]

    def _left_out_expert_names(self) -> list[str]:
        if self.config.save_backbones:
            return []
        return [e.name for e in self.config.expert_configs if e.pretrained]

    def set_expert_precision(self, precision: str, check: bool = True) -> dict[str, str]:
        """Run the frozen experts at `precision`: "fp32" (default), "int8" (dynamic quantisation of their `nn.Linear`
        layers, CPU), "bf16" or "fp16" (autocast; fp16 on a GPU). A runtime choice: heads and gate are untouched and
        `save_pretrained` still writes the float32 expert weights. Experts that cannot take it stay float32, with the
        reason logged; returns `{expert: precision}` (also `model.expert_precisions`). See precision_enecg.py."""
        return set_expert_precision(self, precision, check=check)

    @classmethod
    def from_expert_sources(cls, config: EnECGConfig) -> "EnECGModel":
        """Build a new model and load every expert's pretrained weights from its `pretrained` source."""
        model = cls(config)
        model.load_expert_weights()
        return model

    def load_expert_weights(self, names: list[str] | None = None) -> None:
        """Load pretrained backbone weights for the named experts (default: all) from their sources."""
        for expert_config in self.config.expert_configs:
            if names is not None and expert_config.name not in names:
                continue
            expert = self.experts[expert_config.name]
            if expert_config.pretrained:
                expert.load_pretrained(expert_config.pretrained)
                logger.info("Expert %r: loaded pretrained weights from %s", expert_config.name, expert_config.pretrained)
            elif expert.has_weights:
                logger.warning(
                    "Expert %r (%s) has RANDOM weights: no `pretrained` source is configured. Its embeddings carry no "
                    "pretrained knowledge.", expert_config.name, expert_config.type
                )
        self.freeze_experts()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, which also takes the name of a model shipped with the package
        (`enecg_hf.shipped_model_names()`, e.g. "enecg-base"), then re-freezes the experts and re-attaches the
        backbones a light checkpoint leaves out."""
        pretrained_model_name_or_path = resolve_model(pretrained_model_name_or_path)
        legacy_mapping = {}
        if kwargs.get("key_mapping") is None and pretrained_model_name_or_path is not None:
            config = kwargs.get("config")
            if not isinstance(config, PreTrainedConfig):  # (a remote-code copy's config is another EnECGConfig class)
                config = cls.config_class.from_pretrained(
                    config or pretrained_model_name_or_path,
                    **{k: kwargs[k] for k in CONFIG_LOCATION_KWARGS if k in kwargs})
            legacy_mapping = kwargs["key_mapping"] = single_task_key_mapping(config)
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        # transformers keeps a used `key_mapping` and reverses it when saving: a folder is saved in today's layout.
        model._weight_conversions = [conversion for conversion in getattr(model, "_weight_conversions", None) or []
                                     if not set(conversion._original_source_patterns) & set(legacy_mapping)] or None
        with torch.no_grad():
            # Tensors loaded from safetensors sit at the file's alignment; vectorised CPU kernels then round differently
            # from freshly allocated ones. Own copies make a loaded model compute bit-identically to the saved one.
            for tensor in [*model.parameters(), *model.buffers()]:
                tensor.data = tensor.data.clone()
        for name in model._fp32_expert_names():  # before re-attaching backbones: their weights load in their dtype
            model.experts[name].float()
        left_out = model._left_out_expert_names()
        if left_out:
            model.load_expert_weights(left_out)
        model.freeze_experts()  # transformers 5 turns requires_grad back on while loading
        if (Path(str(pretrained_model_name_or_path)) / ADAPTER_FOLDER / LEGACY_ADAPTER_BASE_WEIGHTS).is_file():
            logger.warning(
                "%s was saved with its LoRA adapter merged into the heads (an earlier enecg_hf): it predicts as saved, "
                "but loading its adapter/ onto it would apply the adapter twice. Load the adapter onto "
                "enecg_hf.load_adapter_base(folder), or save the model again.", pretrained_model_name_or_path
            )
        return model

    # ------------------------------------------------------------------------------------------------ forward
    @property
    def expert_names(self) -> list[str]:
        return list(self.experts.keys())

    @torch.no_grad()
    def fit_head_standardization(self, expert_embeddings: tuple[torch.Tensor, ...] | list[torch.Tensor]) -> None:
        """Set every head's input mean and standard deviation (of every task) from the training records' embeddings
        (`(records, embedding_dim)` per expert). A constant column keeps a standard deviation of 1."""
        for task in self.tasks.values():
            task.fit_head_standardization(expert_embeddings)

    def compute_features(self, input_values: torch.Tensor) -> EnECGFeatures:
        """Run the frozen part: normalisation, experts and the gate's input selection.

        Args:
            input_values: (batch, leads, samples) at `config.sampling_rate`, leads in `config.lead_names` order.
        """
        self._check_input(input_values)
        return self._features(self.compute_frozen_columns(input_values))

    def compute_normalized_features(self, normalized: torch.Tensor) -> EnECGFeatures:
        """[`compute_features`] after normalisation: `normalized` is (batch, leads, samples) as the experts see it
        (saliency maps attribute to this view; a straight path from zero to a z-scored record is well-defined, one
        to the raw record is not, because z-scoring makes the model blind to the signal's scale)."""
        return self._features(self.compute_frozen_columns(normalized, normalized=True))

    def _features(self, values: dict[str, torch.Tensor]) -> EnECGFeatures:
        return EnECGFeatures(expert_embeddings=tuple(values[embedding_column(name)] for name in self.experts),
                             gate_inputs=values[GATE_INPUTS_COLUMN])

    def compute_gate_inputs(self, normalized: torch.Tensor) -> torch.Tensor:
        """(batch, leads, samples) normalised -> the gate's input (batch, gate_leads * gate_input_length): the gate
        leads resampled to `gate_input_length` samples, one lead after the other."""
        fields = declared_fields(self.config, GATE_INPUT_FIELDS)
        indices = [list(fields.lead_names).index(lead) for lead in fields.gate_leads]
        return resample_fourier(normalized[:, indices, :], fields.gate_input_length).flatten(start_dim=1)

    def frozen_columns(self) -> list[EnECGFrozenColumn]:
        """The columns of the frozen pass: each expert's embedding (in the model's order), then the gate input, with
        what each is computed from (what the feature store fingerprints, `enecg_hf.features`)."""
        record = vars(declared_fields(self.config, RECORD_FIELDS))
        columns = []
        for name, expert in self.experts.items():
            depends_on = {"kind": "expert", **record, **expert.frozen_dependencies(self.config)}
            if expert_precision(self, name) != "fp32":  # left out at float32: the stores written before keep serving
                depends_on["precision"] = expert_precision(self, name)
            columns.append(EnECGFrozenColumn(embedding_column(name), expert.expert_config.type, expert.embedding_dim,
                                             depends_on, weights=fp32_expert(self, name)))
        gate = declared_fields(self.config, GATE_INPUT_FIELDS)
        depends_on = {"kind": "gate_inputs", **record, **vars(gate)}
        if GATE_INPUT_COMPUTATION_VERSION > 1:  # left out at 1, as an expert's
            depends_on["computation"] = GATE_INPUT_COMPUTATION_VERSION
        columns.append(EnECGFrozenColumn(GATE_INPUTS_COLUMN, "gate", len(gate.gate_leads) * gate.gate_input_length,
                                         depends_on))
        return columns

    def compute_frozen_columns(self, input_values: torch.Tensor, names: Sequence[str] | None = None,
                               normalized: bool = False) -> dict[str, torch.Tensor]:
        """The frozen pass of a batch: `{column name: (batch, dim)}` for the columns `names` (default: all, in the
        order of [`frozen_columns`]). What [`compute_features`] runs, and what the feature store stores.

        Args:
            input_values: (batch, leads, samples) as [`forward`] takes them (not checked here), normalised first as
                `config.normalization` says; with `normalized=True`, already normalised.

        Returns:
            Embeddings in their expert's compute dtype, the gate input in float32.
        """
        experts = {embedding_column(name): expert for name, expert in self.experts.items()}
        names = [*experts, GATE_INPUTS_COLUMN] if names is None else list(names)
        unknown = [name for name in names if name not in experts and name != GATE_INPUTS_COLUMN]
        if unknown:
            raise KeyError(f"No frozen columns {unknown}; the model's are {[*experts, GATE_INPUTS_COLUMN]}")
        # No `torch.no_grad()` here: frozen parameters build no graph anyway, and saliency maps need gradients with
        # respect to the input through the experts. One flush-to-zero scope for the whole pass (each expert's own
        # call would otherwise set and restore it).
        with flush_denormals():
            if not normalized:
                normalization = declared_fields(self.config, RECORD_FIELDS).normalization
                input_values = normalize_ecg(input_values.float(), normalization)
            return {name: experts[name](input_values) if name in experts else self.compute_gate_inputs(input_values)
                    for name in names}

    def _check_input(self, input_values: torch.Tensor) -> None:
        fields = declared_fields(self.config, RECORD_FIELDS)
        expected = (len(fields.lead_names), fields.input_length)
        if input_values.dim() != 3 or tuple(input_values.shape[1:]) != expected:
            raise ValueError(
                f"input_values must have shape (batch, {expected[0]}, {expected[1]}): {expected[0]} leads "
                f"({', '.join(fields.lead_names)}) x {expected[1]} samples at {fields.sampling_rate} Hz; "
                f"got {tuple(input_values.shape)}"
            )
        if not torch.isfinite(input_values).all():
            raise ValueError("input_values contains NaN or infinite values")

    def forward(
        self,
        input_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        expert_embeddings: tuple[torch.Tensor, ...] | list[torch.Tensor] | None = None,
        gate_inputs: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> EnECGModelOutput | tuple:
        """
        Args:
            input_values (`torch.FloatTensor` of shape `(batch, leads, samples)`): raw ECG in millivolts at
                `config.sampling_rate`, leads ordered as `config.lead_names`. The model normalises it.
            labels (`torch.Tensor`, *optional*): `(batch,)` or `(batch, num_labels)` floats for regression, `(batch,)`
                class indices for single-label, `(batch, num_labels)` 0/1 for multi-label classification. A record
                without a label is NaN (floats) or -100 (class indices) and is left out of the loss. A model with
                several tasks takes a dict `{task name: tensor}` (tasks without labels may be left out); a
                single-task model takes its tensor (or such a dict).
            expert_embeddings, gate_inputs (*optional*): precomputed [`EnECGFeatures`] instead of `input_values`
                (training on cached features skips the frozen experts).
            output_hidden_states (`bool`, *optional*): also return every expert's embedding as `hidden_states`.
            output_attentions: not supported (EnECG mixes pooled embeddings; it has no attention maps to return).

        Returns:
            [`EnECGModelOutput`] with `logits` `(batch, num_labels)`, `expert_logits` `(batch, experts, num_labels)`,
            `gate_weights` `(batch, experts)` and `loss` when labels are given (times the task's `loss_weight`); for a
            model with several tasks the first three are dicts by task name, `task_losses` each task's loss, and
            `loss` the sum of each task's loss times its `loss_weight`.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        output_hidden_states = (output_hidden_states if output_hidden_states is not None
                                else self.config.output_hidden_states)
        if output_attentions:
            raise ValueError("EnECGModel has no attention maps: output_attentions=True is not supported "
                             "(output_hidden_states=True returns the expert embeddings)")
        unexpected = sorted(k for k, v in kwargs.items() if v is not None)
        if unexpected:
            raise TypeError(f"EnECGModel.forward got unexpected arguments {unexpected}")
        expert_embeddings, gate_inputs = self._features_or_given(input_values, expert_embeddings, gate_inputs)
        hidden_states = tuple(expert_embeddings) if output_hidden_states else None
        outputs = self.forward_tasks(expert_embeddings=expert_embeddings, gate_inputs=gate_inputs,
                                     labels=self._labels_by_task(labels))
        losses = {name: output.loss for name, output in outputs.items() if output.loss is not None}
        loss = (sum(self.tasks[name].task_config.loss_weight * value for name, value in losses.items())
                if losses else None)
        if len(outputs) == 1:  # a single-task model answers as one: its task's tensors
            (only,) = outputs.values()
            logits, expert_logits, gate_weights, task_losses = only.logits, only.expert_logits, only.gate_weights, None
        else:
            logits, expert_logits, gate_weights = ({name: getattr(output, key) for name, output in outputs.items()}
                                                   for key in ("logits", "expert_logits", "gate_weights"))
            task_losses = losses
        if not return_dict:
            return tuple(v for v in (loss, logits, expert_logits, gate_weights, hidden_states, task_losses)
                         if v is not None)
        return EnECGModelOutput(loss=loss, logits=logits, expert_logits=expert_logits, gate_weights=gate_weights,
                                hidden_states=hidden_states, task_losses=task_losses)

    def forward_tasks(self, input_values: torch.Tensor | None = None, labels: dict[str, torch.Tensor] | None = None,
                      expert_embeddings: tuple[torch.Tensor, ...] | list[torch.Tensor] | None = None,
                      gate_inputs: torch.Tensor | None = None) -> dict[str, EnECGModelOutput]:
        """Every task's output, `{task name: EnECGModelOutput}` (a single-task model's too: one entry), from
        `input_values` or precomputed `expert_embeddings` and `gate_inputs` (see [`forward`]); `labels` by task name
        (tasks without labels may be left out). What [`forward`] returns, before a single task's is unwrapped."""
        expert_embeddings, gate_inputs = self._features_or_given(input_values, expert_embeddings, gate_inputs)
        labels = labels or {}
        return {name: task(expert_embeddings, gate_inputs, labels.get(name)) for name, task in self.tasks.items()}

    def _features_or_given(self, input_values, expert_embeddings, gate_inputs
                           ) -> tuple[Sequence[torch.Tensor], torch.Tensor]:
        """The precomputed `expert_embeddings` and `gate_inputs` when both are given, else the frozen pass of
        `input_values`."""
        if expert_embeddings is not None and gate_inputs is not None:
            return expert_embeddings, gate_inputs
        if input_values is None:
            raise ValueError("Pass input_values, or both expert_embeddings and gate_inputs")
        features = self.compute_features(input_values)
        return features.expert_embeddings, features.gate_inputs

    def _labels_by_task(self, labels: torch.Tensor | dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """`forward`'s labels by task name: a dict as given, or a single-task model's tensor under its task's name."""
        if labels is None:
            return {}
        if not isinstance(labels, dict):
            if len(self.tasks) > 1:
                raise ValueError(f"A model with several tasks takes labels as a dict {{task: tensor}} (tasks: "
                                 f"{self.config.task_names}); a missing label is NaN or -100")
            labels = {self.config.task_names[0]: labels}
        unknown = sorted(set(labels) - set(self.tasks))
        if unknown:
            raise ValueError(f"labels for unknown tasks {unknown}; the model's tasks are {self.config.task_names}")
        return labels

    # ------------------------------------------------------------------------------------------------ saving
    def lora_layers(self) -> dict[str, nn.Module]:
        from peft.tuners.lora import LoraLayer

        return {name: module for name, module in self.named_modules() if isinstance(module, LoraLayer)}

    def save_pretrained(self, save_directory: str | os.PathLike, *args, state_dict=None, **kwargs):
        """Save a Hub-ready folder: `config.json` (with `auto_map` and `custom_pipelines`), `model.safetensors` and the
        code files, including the pipeline's, so that `pipeline(model=folder, trust_remote_code=True)` serves it.

        A LoRA model is saved un-merged: `model.safetensors` holds the heads and gate as they were before adaptation
        (`base_layer` weights, with the heads' standardisation buffers) and the trained LoRA weights, and `adapter/`
        holds the same adapter in PEFT's format. Loading the folder predicts as this model does, and loading the
        adapter onto it by any PEFT route (`PeftModel.from_pretrained`, `model.load_adapter`, `AutoPeftModel`) sets
        the LoRA weights it already has: nothing is applied twice. Backbones of experts with a pretrained source are
        left out when `config.save_backbones` is False."""
        # A relative import of this module: the code saving copies pipeline_enecg.py (and the two modules it imports)
        # next to this file, wherever the model was loaded from. (`push_to_hub` saves through here too.)
        from .pipeline_enecg import pipeline_entry

        self.config.custom_pipelines = pipeline_entry()
        if state_dict is None:
            with fp32_experts_in_place(self):  # an int8 expert is a runtime copy: save the float32 original
                state_dict = self.state_dict()
            left_out = tuple(f"experts.{name}." for name in self._left_out_expert_names())
            state_dict = {k: v for k, v in state_dict.items() if not (left_out and k.startswith(left_out))}
        # The adapter first: with `push_to_hub=True` the parent uploads the folder as it stands when it returns.
        if self.lora_layers() and kwargs.get("is_main_process", True):
            self.save_adapter(Path(save_directory) / ADAPTER_FOLDER,
                              base_model_name_or_path=str(Path(save_directory).resolve()))
        return super().save_pretrained(save_directory, *args, state_dict=state_dict, **kwargs)

    def save_adapter(self, folder: str | os.PathLike, base_model_name_or_path: str | None = None) -> Path:
        """Write the PEFT adapter (`adapter_config.json`, `adapter_model.safetensors`) as `PeftModel.save_pretrained`
        would. `base_model_name_or_path` (the model folder or its Hub id) and an `auto_mapping` to `AutoModel` let
        `peft.AutoPeftModel.from_pretrained(folder)` find the base model."""
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        lora_config = copy.copy(self.peft_config[LORA_ADAPTER])
        lora_config.base_model_name_or_path = base_model_name_or_path
        lora_config.auto_mapping = {"base_model_class": "AutoModel", "parent_library": "transformers"}
        lora_config.save_pretrained(str(folder))
        # Key names as `PeftModel.save_pretrained` writes them, so `PeftModel.from_pretrained` finds every weight.
        adapter_state = {
            f"base_model.model.{k}": v.detach().contiguous().cpu() for k, v in get_peft_model_state_dict(self).items()
        }
        save_file(adapter_state, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
        (folder / LEGACY_ADAPTER_BASE_WEIGHTS).unlink(missing_ok=True)  # left by an earlier save into this folder
        return folder


def load_adapter_base(model_directory: str | os.PathLike) -> EnECGModel:
    """The model a saved PEFT adapter applies to, without LoRA layers: backbones, heads (with their standardisation
    buffers) and gate as they were before adaptation. `PeftModel.from_pretrained(load_adapter_base(d), f"{d}/adapter")`
    predicts as `d` does; so do `PeftModel.from_pretrained(AutoModel.from_pretrained(d), f"{d}/adapter")`,
    `AutoModel.from_pretrained(d).load_adapter(f"{d}/adapter")` and `AutoPeftModel.from_pretrained(f"{d}/adapter")`."""
    from safetensors.torch import load_file

    folder = Path(model_directory)
    config = EnECGConfig.from_pretrained(folder)
    config.adaptation = "full"
    model = EnECGModel(config)
    state = {k.replace(".base_layer.", "."): v for k, v in load_file(str(folder / "model.safetensors")).items()
             if "lora_" not in k}
    legacy = folder / ADAPTER_FOLDER / LEGACY_ADAPTER_BASE_WEIGHTS
    if legacy.is_file():  # folders saved merged (before 0.1.0 kept adapters un-merged): the pre-adaptation weights
        state.update(load_file(str(legacy)))
    state = map_single_task_keys(state, config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    left_out = tuple(f"experts.{name}." for name in model._left_out_expert_names())
    missing = [k for k in missing if not (left_out and k.startswith(left_out))]
    if missing or unexpected:
        raise ValueError(f"{folder}: adapter base weights do not match the model: missing {missing}, unexpected {unexpected}")
    if left_out:
        model.load_expert_weights(model._left_out_expert_names())
    model.freeze_experts()
    return model.eval()


__all__ = ["EnECGModel", "EnECGPreTrainedModel", "EnECGModelOutput", "EnECGFeatures", "EnECGFrozenColumn",
           "EnECGTaskEnsemble", "EnECGStackedHeads", "load_adapter_base", "embedding_column", "single_task_key_mapping"]
