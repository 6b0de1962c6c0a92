"""EnECG demo: upload an ECG record (or pick a simulated one), see the 12-lead plot with saliency, the prediction, the
gate weight of every expert and each expert's own prediction. Runs as a Hugging Face Space (see README.md here).

    python space/app.py                                  # http://127.0.0.1:7860
    python space/app.py --model you/enecg-rr             # the model to serve: a Hub id or a folder
    ENECG_MODEL=you/enecg-rr python space/app.py         # the same, for a Space (set it as a variable)

The app serves the one model it was started with: loading a model runs its code (`trust_remote_code=True`), so the
choice belongs to whoever starts the app, never to a visitor (the page shows the model but cannot change it). It reads
only files uploaded to it: each run keeps its uploads in a folder of its own (`GRADIO_TEMP_DIR`, see `main`), Gradio
refuses requests that name any other file, and `gather_record` checks the same again.
Explanations and plots come from `enecg_hf.tools.explain`. All the work happens in plain functions
(`load_pipeline`, `gather_record`, `analyse`) that the tests call without a browser.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home (and none possible offline)

try:
    import enecg_hf  # noqa: F401
except ImportError:  # running from a checkout without installing: use the package next to this folder
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import enecg_hf  # noqa: F401

import numpy as np

from enecg_hf.data.simulate import simulate_record
from enecg_hf.pipeline_enecg import PIPELINE_TASK
from enecg_hf.shipped_models import DEFAULT_MODEL as DEFAULT_SHIPPED
from enecg_hf.shipped_models import resolve_model, shipped_model_names
from enecg_hf.tools.explain import explain, plot_ecg, plot_gate_weights


# $ENECG_MODEL, else the model shipped with the package (age, sex, rhythm and RR from real records).
DEFAULT_MODEL = os.environ.get("ENECG_MODEL") or (DEFAULT_SHIPPED if DEFAULT_SHIPPED in shipped_model_names() else "")
RECORD_SUFFIXES = (".hea", ".dat", ".mat", ".npy", ".csv")
EXAMPLE_SEED = 2024
EXAMPLES = {f"simulated #{i}": i for i in range(4)}


@functools.lru_cache(maxsize=4)
def load_pipeline(model: str):
    """The model's pipeline (cached per model id / folder)."""
    from transformers import pipeline

    model = (model or "").strip()
    if not model:
        raise ValueError("The app was started without a model: start it with `--model FOLDER_OR_HUB_ID` (or "
                         "ENECG_MODEL), e.g. the folder `python train.py` writes")
    resolved = resolve_model(model)
    if resolved != model:  # a model shipped with the package, whose code is the installed package
        return pipeline(PIPELINE_TASK, model=resolved)
    try:
        return pipeline(model=model, trust_remote_code=True)
    except (OSError, ValueError, RuntimeError) as error:
        raise ValueError(f"Could not load the model {model!r}: {error}") from None


def example_record(name: str) -> tuple[np.ndarray, dict[str, Any]]:
    """A bundled simulated 12-lead record (made by `enecg_hf.data.simulate`, nothing stored) and its true labels."""
    return simulate_record(EXAMPLES[name], seed=EXAMPLE_SEED)


def gradio_upload_folder() -> Path:
    """Where Gradio keeps uploaded files: `GRADIO_TEMP_DIR`, else `<system temp folder>/gradio` (Gradio's rule)."""
    return Path(os.environ.get("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir(), "gradio"))


def private_upload_folder() -> str:
    """A new folder inside Gradio's upload folder for one run of the app. `main` points `GRADIO_TEMP_DIR` at it, so
    that Gradio accepts, and the app reads, only files uploaded to this run, not what other apps or earlier runs left
    in a shared upload folder."""
    parent = gradio_upload_folder()
    parent.mkdir(parents=True, exist_ok=True)
    return tempfile.mkdtemp(prefix="enecg-space-", dir=parent)


def gather_record(files: Sequence[str] | None, workdir: str | Path, upload_folder: str | Path) -> str:
    """The record to read from uploaded files: WFDB `.hea` + `.dat`, Challenge `.hea` + `.mat`, or one `.npy`/`.csv`.

    Only files inside `upload_folder` (symlinks and `..` resolved) are read: a request naming any other file of the
    server is refused, without saying whether it exists. Uploads arrive in separate folders; WFDB needs header and
    signal side by side under their original names, so they are copied into `workdir` first. Returns the path to give
    the pipeline."""
    paths = [Path(f) for f in files or []]
    if not paths:
        raise ValueError("Upload a record (.hea with its .dat or .mat, or a .npy/.csv file) or pick an example")
    allowed = Path(upload_folder).resolve()
    if not all(path.resolve().is_relative_to(allowed) for path in paths):
        raise ValueError("Only files uploaded to this page are read; the request named another file")
    unknown = [p.name for p in paths if p.suffix.lower() not in RECORD_SUFFIXES]
    if unknown:
        raise ValueError(f"Not an ECG record file: {unknown}. Accepted: {', '.join(RECORD_SUFFIXES)}")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    for path in paths:
        shutil.copy(path, workdir / path.name)
    headers = [p for p in paths if p.suffix.lower() == ".hea"]
    arrays = [p for p in paths if p.suffix.lower() in (".npy", ".csv")]
    if len(headers) > 1 or len(arrays) > 1 or (headers and arrays):
        raise ValueError("Upload one record at a time (one .hea with its signal file, or one .npy/.csv)")
    if headers:
        return str(workdir / headers[0].name)
    if arrays:
        return str(workdir / arrays[0].name)
    raise ValueError("A .dat or .mat signal file needs its .hea header: upload both")


def _format_prediction(result: dict[str, Any], truth: Any = None, task: str | None = None) -> str:
    """One task's prediction as Markdown; `task` names a classification task of a multi-task model."""
    if "value" in result:
        text = f"### {result['label']}: **{result['value']:.1f} {result.get('unit') or ''}**"
        if truth is not None:
            text += f"  (true value {truth:.1f})"
    else:
        scores = ", ".join(f"{s['label']} {s['score']:.2f}" for s in result["scores"])
        text = f"### {task + ': ' if task else ''}{result['label']} ({result['score']:.2f})\n\nscores: {scores}"
        if truth is not None:
            text += f"  (true class {truth})"
    return text


def analyse(model: str, files: Sequence[str] | None = None, example: str | None = None,
            sampling_rate: float | None = None, lead_names: str | None = None,
            with_saliency: bool = True, upload_folder: str | Path | None = None) -> dict[str, Any]:
    """Everything the page shows for one record: prediction text, gate-weight rows, expert rows, figures.

    `files` must lie inside `upload_folder` (default: Gradio's, [`gradio_upload_folder`]). Raises ValueError with a
    readable message for bad files, unusable records and models that do not load; messages name files by their
    names, not by the server's folders."""
    ecg = load_pipeline(model)
    config = ecg.model.config
    options = {}
    if sampling_rate:
        options["sampling_rate"] = float(sampling_rate)
    if lead_names and lead_names.strip():
        options["lead_names"] = [name.strip() for name in lead_names.split(",") if name.strip()]
    truth = None
    with tempfile.TemporaryDirectory(prefix="enecg-upload-") as workdir:
        if files:
            record: Any = gather_record(files, workdir, upload_folder or gradio_upload_folder())
        elif example:
            signal, labels = example_record(example)
            record, options = signal, {"sampling_rate": 500}
            truth = {}
            for task in config.task_configs:
                value = labels.get(task.label_name)
                if isinstance(value, int) and task.problem_type != "regression":  # sex, potassium_flag: class index
                    value = {int(k): v for k, v in task.id2label.items()}.get(value, value)
                truth[task.label_name] = value
        else:
            raise ValueError("Upload a record or pick a simulated example")
        # The pipeline's own steps, run one by one so the record is read and prepared once for prediction and plot.
        try:
            model_inputs = next(ecg.preprocess(record, **options))  # a whole record is one model input
        except ValueError as error:
            raise ValueError(str(error).replace(f"{workdir}{os.sep}", "")) from None
        prepared = model_inputs["input_values"]
        result = ecg.postprocess([ecg.forward(model_inputs)])
    # One prediction per task, side by side (a single-task model is one task).
    tasks = result["tasks"] if "tasks" in result else {config.task_names[0]: result}
    explanation = explain(ecg.model, prepared, n_steps=16, experts=False) if with_saliency else None
    signal = prepared[0].numpy()
    ecg_figure = plot_ecg(signal, config.lead_names, config.sampling_rate,
                          explanation.saliency[0] if explanation is not None else None,
                          title=f"{Path(str(result['source'])).name}: 12 leads as the model sees them"
                          + (" (red: integrated-gradients saliency"
                             + (f" of {next(iter(tasks))}" if len(tasks) > 1 else "") + ")"
                             if explanation is not None else ""))
    names = list(ecg.model.expert_names)
    gate_rows = [[name, *(round(task["gate_weights"][name], 4) for task in tasks.values())] for name in names]
    expert_rows = [
        [name, *(round(p, 3) if isinstance(p, float) else f"{p['label']} ({p['score']:.2f})"
                 for p in (task["expert_predictions"][name] for task in tasks.values()))]
        for name in names
    ]
    text = "\n\n".join(_format_prediction(task, (truth or {}).get(name), name if len(tasks) > 1 else None)
                         for name, task in tasks.items())
    if result.get("warnings"):
        text += "\n\n" + "\n".join(f"- ⚠ {w}" for w in result["warnings"])
    return {"prediction": text, "gate_rows": gate_rows, "expert_rows": expert_rows,
            "headers": list(tasks) if len(tasks) > 1 else None, "ecg_figure": ecg_figure,
            "gate_figure": _gate_figure(tasks), "result": result}


def _gate_figure(tasks: dict[str, dict[str, Any]]):
    """The gate weights of every task, one panel per task side by side."""
    import matplotlib.pyplot as plt

    if len(tasks) == 1:
        return plot_gate_weights(next(iter(tasks.values()))["gate_weights"])
    experts = len(next(iter(tasks.values()))["gate_weights"])
    figure, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 0.5 + 0.45 * experts),
                                constrained_layout=True, sharey=True)
    for ax, (name, task) in zip(axes, tasks.items()):
        plot_gate_weights(task["gate_weights"], ax=ax)
        ax.set_title(name)
    return figure


def build_demo(model: str = DEFAULT_MODEL):
    """The page for `model` (a folder or Hub id chosen by whoever starts the app; visitors cannot change it)."""
    import gradio as gr
    import matplotlib.pyplot as plt

    upload_folder = gradio_upload_folder()  # where this page's uploads go (Gradio reads GRADIO_TEMP_DIR as it starts)

    def run(files, example, sampling_rate, lead_names, with_saliency):
        plt.close("all")
        try:
            out = analyse(model, [f if isinstance(f, str) else f.name for f in files or []], example or None,
                          sampling_rate or None, lead_names, with_saliency, upload_folder)
        except (ValueError, OSError) as error:
            return (f"**Error:** {error}", None, None, None, None, "error")
        gate, experts = out["gate_rows"], out["expert_rows"]
        if out["headers"]:  # a multi-task model: one column per task
            gate = {"headers": ["expert", *out["headers"]], "data": gate}
            experts = {"headers": ["expert", *out["headers"]], "data": experts}
        return (out["prediction"], gate, experts, out["ecg_figure"], out["gate_figure"], "ok")

    with gr.Blocks(title="EnECG demo") as demo:
        gr.Markdown("# EnECG: a mixture of frozen ECG experts\nUpload a 12-lead record or pick a simulated one. "
                    "Research demo, **not a medical device**.")
        with gr.Row():
            with gr.Column(scale=1):
                gr.Markdown(f"Model: `{model or '(none: start the app with --model)'}`", elem_id="model")
                files = gr.File(file_count="multiple", label="Record files (.hea + .dat/.mat, or .npy/.csv)",
                                elem_id="files")
                example = gr.Dropdown(choices=[""] + list(EXAMPLES), value="", label="…or a simulated example",
                                      elem_id="example")
                sampling_rate = gr.Number(value=None, elem_id="rate",
                                          label="Sampling rate of .npy/.csv in Hz (0: WFDB headers give it)")
                lead_names = gr.Textbox(label="Lead names of .npy/.csv rows (comma-separated; default standard 12)")
                with_saliency = gr.Checkbox(value=True, label="Saliency (integrated gradients)")
                button = gr.Button("Predict", variant="primary", elem_id="predict")
            with gr.Column(scale=2):
                prediction = gr.Markdown(elem_id="prediction")
                status = gr.Textbox(visible=False, elem_id="status")
                with gr.Row():
                    gate_table = gr.Dataframe(headers=["expert", "gate weight"], label="Gate weights",
                                              elem_id="gate-weights", interactive=False)
                    expert_table = gr.Dataframe(headers=["expert", "own prediction"], label="Each expert's prediction",
                                                elem_id="expert-predictions", interactive=False)
                gate_plot = gr.Plot(label="Gate weights", elem_id="gate-plot")
        ecg_plot = gr.Plot(label="12-lead ECG", elem_id="ecg-plot")
        button.click(run, [files, example, sampling_rate, lead_names, with_saliency],
                     [prediction, gate_table, expert_table, ecg_plot, gate_plot, status])
    return demo


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="EnECG demo: serve one model folder or Hub id.")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="the model to serve: a folder, a Hub id or a shipped model's name (default: $ENECG_MODEL, "
                        "else enecg-base, shipped with the package)")
    args = parser.parse_args(argv)
    # Before the page is built: Gradio takes its upload folder from GRADIO_TEMP_DIR when it starts.
    os.environ["GRADIO_TEMP_DIR"] = private_upload_folder()
    build_demo(args.model).launch(server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))


if __name__ == "__main__":
    main()
