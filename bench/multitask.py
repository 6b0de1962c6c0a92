"""A five-task EnECG model against single-task models on LUDB records, with the tiny experts of
hub_configs/multitask.json: inference per record (one record through the five-task model, through one single-task
model and through five, interleaved, one thread, medians after a warm-up), training cost (the frozen expert pass: once
for the five-task model, once per single-task model; plus the fits of heads and gate, the same for both), and quality
per task (subject-wise CV of each task fitted in the five-task model and as a single-task model on the same features).

    python bench/multitask.py [--records 200] [--folds 3] [--repeats 5] [--update-docs]
"""

from __future__ import annotations

import json
import os
import statistics
import time

import numpy as np
import torch

from enecg_hf import EnECGConfig, EnECGModel
from enecg_hf.data import TASKS, subject_kfold
from enecg_hf.features import FeatureTable
from enecg_hf.training import FitSettings, cross_validate, summarize
from enecg_hf.training.labels import encode_labels
from harness import REPO, interleaved, ludb, markdown_table, parser, render_only, save


def models() -> tuple[EnECGModel, dict[str, EnECGModel]]:
    multi = json.loads((REPO / "hub_configs" / "multitask.json").read_text())
    shared = {k: v for k, v in multi.items() if k != "tasks"}
    single = {task["name"]: EnECGModel(EnECGConfig(**(shared | TASKS[task["name"]].config_fields()))).eval()
              for task in multi["tasks"]}
    return EnECGModel(EnECGConfig(**multi)).eval(), single


@torch.no_grad()
def inference(multi, single, signals: torch.Tensor, repeats: int) -> dict:
    calls = {"five_task": multi, "one_single_task": next(iter(single.values())),
             "five_single_task": lambda x: [model(x) for model in single.values()]}
    seconds = interleaved(calls, [record[None] for record in signals], repeats)
    median = {k: statistics.median(v) for k, v in seconds.items()}
    return {"seconds_per_record": median, "five_task_over_one_single": median["five_task"] / median["one_single_task"],
            "five_single_over_five_task": median["five_single_task"] / median["five_task"]}


def quality_and_training(multi, single, dataset, signals, folds: int, settings: FitSettings) -> dict:
    start = time.perf_counter()
    table = FeatureTable.from_model(multi, signals, torch.zeros(len(signals)), np.asarray(dataset["subject_id"]))
    expert_seconds = time.perf_counter() - start
    result = {"records": len(signals), "expert_pass_seconds": expert_seconds, "tasks": {}}
    for name in ("rr_interval", "age", "sex", "arrhythmia"):
        keep, labels = encode_labels(dataset, TASKS[name])
        task_table, cv = table.select(keep, labels), subject_kfold(dataset.select(keep), folds, seed=0)
        row = result["tasks"][name] = {"records": len(keep)}
        for variant, model in (("five_task", multi.tasks[name]), ("single_task", single[name])):
            start = time.perf_counter()
            scores = summarize(cross_validate(model, task_table, cv, TASKS[name], settings))
            row[variant] = {k: v["mean"] for k, v in scores.items()}
            row[f"{variant}_fit_seconds"] = time.perf_counter() - start
    fits = sum(row["five_task_fit_seconds"] for row in result["tasks"].values())
    result["training_seconds"] = {"five_task": expert_seconds + fits, "five_single_task": 5 * expert_seconds + fits}
    return result


def markdown(results: dict) -> str:
    inf, train, fit = results["inference"], results["quality"], results["quality"]["training_seconds"]
    ms = [f"{1000 * inf['seconds_per_record'][k]:.0f}" for k in ("five_task", "one_single_task", "five_single_task")]
    cost = markdown_table(["", "five-task model", "one single-task model", "five single-task models"], [
        ["inference, ms per record (median)", *ms],
        ["inference, ratio", 1, f"five-task ÷ one single-task: {inf['five_task_over_one_single']:.2f}×",
         f"five single-task ÷ five-task: {inf['five_single_over_five_task']:.2f}×"],
        [f"training, s (expert pass {train['expert_pass_seconds']:.0f} s + fits)", f"{fit['five_task']:.0f}", "–",
         f"{fit['five_single_task']:.0f} (each model its own expert pass)"]])
    rows = []
    for name, row in train["tasks"].items():
        metric = "mae" if TASKS[name].is_regression else "auroc"
        rows.append([name, row["records"], metric, f"{row['five_task'][metric]:.4g}",
                     f"{row['single_task'][metric]:.4g}"])
    quality = markdown_table(["task", "records", "metric", "five-task (CV mean)", "single-task (CV mean)"], rows,
                             "lrlrr")
    return (f"Measured {results['date']} on {results['machine']}; {train['records']} LUDB records, tiny experts.\n\n"
            f"{cost}\n\n{quality}")


def main() -> None:
    p = parser(__doc__.split("\n\n")[0], "multitask.json")
    p.add_argument("--records", type=int, default=200)
    p.add_argument("--inference-records", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--folds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=100)
    args = p.parse_args()
    if render_only(args, markdown, "multitask"):
        return
    torch.set_num_threads(1)
    torch.manual_seed(0)
    multi, single = models()
    dataset, signals = ludb(args.records)
    results = {"date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} CPU cores, 1 torch thread",
               "inference": inference(multi, single, signals[: args.inference_records], args.repeats),
               "quality": quality_and_training(multi, single, dataset, signals, args.folds,
                                               FitSettings(epochs=args.epochs))}
    save(results, args.output, markdown(results), "multitask" if args.update_docs else None)


if __name__ == "__main__":
    main()
