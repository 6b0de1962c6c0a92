"""Explanations of EnECG predictions: gate weights, and integrated-gradients saliency of the prediction with respect to
the input signal, for the whole ensemble and for each expert (the paper's Figure 1 shows which wave segments each
expert attends to). Attributions come from `captum`; plots from matplotlib. Both are optional
(`pip install 'enecg_hf[explain]'`).

    from enecg_hf.tools.explain import explain, plot_explanation
    explanation = explain(model, input_values)              # (batch, 12, samples) in mV, as the model takes it
    plot_explanation(input_values[0], explanation, index=0, path="explanation.png")
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch


def _require(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f"explanations need {module.split('.')[0]}: pip install 'enecg_hf[explain]'") from error


@dataclass
class EnECGExplanation:
    """Saliency and gate weights of a batch.

    Attributes:
        saliency: (batch, leads, samples) integrated-gradients attribution of the ensemble output `target` to each
            sample of the normalised record (output units). Covers the differentiable experts and the gate only: see
            `notes`.
        expert_saliency: expert name -> (batch, leads, samples) attribution of that expert head's own output, or `None`
            for an expert that is not differentiable (reason in `notes`).
        gate_weights: (batch, experts) softmax gate weights, in `expert_names` order.
        prediction: (batch,) the explained output (regression value, or the target class's logit).
        expert_predictions: (batch, experts) each expert head's output for `target`.
        target: (batch,) explained output index (0 for regression; the predicted class unless given).
        convergence_delta: (batch,) captum's completeness gap |sum(attributions) - (f(x) - f(flat record))| of the
            ensemble; large when a non-differentiable expert moves the output.
        notes: human-readable caveats, keyed by expert name.
    """

    saliency: np.ndarray
    expert_saliency: dict[str, np.ndarray | None]
    gate_weights: np.ndarray
    prediction: np.ndarray
    expert_predictions: np.ndarray
    target: np.ndarray
    convergence_delta: np.ndarray
    expert_names: list[str]
    notes: dict[str, str] = field(default_factory=dict)


class _EnsembleFromNormalized(torch.nn.Module):
    """z-scored input (batch, leads, samples) -> the ensemble logits of task `task`."""

    def __init__(self, model, task: str):
        super().__init__()
        self.model, self.task = model, task

    def forward(self, normalized: torch.Tensor) -> torch.Tensor:
        features = self.model.compute_normalized_features(normalized)
        return self.model.tasks[self.task](features.expert_embeddings, features.gate_inputs).logits


class _ExpertFromNormalized(torch.nn.Module):
    """z-scored input -> one expert head's own output: the expert, its head and label scaling, nothing else."""

    def __init__(self, model, name: str, task: str):
        super().__init__()
        self.model, self.name = model, name
        self.ensemble = model.tasks[task]  # the task's heads and label scaling

    def forward(self, normalized: torch.Tensor) -> torch.Tensor:
        embedding = self.model.experts[self.name](normalized)
        return self.ensemble.to_label_units(self.ensemble.heads[self.name](embedding.float()))


def explain(
    model,
    input_values: torch.Tensor,
    target: int | Sequence[int] | None = None,
    n_steps: int = 32,
    internal_batch_size: int = 16,
    experts: bool = True,
    task: str | None = None,
) -> EnECGExplanation:
    """Integrated gradients (`n_steps` Gauss-Legendre steps) of an EnECG model's prediction.

    Attribution is to the record as the experts see it, after the model's normalisation (`config.normalization`),
    from a flat (all-zero) normalised record. The model z-scores its input, so it cannot tell a record from a scaled
    copy: on the raw signal the straight path from zero would change the output only in a vanishing interval near
    zero, which no quadrature resolves. In the normalised view the path is smooth and the attributions add up to
    f(x) - f(flat record) (captum's convergence delta measures the gap). Experts that normalise again inside
    (MOMENT's and TEMPO's RevIN) are scale-invariant too, so their share is poorly resolved: the delta then stays
    large whatever `n_steps`; read their maps as qualitative.

    Args:
        model: an `EnECGModel` (put in eval mode here; deterministic).
        input_values: (batch, leads, samples) float tensor in mV, as `model.forward` takes it.
        target: output index to explain; default 0 for regression and the predicted class for classification.
        n_steps, internal_batch_size: captum's IG settings (more steps: smaller convergence delta, more time).
        experts: also attribute each differentiable expert's own head output.
        task: the task to explain (default: the model's first, a single-task model's only task).
    """
    attr = _require("captum.attr")
    model.eval()
    from ..denormal_enecg import flush_denormals
    from ..signal_enecg import normalize_ecg

    inputs = torch.as_tensor(input_values, dtype=torch.float32)
    if inputs.dim() == 2:
        inputs = inputs[None]
    task = _task_to_explain(model, task)
    output = _task_output(model, inputs, task)
    batch = inputs.shape[0]
    targets = _targets(model, task, output.logits, target, batch)
    normalized = normalize_ecg(inputs, model.config.normalization)
    ig = attr.IntegratedGradients(_EnsembleFromNormalized(model, task))
    with flush_denormals():  # the backward passes too (the experts' forward sets it for their own part only)
        saliency, delta = ig.attribute(normalized, baselines=torch.zeros_like(normalized), target=targets,
                                       n_steps=n_steps, internal_batch_size=internal_batch_size,
                                       return_convergence_delta=True)
    expert_saliency, notes = _expert_saliency(attr, model, task, normalized, targets, n_steps, internal_batch_size,
                                              experts)
    rows = torch.arange(batch)
    return EnECGExplanation(
        saliency=saliency.detach().numpy(),
        expert_saliency=expert_saliency,
        gate_weights=output.gate_weights.numpy(),
        prediction=output.logits[rows, targets].numpy(),
        expert_predictions=output.expert_logits[rows, :, targets].numpy(),
        target=targets.numpy(),
        convergence_delta=delta.detach().abs().numpy(),
        expert_names=list(model.expert_names),
        notes=notes,
    )


def _task_to_explain(model, task: str | None) -> str:
    """The task to explain: `task`, or the model's first.

    Raises:
        ValueError: `task` is not one of the model's tasks.
    """
    task = task or model.config.task_names[0]
    if task not in model.config.task_names:
        raise ValueError(f"task {task!r} is not one of the model's tasks {model.config.task_names}")
    return task


def _task_output(model, inputs: torch.Tensor, task: str):
    """The `task`'s output on `inputs` (batch, leads, samples), without gradients: its `logits`, `expert_logits` and
    `gate_weights`."""
    with torch.no_grad():
        return model.forward_tasks(input_values=inputs)[task]


def _targets(model, task: str, logits: torch.Tensor, target: int | Sequence[int] | None,
             batch: int) -> torch.Tensor:
    """(batch,) output index to explain per record: `target` if given, else 0 for regression and the class of the
    highest logit (`logits`: (batch, classes)) for classification."""
    if target is not None:
        return torch.as_tensor(target, dtype=torch.long).expand(batch).clone()
    problem_type = model.tasks[task].task_config.problem_type
    return torch.zeros(batch, dtype=torch.long) if problem_type == "regression" else logits.argmax(-1)


def _expert_saliency(attr, model, task: str, normalized: torch.Tensor, targets: torch.Tensor, n_steps: int,
                     internal_batch_size: int, experts: bool) -> tuple[dict[str, np.ndarray | None], dict[str, str]]:
    """Integrated gradients of each differentiable expert head's own output (only when `experts`), from the flat
    record to `normalized` (batch, leads, samples).

    Returns:
        Expert name -> (batch, leads, samples) saliency, or `None` for an expert that is not differentiable; and the
        notes: each such expert's reason, and under "ensemble" which experts the ensemble saliency leaves out.
    """
    from ..denormal_enecg import flush_denormals

    notes = {}
    expert_saliency: dict[str, np.ndarray | None] = {}
    for name, expert in model.experts.items():
        # An expert whose embedding is not a differentiable function of the input (`EnECGExpert.DIFFERENTIABLE`) has
        # its saliency reported as missing, with the expert's reason, rather than as zeros.
        if not expert.DIFFERENTIABLE:
            expert_saliency[name] = None
            notes[name] = expert.NOT_DIFFERENTIABLE_REASON
        elif experts:
            path_ig = attr.IntegratedGradients(_ExpertFromNormalized(model, name, task))
            with flush_denormals():
                expert_saliency[name] = path_ig.attribute(normalized, baselines=torch.zeros_like(normalized),
                                                          target=targets, n_steps=n_steps,
                                                          internal_batch_size=internal_batch_size).detach().numpy()
    if any(saliency is None for saliency in expert_saliency.values()):
        notes["ensemble"] = ("the ensemble saliency covers the differentiable experts and the gate; "
                             f"{sorted(n for n, s in expert_saliency.items() if s is None)} add to the prediction "
                             "without attribution")
    return expert_saliency, notes


# ------------------------------------------------------------------------------------------------ plots
def _pyplot():
    matplotlib = _require("matplotlib")
    matplotlib.use("Agg")  # files only; no display on servers
    import matplotlib.pyplot as plt

    return plt


def _smoothed_magnitude(saliency: np.ndarray, width: int) -> np.ndarray:
    """|attribution| smoothed over `width` samples and scaled to [0, 1] over all leads (for colouring)."""
    from scipy.ndimage import uniform_filter1d

    magnitude = uniform_filter1d(np.abs(saliency), size=max(1, width), axis=-1)
    top = magnitude.max()
    return magnitude / top if top > 0 else magnitude


def plot_ecg(
    signal: np.ndarray,
    lead_names: Sequence[str],
    sampling_rate: float,
    saliency: np.ndarray | None = None,
    title: str | None = None,
    axes: Any = None,
    path: str | Path | None = None,
):
    """A 12-lead ECG (6 x 2 panels, time in s, mV), each trace coloured by the smoothed |saliency| when given.

    Args:
        signal: (leads, samples) in mV. saliency: same shape, or None for a plain plot.
        axes: 12 matplotlib axes to draw on (default: a new figure). path: write a PNG there.
    Returns:
        The matplotlib Figure.
    """
    plt = _pyplot()
    signal = np.asarray(signal, dtype=np.float32)
    if axes is None:
        figure, grid = plt.subplots(6, 2, figsize=(14, 10), sharex=True, constrained_layout=True)
        axes = grid.T.reshape(-1)  # column-major: I-aVF left, V1-V6 right, as ECG printouts
    else:
        figure = axes[0].figure
    time = np.arange(signal.shape[1]) / float(sampling_rate)
    colour = _smoothed_magnitude(saliency, int(sampling_rate * 0.04)) if saliency is not None else None
    for lead, ax in enumerate(axes[: signal.shape[0]]):
        ax.plot(time, signal[lead], color="black", linewidth=0.7, zorder=2)
        if colour is not None:
            # Saliency as a heat band behind the trace: readable however small the attribution of a lead is.
            low, high = float(signal[lead].min()), float(signal[lead].max())
            pad = 0.1 * (high - low) + 1e-3
            ax.imshow(colour[lead][None, :], aspect="auto", cmap="Reds", vmin=0.0, vmax=1.0, alpha=0.85, zorder=1,
                      extent=(time[0], time[-1], low - pad, high + pad), interpolation="nearest")
            ax.set_ylim(low - pad, high + pad)
        ax.set_ylabel(f"{lead_names[lead]}\nmV", rotation=0, ha="right", va="center", fontsize=9)
        ax.grid(True, color="#f3c6c6", linewidth=0.5)
    for bottom in (5, 11)[: len(axes) // 6]:
        axes[bottom].set_xlabel("time (s)")
    if title:
        figure.suptitle(title)
    if path is not None:
        figure.savefig(path, dpi=90)
    return figure


def plot_gate_weights(weights: dict[str, float], ax: Any = None, path: str | Path | None = None):
    """Horizontal bars of the gate weight of each expert, with the value printed. Returns the Figure."""
    plt = _pyplot()
    if ax is None:
        figure, ax = plt.subplots(figsize=(6, 0.5 + 0.45 * len(weights)), constrained_layout=True)
    else:
        figure = ax.figure
    names, values = list(weights), [float(v) for v in weights.values()]
    bars = ax.barh(names[::-1], values[::-1], color="#3b6ea8")
    ax.bar_label(bars, labels=[f"{v:.3f}" for v in values[::-1]], padding=3, fontsize=9)
    ax.set_xlim(0, max(1.0, max(values) * 1.15))
    ax.set_xlabel("gate weight")
    ax.set_title("expert gate weights")
    if path is not None:
        figure.savefig(path, dpi=90)
    return figure


def plot_explanation(
    signal: np.ndarray,
    explanation: EnECGExplanation,
    index: int = 0,
    lead_names: Sequence[str] | None = None,
    sampling_rate: float = 500.0,
    title: str | None = None,
    path: str | Path | None = None,
):
    """One figure: the 12-lead ECG coloured by the ensemble saliency of record `index`, and its gate weights."""
    plt = _pyplot()
    lead_names = list(lead_names) if lead_names is not None else [f"lead {i + 1}" for i in range(len(signal))]
    figure = plt.figure(figsize=(16, 10), constrained_layout=True)
    grid = figure.add_gridspec(6, 3, width_ratios=[4, 4, 2])
    axes = [figure.add_subplot(grid[row, col]) for col in range(2) for row in range(6)]
    plot_ecg(signal, lead_names, sampling_rate, explanation.saliency[index], axes=axes)
    plot_gate_weights(dict(zip(explanation.expert_names, explanation.gate_weights[index].tolist())),
                      ax=figure.add_subplot(grid[:3, 2]))
    notes = figure.add_subplot(grid[3:, 2])
    notes.axis("off")
    text = [f"prediction: {explanation.prediction[index]:.4g}",
            "red band: |integrated gradients| of the ensemble output (darker = more)"]
    text += [f"{name}: {note}" for name, note in explanation.notes.items()]
    notes.text(0, 1, "\n".join(text), va="top", fontsize=8, wrap=True)
    if title:
        figure.suptitle(title)
    if path is not None:
        figure.savefig(path, dpi=90)
    return figure


def explain_record(model, record: Any, path: str | Path, **prepare_kwargs) -> EnECGExplanation:
    """Read and prepare `record` like the pipeline does, explain it and write the combined PNG to `path`."""
    from ..pipeline_enecg import prepare_record

    prepared = prepare_record(record, model.config, **prepare_kwargs)
    explanation = explain(model, torch.from_numpy(prepared.signal)[None])
    figure = plot_explanation(prepared.signal, explanation, lead_names=model.config.lead_names,
                              sampling_rate=model.config.sampling_rate, title=prepared.source, path=path)
    _pyplot().close(figure)
    return explanation


__all__ = ["EnECGExplanation", "explain", "plot_ecg", "plot_gate_weights", "plot_explanation", "explain_record"]
