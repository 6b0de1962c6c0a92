"""The Hub-ready output folder, the push to the Hub, and the printed summary."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from ..modeling_enecg import EnECGModel
from .arguments import TrainScriptArguments
from .errors import TrainingSetupError
from .files import write_json_atomic
from .model_card import random_weight_experts, render_model_card
from .scoring import best_expert
from .serving_export import export_serving_files

logger = logging.getLogger(__name__)


def save_output_folder(model: EnECGModel, output_dir: Path, args: TrainScriptArguments, metrics: dict[str, Any],
                       records) -> None:
    """The Hub-ready folder: model (safetensors with the un-merged adapter, code, adapter/), metrics, arguments, model card, serving."""
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(output_dir))
    write_json_atomic(output_dir / "metrics.json", metrics)
    write_json_atomic(output_dir / "training_args.json", {**args.to_dict(), "enecg_hf_version": _version()})
    sources = sorted({str(s) for s in records.unique("source")}) if "source" in records.column_names else []
    card = render_model_card(model, metrics, args.to_dict(), dataset_sources=sources,
                             random_experts=random_weight_experts(model),
                             model_id=args.hub_model_id or output_dir.name)
    tmp = output_dir / ".README.md.tmp"
    tmp.write_text(card)
    os.replace(tmp, output_dir / "README.md")
    export_serving_files(model, output_dir)
    logger.info("Serving files (pipeline, handler.py, requirements) exported to %s", output_dir)


def _version() -> str:
    from .. import __version__

    return __version__


# Work folders inside OUT that must never be uploaded.
HUB_IGNORE_PATTERNS = ["checkpoints/*", "checkpoints/**", "cache/*", "cache/**", "logs/*", "logs/**", ".*"]


def push_folder(output_dir: Path, args: TrainScriptArguments) -> str:
    """Upload the finished folder (without checkpoints, cache and logs). Fails with a clear message, after the local
    folder is complete, when the Hub cannot be reached."""
    from huggingface_hub import create_repo, upload_file, upload_folder

    repo_id = args.hub_model_id or output_dir.name
    adapter_config = output_dir / "adapter" / "adapter_config.json"
    try:
        url = create_repo(repo_id, private=args.hub_private, exist_ok=True)
        upload_folder(repo_id=url.repo_id, folder_path=str(output_dir), commit_message="Upload EnECG model trained with "
                      "enecg_hf", ignore_patterns=HUB_IGNORE_PATTERNS + ["adapter/adapter_config.json"])
        if adapter_config.is_file():
            # The uploaded adapter names the Hub repo as its base model; the local copy keeps naming the local folder.
            hub_adapter_config = {**json.loads(adapter_config.read_text()), "base_model_name_or_path": url.repo_id}
            upload_file(path_or_fileobj=(json.dumps(hub_adapter_config, indent=2, sort_keys=True) + "\n").encode(),
                        path_in_repo="adapter/adapter_config.json", repo_id=url.repo_id,
                        commit_message="Adapter config naming this repository as its base model")
    except Exception as err:  # network, auth, offline mode: all end the same way for the user
        raise TrainingSetupError(
            f"push_to_hub failed for {repo_id!r}: {type(err).__name__}: {err}\n"
            f"The local folder {output_dir.resolve()} is complete; push it later with\n"
            f"  hf upload {repo_id} {output_dir} --exclude 'checkpoints/*' --exclude 'cache/*' --exclude 'logs/*'"
        ) from None
    logger.info("Pushed %s to https://huggingface.co/%s", output_dir, url.repo_id)
    return url.repo_id


def metric_unit(name: str, unit: str | None) -> str:
    """The unit of a metric of a label measured in `unit`: MAE and RMSE in it, MSE in its square, R² and the
    classification metrics in none."""
    if not unit:
        return ""
    return {"mae": f" {unit}", "rmse": f" {unit}", "mse": f" {unit}²"}.get(name, "")


def ensemble_versus_experts(block: dict[str, Any]) -> str:
    """One line: the headline metric (MAE, else AUROC) of the ensemble, its best expert's own head and the heads'
    plain average, in the same folds; "" without per-expert scores."""
    best = best_expert(block)
    if best is None or best["metric"] not in block["cv"]:
        return ""
    name = best["metric"]
    uniform = block["cv_uniform"].get(name, {}).get("mean", float("nan"))
    return (f"{name}: ensemble {block['cv'][name]['mean']:.4g}, best expert {best['name']} "
            f"{best['cv'][name]['mean']:.4g}, uniform average {uniform:.4g}")


def print_summary(metrics: dict[str, Any], output_dir: Path) -> None:
    """What a run printed last: each task's CV metrics beside the baseline's, and the in-sample final scores."""
    blocks = list(metrics["tasks"].values()) if "tasks" in metrics else [metrics]
    tasks = ", ".join(f"{m['label']} ({m['problem_type']})" for m in blocks)
    lines = [f"EnECG training: {tasks}, "
             f"{metrics['records']} records, {len(blocks[0]['folds'])}-fold CV, {metrics['train_seconds']} s"]
    for block in blocks:
        unit = block.get("unit")
        if len(blocks) > 1:
            lines.append(f" {block['label']} ({block['records']} records):")
        for name, summary in block["cv"].items():
            baseline = block["cv_baseline"].get(name)
            extra = f"   (baseline {baseline['mean']:.4g} ± {baseline['std']:.3g})" if baseline else ""
            lines.append(f"  CV {name:>9}: {summary['mean']:.4g} ± {summary['std']:.3g}{metric_unit(name, unit)}{extra}")
        if ensemble_versus_experts(block):
            lines.append("  " + ensemble_versus_experts(block))
        if block.get("cv_source"):
            by_source = block["cv_source"]
            lines.append(f"  leave-one-source-out ({len(by_source['groups'])} sources, {by_source['records']} "
                         "held-out records; pooled, and mean ± std over sources):")
            for name, value in by_source["pooled"].items():
                summary, baseline = by_source["mean"].get(name), by_source["baseline_pooled"].get(name)
                per_source = f"{summary['mean']:.4g} ± {summary['std']:.3g}" if summary else "n/a"
                lines.append(f"  LOSO {name:>7}: {value:.4g}{metric_unit(name, unit)} (per source {per_source})"
                             f"   (baseline {baseline:.4g})")
        lines.append("  final (in-sample): " + ", ".join(
            f"{name}={value:.4g}{metric_unit(name, unit)}" for name, value in block["final"]["metrics"].items()))
    lines.append(f"  model folder: {output_dir.resolve()}")
    print("\n".join(lines), flush=True)
