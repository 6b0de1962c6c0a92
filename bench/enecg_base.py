"""The shipped model's recipe (`enecg-base`, `make model`) on ../shared/data: learning curve and routing.

    python bench/enecg_base.py --update-docs                              # every part (~2 h on one core)
    python bench/enecg_base.py --fractions 1 --output a.json              # a part per core...
    python bench/enecg_base.py --fractions 0.25,0.5 --no-analyses --output b.json
    python bench/enecg_base.py --combine a.json b.json --update-docs      # ...merged

Everything is train.py's: the records of `make model` (`enecg_hf.tools.build_model.SOURCES`, a recording that two
folders publish kept once), hub_configs/enecg_base.json, each task's five subject-wise folds (seed 42: the folds of
the shipped model's CV) and `fit_enecg` with train.py's default settings under the fit names train.py gives them, so
that the 100 % rows repeat the shipped model's CV (checked against its metrics.json).

1. Learning curve: each outer fold's training subjects subsampled to 25 / 50 / 100 % (nested: the 25 % are part of
   the 50 %), the test fold unchanged; EnECG, each expert's own head, the uniform average and the trivial baseline.
2. Routing (100 %): the default gate (stacked, input-independent weights: train.py's cross-validation keeps its
   input-dependent part at 0 epochs here) against the package's gate network (`EnECGGate`, on top of the same
   stacked weights) reading per record (a) 500 samples of lead II (the default gate input), (b) the heads'
   predictions, (c) the experts' standardised embeddings. Each is trained on the heads' out-of-fold predictions of
   the training records (`FitReport.out_of_fold_predictions`, what train.py's gate is fitted on), its epoch count
   chosen by subject-wise inner cross-validation with the one-standard-error rule (train.py's) and, to give routing
   its best chance, the lowest held-out loss; reported: the inner-CV loss and the score on the outer test fold.
   Routing rows score the mixture before the temperature train.py fits afterwards (the same for every router), so a
   multi-class AUROC there can differ a little from the learning curve's calibrated EnECG (rhythm 0.910 vs 0.912).
Calibration is train.py's own (`FitSettings.calibration`): its effect is in the shipped model's metrics.json
(docs/training.md, "The model shipped with the package").
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from enecg_hf.features import feature_store_dir
from enecg_hf.modeling_enecg import EnECGGate, mix_experts
from enecg_hf.tools.build_model import SOURCES, TASKS, build_datasets
from enecg_hf.training import TrainScriptArguments, baseline_predictions, fit_enecg, load_metric, predict, score
from enecg_hf.training.configs import resolve_config_path
from enecg_hf.training.fitting import FitSettings, floored_log_weights, one_standard_error_epoch, subject_folds
from enecg_hf.training.run import build_model_and_features, load_tasks
from enecg_hf.training.scoring import summarize
from harness import DATA_DIR, REPO, machine_info, markdown_table, parser, save


CONFIG = "enecg_base"
FRACTIONS = (0.25, 0.5, 1.0)
SHIPPED_METRICS = REPO / "enecg_hf" / "pretrained" / "enecg-base" / "metrics.json"
HEADLINE = {"regression": "mae", "single_label_classification": "auroc"}
# The routers' training: larger batches than train.py's gate (32) and early ending keep ~25 gate fits per outer fold
# affordable; the epoch count is still chosen by held-out loss.
BATCH, PATIENCE = 128, 20
# Where a router starts: the stacked weights with the package gate's floor, so that an expert stacking left out can
# be routed to (from exactly 0 the softmax gives it no gradient).
WEIGHT_FLOOR = FitSettings().gate_weight_floor
ROUTERS = ("lead_ii", "predictions", "embeddings")  # what the gate network reads
ROUTER_LABELS = {"stacked": "stacked weights only (lead-II gate at 0 epochs)",
                 "stacked_with_floor": f"stacked weights, each at least {WEIGHT_FLOOR:.0%} (where the gates start)",
                 "lead_ii": "gate on lead II (500 samples)", "predictions": "gate on the heads' predictions",
                 "embeddings": "gate on the experts' embeddings"}


# ---------------------------------------------------------------------------------------------------------- setup
def recipe_tasks(folders: list[Path], cache_dir: str | None, task_names: list[str]):
    """train.py's own steps for the shipped recipe (`training.run.load_tasks`, `build_model_and_features`): the tasks
    `task_names` in that order (records, folds, the fit target of the multi-task model, the feature table from the
    feature store under `cache_dir`), the fit settings, the config and the number of records."""
    from accelerate import Accelerator

    args = TrainScriptArguments(config=CONFIG, dataset=[str(f) for f in folders], labels=list(TASKS), folds=5,
                                cache_dir=cache_dir)
    accelerator = Accelerator(cpu=True)
    config_dict = json.loads(resolve_config_path(CONFIG).read_text())
    with tempfile.TemporaryDirectory(prefix="enecg-base-bench-") as scratch:  # (builds only; --dataset folders here)
        dataset, config, tasks = load_tasks(args, accelerator, Path(scratch), config_dict)
    build_model_and_features(args, config, dataset, tasks, accelerator, feature_store_dir(cache_dir))
    by_name = {task.spec.name: task for task in tasks}
    return [by_name[name] for name in task_names], args.fit_settings(), config, len(dataset)


def subsample_subjects(train: np.ndarray, groups: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """The rows of `train` whose subject is among the first `fraction` of its subjects in a seeded order (nested:
    a smaller fraction keeps a prefix of the same order); all of `train` at 1."""
    if fraction >= 1.0:
        return train
    subjects = np.unique(groups[train])
    order = np.random.default_rng(seed).permutation(subjects)
    return train[np.isin(groups[train], order[: max(2, math.ceil(fraction * len(subjects)))])]


# ---------------------------------------------------------------------------------------------------------- routing
def train_router(inputs: torch.Tensor, predictions: torch.Tensor, labels: torch.Tensor, log_weights: torch.Tensor,
                 target, epochs: int, hidden: int, seed: int, check: np.ndarray | None = None,
                 fit: np.ndarray | None = None) -> tuple[EnECGGate, list[float]]:
    """The package's gate network on `inputs` (rows, features), started at `log_weights` and trained on the mixture's
    loss of `predictions` (rows, experts, labels; heads' scale) for at most `epochs` (AdamW as train.py's gate, batches
    of BATCH); with `check`, the held-out loss of those rows before training and after every epoch, ending after
    PATIENCE epochs without a new lowest (the rest of the curve is its last value)."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    router = EnECGGate(inputs.shape[1], hidden, predictions.shape[1])
    router.set_stacked_log_weights(log_weights)
    optimizer = torch.optim.AdamW(router.parameters(), lr=3e-3, weight_decay=0.01)
    fit = np.arange(len(inputs)) if fit is None else fit
    curve = []

    def held_out() -> None:
        if check is not None:
            with torch.no_grad():
                curve.append(float(target.loss_function(mix_experts(predictions[check], router(inputs[check])),
                                                        labels[check])))

    held_out()
    for epoch in range(epochs):
        if check is not None and epoch - int(np.argmin(curve)) > PATIENCE:
            curve += [curve[-1]] * (epochs - epoch)
            break
        order = torch.as_tensor(fit)[torch.randperm(len(fit), generator=generator)]
        for start in range(0, len(order), BATCH):
            batch = order[start : start + BATCH]
            loss = target.loss_function(mix_experts(predictions[batch], router(inputs[batch])), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        held_out()
    return router, curve


def standardized(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """Columns scaled by the training rows' mean and standard deviation (constant columns: 1)."""
    mean, std = train.mean(0), train.std(0)
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    return [(x - mean) / std for x in (train, *others)]


def routing(task, train: np.ndarray, test: np.ndarray, report, settings, config, metric) -> dict:
    """Each router of ROUTERS against the stacked weights alone, on one outer fold (see the module docstring)."""
    target, table, spec = task.target, task.table, task.spec
    with torch.no_grad():
        target.eval()
        test_predictions = target.compute_expert_logits([e[test] for e in table.expert_embeddings]).float()
    train_predictions = report.out_of_fold_predictions.float()
    stacked = torch.tensor([report.stacked_weights[n] for n in target.expert_names])
    log_weights = floored_log_weights(torch.log(stacked), WEIGHT_FLOOR)
    labels_train, labels_test = table.labels[train], table.labels[test].numpy()
    inputs = {
        "lead_ii": (table.gate_inputs[train].float(), table.gate_inputs[test].float()),
        "predictions": tuple(standardized(train_predictions.flatten(1), test_predictions.flatten(1))),
        "embeddings": tuple(standardized(torch.cat([e[train].float() for e in table.expert_embeddings], 1),
                                         torch.cat([e[test].float() for e in table.expert_embeddings], 1))),
    }
    inner = subject_folds(table.groups[train], settings.inner_folds, settings.seed)

    def test_score(weights: torch.Tensor) -> float:  # the mixture before any temperature (see the module docstring)
        logits = target.to_label_units(mix_experts(test_predictions, weights)).numpy()
        return score({"logits": logits, "labels": labels_test}, spec, metric)[HEADLINE[spec.problem_type]]

    floored = torch.softmax(log_weights, 0)
    result = {"stacked": {"test": test_score(stacked.expand(len(test), -1))},
              "stacked_with_floor": {"test": test_score(floored.expand(len(test), -1))}}
    hidden = config.gate_hidden_size
    for name, (x_train, x_test) in inputs.items():
        curves = torch.tensor([train_router(x_train, train_predictions, labels_train, log_weights, target,
                                            settings.gate_epochs, hidden, settings.seed, check=check, fit=fit)[1]
                               for fit, check in inner])  # (inner folds, epochs + 1)
        mean = curves.mean(0)
        rules = {"one_standard_error": one_standard_error_epoch(curves), "lowest": int(mean.argmin())}
        row = {"inner_loss_at_0": float(mean[0]), "inner_loss_lowest": float(mean.min()), "epochs": rules}
        for rule, epochs in rules.items():
            router, _ = train_router(x_train, train_predictions, labels_train, log_weights, target, epochs, hidden,
                                     settings.seed)
            with torch.no_grad():
                row[f"test_{rule}"] = test_score(router(x_test))
        result[name] = row
    return result


# ---------------------------------------------------------------------------------------------------------- the run
def run_task(task, fractions, settings, config, analyses: bool, outer_folds: list[int] | None = None) -> dict:
    """One task's learning curve and routing over `outer_folds` (numbered from 1; default all)."""
    spec, table = task.spec, task.table
    metric = load_metric(spec.problem_type)
    folds = []
    for i, (train, test) in enumerate(task.folds):
        if outer_folds is not None and i + 1 not in outer_folds:
            continue
        fold = {"fold": i + 1, "test_records": int(len(test)), "fractions": {}}
        for fraction in fractions:
            rows = subsample_subjects(train, table.groups, fraction, settings.seed + i)
            started = time.perf_counter()
            report = fit_enecg(task.target, table, rows, settings, name=f"fold-{i + 1}")
            out = predict(task.target, table, test)
            labels = out["labels"]
            fold["fractions"][str(fraction)] = {
                "train_records": int(len(rows)), "train_subjects": int(len(np.unique(table.groups[rows]))),
                "fit_seconds": round(time.perf_counter() - started, 1),
                "enecg": score(out, spec, metric),
                "experts": {n: score({"logits": out["expert_logits"][:, e], "labels": labels}, spec, metric)
                            for e, n in enumerate(task.target.expert_names)},
                "uniform": score({"logits": out["expert_logits"].mean(1), "labels": labels}, spec, metric),
                "baseline": score(baseline_predictions(table.labels[rows].numpy(), labels, spec), spec, metric),
                "stacked_weights": report.stacked_weights, "gate_epochs": report.gate_epochs,
            }
            if fraction == 1.0 and analyses:
                fold["routing"] = routing(task, rows, test, report, settings, config, metric)
            key = HEADLINE[spec.problem_type]
            print(f"[enecg_base] {spec.name} fold {i + 1} {fraction:.0%}: {len(rows)} records, {key} "
                  f"{fold['fractions'][str(fraction)]['enecg'][key]:.4g} ({time.perf_counter() - started:.0f} s)",
                  flush=True)
        folds.append(fold)
    return {"problem_type": spec.problem_type, "records": int(len(task.records)), "experts": task.target.expert_names,
            "folds": folds}


def measure(args) -> dict:
    torch.set_num_threads(1)
    started, load = time.perf_counter(), os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="enecg-base-data-") as work:
        folders = [Path(f) for f in args.datasets] if args.datasets else build_datasets(DATA_DIR, Path(work))
        tasks, settings, config, records = recipe_tasks(folders, args.cache_dir, args.tasks.split(","))
        fractions = [float(f) for f in args.fractions.split(",")]
        results = {
            "benchmark": "enecg_base", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": machine_info(torch_threads=1),
            "setup": {"config": f"hub_configs/{CONFIG}.json", "sources": list(SOURCES), "records": records,
                      "experts": config.expert_names, "fractions": fractions, "fit_settings": settings.to_dict(),
                      "routers": list(ROUTERS), "gate_hidden_size": config.gate_hidden_size},
            "tasks": {},
        }
        for task in tasks:  # each task's results saved as soon as they are in (a long run can be stopped)
            results["tasks"][task.spec.name] = run_task(task, fractions, settings, config, args.analyses,
                                                        folds_to_run(args))
            partial = {**results, "run": {"elapsed_s": round(time.perf_counter() - started, 1), "partial": True}}
            args.output.with_suffix(".partial.json").write_text(json.dumps(partial, indent=1) + "\n")
    results["run"] = {"load_average_start": list(load), "load_average_end": list(os.getloadavg()),
                      "elapsed_s": round(time.perf_counter() - started, 1), "torch_threads": 1}
    return results


def folds_to_run(args) -> list[int] | None:
    """The outer folds to run (numbered from 1), from `--folds` or `--first-folds`; None: all."""
    if args.folds:
        return sorted({int(f) for f in args.folds.split(",")})
    return list(range(1, args.first_folds + 1)) if args.first_folds else None


def combine(parts: list[dict]) -> dict:
    """One result from runs over other fractions, tasks or outer folds: fold entries merged by fold number."""
    results = parts[0]
    for part in parts[1:]:
        for name, block in part["tasks"].items():
            mine = results["tasks"].setdefault(name, block)
            if mine is block:
                continue
            by_number = {fold["fold"]: fold for fold in mine["folds"]}
            for other in block["folds"]:
                fold = by_number.setdefault(other["fold"], other)
                if fold is other:
                    continue
                fold["fractions"].update(other["fractions"])
                if "routing" in other:
                    fold["routing"] = other["routing"]
            mine["folds"] = [by_number[number] for number in sorted(by_number)]
        results["setup"]["fractions"] = sorted(set(results["setup"]["fractions"]) | set(part["setup"]["fractions"]))
        results["run"]["elapsed_s"] = max(results["run"]["elapsed_s"], part["run"]["elapsed_s"])
    results["tasks"] = {t: results["tasks"][t] for t in TASKS if t in results["tasks"]}
    return results


# ---------------------------------------------------------------------------------------------------------- tables
def cell(summary: dict | None, key: str) -> str:
    if not summary or key not in summary:
        return "n/a"
    return f"{summary[key]['mean']:.3g} ± {summary[key]['std']:.2g}"


def shipped_check(results: dict) -> str:
    """How closely the 100 % rows repeat the shipped model's CV (its metrics.json, per fold)."""
    if not SHIPPED_METRICS.is_file():
        return ""
    shipped = json.loads(SHIPPED_METRICS.read_text())["tasks"]
    gaps = []
    for name, block in results["tasks"].items():
        key = HEADLINE[block["problem_type"]]
        for fold in block["folds"]:
            ours = fold["fractions"].get("1.0")
            if ours and name in shipped:
                gaps.append(abs(ours["enecg"][key] - shipped[name]["folds"][fold["fold"] - 1]["metrics"][key]))
    if not gaps:
        return ""
    same = "the same fits" if max(gaps) == 0 else "the shipped model was refitted since with other settings"
    return (f"The 100 % rows against the shipped model's cross-validation (its metrics.json, fold by fold): largest "
            f"difference of a fold's headline metric {max(gaps):.2g} ({same}).")


def docs_table(results: dict) -> str:
    s = results["setup"]
    folds = sorted({f["fold"] for block in results["tasks"].values() for f in block["folds"]})
    which = "all 5" if len(folds) == 5 else f"folds {', '.join(map(str, folds))} of the 5"
    lines = [f"Setup: `{s['config']}` (experts {', '.join(s['experts'])}), {s['records']} records of "
             f"{', '.join(s['sources'])}; train.py's default fit settings and outer folds (5, subject-wise, seed 42; "
             f"{which} here); {results['created'][:10]}, {results['run']['elapsed_s'] / 60:.0f} min on one thread "
             "(the slowest part).", ""]
    lines += ["**Learning curve** (training subjects of each outer fold subsampled, test folds unchanged; mean ± std "
              f"over {len(folds)} outer folds; best expert: the best head at that size):", ""]
    header = ["task (metric)", "training subjects", "records per fit", "EnECG", "best single expert", "uniform average",
              "baseline"]
    table = []
    for name, block in results["tasks"].items():
        key = HEADLINE[block["problem_type"]]
        sign = -1 if key == "mae" else 1
        for fraction in s["fractions"]:
            parts = [f["fractions"][str(fraction)] for f in block["folds"] if str(fraction) in f["fractions"]]
            if not parts:
                continue
            experts = {e: summarize([p["experts"][e] for p in parts]) for e in block["experts"]}
            best = max(experts, key=lambda e: sign * experts[e][key]["mean"])
            table.append([f"{name} ({key})", f"{fraction:.0%}", f"{np.mean([p['train_records'] for p in parts]):.0f}",
                          f"**{cell(summarize([p['enecg'] for p in parts]), key)}**",
                          f"{cell(experts[best], key)} ({best})", cell(summarize([p["uniform"] for p in parts]), key),
                          cell(summarize([p["baseline"] for p in parts]), key)])
    lines += [markdown_table(header, table, "llrrrrr"), ""]
    if check := shipped_check(results):
        lines += [check, ""]

    table = []
    for name, block in results["tasks"].items():
        folds = [f["routing"] for f in block["folds"] if "routing" in f]
        if not folds:
            continue
        key = HEADLINE[block["problem_type"]]
        table.append([f"{name} ({key})", ROUTER_LABELS["stacked"], "0", "-",
                      f"**{np.mean([f['stacked']['test'] for f in folds]):.4g}**", "-"])
        table.append(["", ROUTER_LABELS["stacked_with_floor"], "0", "-",
                      f"{np.mean([f['stacked_with_floor']['test'] for f in folds]):.4g}", "-"])
        for router in ROUTERS:
            rows = [f[router] for f in folds]
            table.append(["", ROUTER_LABELS[router],
                          "/".join(str(r["epochs"]["one_standard_error"]) for r in rows),
                          f"{np.mean([r['inner_loss_at_0'] - r['inner_loss_lowest'] for r in rows]):.3g}",
                          f"{np.mean([r['test_one_standard_error'] for r in rows]):.4g}",
                          f"{np.mean([r['test_lowest'] for r in rows]):.4g}"])
    if table:
        lines += ["**Routing** (100 % of the training subjects; each gate trained on the heads' out-of-fold "
                  "predictions on top of the stacked weights; epochs by subject-wise inner CV):", "",
                  markdown_table(["task (metric)", "gate", "epochs (1-SE rule), per outer fold",
                                  "inner-CV loss gain at the best epoch", "test (1-SE epochs)",
                                  "test (lowest-loss epochs)"], table, "llrrrr"), ""]

    return "\n".join(lines).rstrip("\n")


def main() -> None:
    options = parser(__doc__, "enecg_base.json")
    add = options.add_argument
    add("--datasets", nargs="+", default=None, help="built dataset folders (default: built from ../shared/data as "
        "`make model` does, in a temporary folder)")
    add("--cache-dir", default=None, help="train.py's --cache_dir (the feature store is its features/ folder)")
    add("--tasks", default=",".join(TASKS))
    add("--fractions", default=",".join(str(f) for f in FRACTIONS))
    add("--analyses", action=argparse.BooleanOptionalAction, default=True,
        help="the routing comparison at 100 %% (default on)")
    add("--first-folds", type=int, default=None, help="only the first N outer folds (a quick look)")
    add("--folds", default=None, help="comma-separated outer folds to run, numbered from 1 (e.g. 4,5; runs over "
        "other folds are merged with --combine)")
    add("--combine", nargs="+", type=Path, metavar="JSON", help="merge runs into --output")
    args = options.parse_args()
    if args.render_only:
        results = json.loads(args.output.read_text())
    elif args.combine:
        results = combine([json.loads(p.read_text()) for p in args.combine])
    else:
        results = measure(args)
    save(results, None if args.render_only else args.output, docs_table(results),
         "enecg_base" if args.update_docs else None)


if __name__ == "__main__":
    main()
