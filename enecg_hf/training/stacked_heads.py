"""All expert heads of a model as stacked tensors, trained together in one batched pass.

Fitting trains every head on its own loss; the heads are independent, so one step for all of them is the same
arithmetic as one step per head. Done module by module (three PEFT LoRA layers per head, each a handful of small
kernels and Python calls) a step of six tiny heads costs ~20 ms on a CPU core; as batched matrix products over
`(experts, batch, features)` it costs about a millisecond. This is why it is written by hand rather than calling the
head modules: `EnECGHead.forward` stays the definition, and `tests/test_fitting.py` checks that both compute the same.

Heads read embeddings of different sizes; they are zero-padded to the largest, with zero columns in the first layer's
weights. Zero inputs give those columns zero gradients (and AdamW's decay keeps zeros at zero), so padding changes
nothing. What trains follows the model's adaptation: the LoRA A/B matrices (`lora`), or the layers' weights and biases
(`full`); the base weights of a LoRA head stay as they are. A head's linear path (`head_type="linear_ffn"`) is
fitted before (`linear_heads`) and stays as it is: the FFN learns what it leaves.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch.nn import functional as F

from ..modeling_enecg import EnECGTaskMixin


LAYERS = ("dense1", "dense2", "out_proj")


class StackedHeads:
    """The heads of `model` as tensors with a leading experts axis (see the module docstring)."""

    def __init__(self, model: EnECGTaskMixin):
        self.model = model
        self.names = list(model.heads.keys())
        heads = [model.heads[name] for name in self.names]
        self.width = max(h.dense1.in_features for h in heads)
        self.lora = model.task_config.adaptation == "lora"
        first = heads[0]
        self.standardize = first.standardize
        self.clip = first.input_clip
        self.linear_clip = first.linear_clip
        self.head_dropout = first.dropout.p
        self.linear_path = first.linear_path
        self.tensors: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            if self.standardize:
                self.tensors["input_mean"] = torch.stack([self._pad(h.input_mean, 0.0) for h in heads])
                self.tensors["input_std"] = torch.stack([self._pad(h.input_std, 1.0) for h in heads])
            for layer in LAYERS:
                modules = [getattr(h, layer) for h in heads]
                base = [getattr(m, "base_layer", m) for m in modules]
                pad = self._pad if layer == "dense1" else (lambda t, _: t.detach().clone())
                self.tensors[f"{layer}.weight"] = torch.stack([pad(b.weight, 0.0) for b in base])
                self.tensors[f"{layer}.bias"] = torch.stack([b.bias.detach() for b in base]).clone()
                if self.lora:
                    self.tensors[f"{layer}.lora_A"] = torch.stack([pad(m.lora_A["default"].weight, 0.0) for m in modules])
                    self.tensors[f"{layer}.lora_B"] = torch.stack(
                        [m.lora_B["default"].weight.detach() for m in modules]).clone()
                    self.scaling = modules[0].scaling["default"]
                    dropout = modules[0].lora_dropout["default"]
                    self.lora_dropout = dropout.p if isinstance(dropout, torch.nn.Dropout) else 0.0
            if self.linear_path:
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
        """`(experts, batch, width)` stacked embeddings -> `(batch, experts, num_labels)`, as `compute_expert_logits`."""
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
        if self.linear_path:
            t = self.tensors
            wide = z.clamp(-self.linear_clip, self.linear_clip) if self.standardize else z
            output = output + torch.baddbmm(t["linear.bias"].unsqueeze(1), wide, t["linear.weight"].transpose(1, 2))
        return output.transpose(0, 1)

    def state_of(self, expert: str) -> dict[str, torch.Tensor]:
        """The model state-dict entries of one head, from the stacked tensors."""
        e = self.names.index(expert)
        head = self.model.heads[expert]
        width = head.dense1.in_features
        prefix = f"heads.{expert}."
        state = {}
        if self.standardize:
            state[prefix + "input_mean"] = self.tensors["input_mean"][e, :width]
            state[prefix + "input_std"] = self.tensors["input_std"][e, :width]
        for layer in LAYERS:
            base = f"{prefix}{layer}.base_layer." if self.lora else f"{prefix}{layer}."
            weight = self.tensors[f"{layer}.weight"][e]
            state[base + "weight"] = weight[:, :width] if layer == "dense1" else weight
            state[base + "bias"] = self.tensors[f"{layer}.bias"][e]
            if self.lora:
                a = self.tensors[f"{layer}.lora_A"][e]
                state[f"{prefix}{layer}.lora_A.default.weight"] = a[:, :width] if layer == "dense1" else a
                state[f"{prefix}{layer}.lora_B.default.weight"] = self.tensors[f"{layer}.lora_B"][e]
        if self.linear_path:
            state[prefix + "linear.weight"] = self.tensors["linear.weight"][e, :, :width]
            state[prefix + "linear.bias"] = self.tensors["linear.bias"][e]
        return {k: v.detach().clone() for k, v in state.items()}
