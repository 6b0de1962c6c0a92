"""Training and inference efficiency of EnECG, every mode through a package entry point, each run in its own process
(so its peak memory is its own), the modes run alternately `--repeats` times, medians reported:

    (1) full_finetune     `transformers.Trainer` + `EnECGTrainerCallback` on `model_inputs`, experts unfrozen and in
                          train mode: experts run forward and backward every step
    (2) frozen_recompute  the same Trainer with frozen experts (LoRA heads and gate): experts recomputed every step
    (3) cached_features   train.py's path: the feature store (`enecg_hf.features.build_features`, experts once per
                          record, into an empty store), then `EnECGFitter` (strategy joint) on the in-memory table:
                          the same 5 epochs of the same optimiser

Variants: `tiny` (every mode trained in full), `labels` (the paper's five tasks x 5 subject folds on LUDB records plus
simulated ones, the only records with a potassium label; each task on the records that carry its label: the research
loop, (2) per task and fold, against one store shared by all, (3)) and `paper` (a few steps measured, then
extrapolated). What every field means: docs/benchmarks.md.

    python bench/efficiency.py --update-docs   # tiny + labels + paper (~2 h on 2 shared cores)
    python bench/efficiency.py --variants labels --update-docs   # one variant; the others' saved results are kept
    python bench/efficiency.py --quick         # tiny and labels on 8 (+4 simulated) records, 2 folds, one repeat
"""

import argparse
import contextlib
import json
import math
import os
import statistics
import tempfile
import time
import types
from pathlib import Path

import datasets
import numpy as np
import psutil
import torch
from transformers import Trainer, TrainingArguments

from enecg_hf import EnECGModel
from enecg_hf.data import TASKS, build_dataset, subject_kfold
from enecg_hf.features import FeatureTable, build_features
from enecg_hf.signal_enecg import normalize_ecg
from enecg_hf.training import (EnECGFitter, EnECGTrainerCallback, FitSettings, TrainScriptArguments, model_inputs,
                               predict)
from enecg_hf.training.configs import build_config
from enecg_hf.training.labels import encode_labels
from harness import (REPO, in_fresh_process, interleaved, machine_info, markdown_table, parser, peak_rss_mib,
                     render_only, require_data, save)


VARIANT_CONFIGS = {"tiny": "hub_configs/tiny.json", "labels": "hub_configs/tiny.json",
                   "paper": "hub_configs/paper_rr_interval.json"}
MODE_LABELS = {"full_finetune": "(1) full fine-tuning", "frozen_recompute": "(2) frozen experts recomputed every step",
               "cached_features": "(3) cached expert features (ours)"}
LABEL_MODES = {"research_loop": "(2) per task and fold, experts recomputed every step (research loop)",
               "one_store": "(3) one feature store for every task and fold (ours)"}
# Where a labels run's time goes (seconds, summed over the loop): building models (and, research loop, Trainers),
# filling the store, fitting (Trainer.train / EnECGFitter.fit), and the experts' forward passes inside any of these.
TIME_PARTS = ("model_construction_s", "feature_extraction_s", "fits_s", "experts_forward_s")
MODES, LABELS, VARIANTS = tuple(MODE_LABELS), tuple(TASKS), tuple(VARIANT_CONFIGS)  # LABELS: the paper's 5 tasks
EPOCHS, LR, SEED, THREADS, PAPER_RECORDS = 5, 1e-4, 42, 1, 2  # PAPER_RECORDS: records (= steps) measured at paper size
# Sizes of a full run and of --quick (repeats: training runs of every mode, and rounds of the latency measurement;
# simulated_records: added to the LUDB training records in the labels variant).
SIZES = {"full": {"train_records": 96, "eval_records": 32, "simulated_records": 64, "batch_size": 16, "repeats": 3,
                  "folds": 5},
         "quick": {"train_records": 8, "eval_records": 4, "simulated_records": 4, "batch_size": 4, "repeats": 1,
                   "folds": 2}}
# Full fine-tuning at paper size, measured in three parts (paper_full_finetune): all experts, MOMENT alone (probes).
PAPER_FULL_POINTS = {"all_1": {"moment_leads": 1},
                     "moment_1": {"moment_leads": 1, "only_experts": "moment", "probe": True},
                     "moment_2": {"moment_leads": 2, "only_experts": "moment", "probe": True}}
WORKER_DEFAULTS = {"only_experts": None, "moment_leads": 0, "max_steps": 0, "extrapolate_to": 0, "probe": False,
                   "evaluate": False, "latency_repeats": 0}
datasets.disable_progress_bars()


def load_records(n_train: int, n_eval: int) -> datasets.DatasetDict:
    """The first LUDB records with an RR interval (cardiologist annotations): n_train to train on, n_eval held out."""
    dataset = build_dataset("ludb", str(require_data("ludb")))
    dataset = dataset.filter(lambda row: row["rr_interval"] is not None and math.isfinite(row["rr_interval"]))
    if len(dataset) < n_train + n_eval:
        raise RuntimeError(f"only {len(dataset)} records available, need {n_train + n_eval}")
    return datasets.DatasetDict({"train": dataset.select(range(n_train)),
                                 "eval": dataset.select(range(n_train, n_train + n_eval))})


def with_simulated(dataset: datasets.DatasetDict, n_simulated: int) -> datasets.DatasetDict:
    """The labels variant's records: the LUDB training records followed by `n_simulated` simulated ones (the package's
    builder, same schema), one dataset. Only simulated records carry `potassium_flag`; they carry every other label
    too, so the potassium task trains on them alone and the four others on both sources."""
    simulated = build_dataset("simulated", limit=n_simulated, seed=SEED)
    return datasets.DatasetDict({"train": datasets.concatenate_datasets([dataset["train"], simulated]),
                                 "eval": dataset["eval"]})


def task_records(records: datasets.Dataset) -> dict[str, dict[str, int]]:
    """Per task, the records that carry its label, by source: what each task trains on (before the folds)."""
    sources = np.asarray(records["source"])
    return {label: {str(s): int(n) for s, n in zip(*np.unique(sources[encode_labels(records, TASKS[label])[0]],
                                                              return_counts=True))} for label in LABELS}

# --- the worker: one mode in a fresh process ---------------------------------------------------------------------

def make_model(job, tasks, full: bool = False):
    """The variant's config for `tasks` (one: single-task; several: multi-task), random experts, research settings:
    the paper's FFN heads (`head_type="ffn"`, no linear path fitted on inner folds) and MSE, without head
    standardisation, as in the research code (and so that (1) and (2) need no extra pass of the experts)."""
    raw = json.loads((REPO / VARIANT_CONFIGS[job.variant]).read_text())
    raw["experts"] = [e for e in raw["experts"] if not job.only_experts or e["name"] == job.only_experts]
    for expert in raw["experts"]:
        expert["pretrained"] = None  # random weights: converted/* folders do not exist and the Hub is unreachable
        if expert["type"] == "moment" and job.moment_leads:
            expert["leads"] = expert["leads"][:job.moment_leads]
    raw.update(adaptation="full" if full else "lora", head_standardize=False, head_type="ffn", regression_loss="mse")
    specs = TASKS[tasks[0]] if len(tasks) == 1 else [TASKS[t] for t in tasks]
    torch.manual_seed(SEED)
    model = EnECGModel(build_config(TrainScriptArguments(), specs, raw))
    if full:  # EnECGModel never trains its experts; full fine-tuning does, in train mode
        model.requires_grad_(True)
        model.train = types.MethodType(torch.nn.Module.train, model)
    return model


def trainer_fit(model, records, label: str, job, workdir: str) -> int:
    """The research loop's training: `Trainer` over the records' signals, the experts run in every step."""
    trainer = Trainer(model=model, train_dataset=model_inputs(records, label, model.config),
                      callbacks=[EnECGTrainerCallback()], args=TrainingArguments(
                          output_dir=workdir, num_train_epochs=EPOCHS, max_steps=job.max_steps or -1,
                          per_device_train_batch_size=job.batch_size, learning_rate=LR, weight_decay=0.01,
                          lr_scheduler_type="constant", max_grad_norm=0.0, save_strategy="no", report_to="none",
                          disable_tqdm=True, seed=SEED, use_cpu=True))
    return trainer.train().global_step


def store_table(model, records, labels, store: str, batch_size: int):
    """train.py's feature path: the store fills in what is missing, training reads in-memory tensors."""
    features, _ = build_features(records, model, store_dir=store, batch_size=batch_size, progress=False)
    return FeatureTable.from_store(features, np.arange(len(records)), labels, records, model.expert_names)


def fitter_fit(model, table, rows, job) -> None:
    """train.py's training on the feature table: heads and gate, the same optimiser and epochs as the Trainer."""
    settings = FitSettings(strategy="joint", epochs=EPOCHS, learning_rate=LR, batch_size=job.batch_size, seed=SEED)
    EnECGFitter(model, settings).fit(table, rows)


def timed_experts(model, parts: dict) -> None:
    """Add the wall time of every expert forward of `model` to `parts["experts_forward_s"]` (forward hooks)."""
    def start(module, args):
        module._enecg_bench_started = time.perf_counter()

    def stop(module, args, output):
        parts["experts_forward_s"] += time.perf_counter() - module._enecg_bench_started

    for expert in model.experts.values():
        expert.register_forward_pre_hook(start)
        expert.register_forward_hook(stop)


@contextlib.contextmanager
def timing(parts: dict, key: str):
    """Add the wall time of the `with` block to `parts[key]`."""
    started = time.perf_counter()
    yield
    parts[key] += time.perf_counter() - started


def labels_loop(job, train, tmp: str, result: dict):
    """Every task x fold on the records that carry the task's label, the whole loop timed, model construction
    included: the research loop builds a model and a Trainer per fit; one_store builds one multi-task model and one
    store, then fits every task's heads on it. `result` also gets the TIME_PARTS."""
    started, one_store, fits, parts = time.perf_counter(), job.mode == "one_store", 0, dict.fromkeys(TIME_PARTS, 0.0)
    cpu_started = time.process_time()
    if one_store:
        with timing(parts, "model_construction_s"):
            model = make_model(job, LABELS)
        timed_experts(model, parts)
        with timing(parts, "feature_extraction_s"):
            table = store_table(model, train, np.zeros(len(train), np.float32), tmp, job.batch_size)
    for label in LABELS:
        keep, y = encode_labels(train, TASKS[label])
        for rows, _ in subject_kfold(train.select(keep), job.folds, seed=SEED):
            if one_store:
                with timing(parts, "fits_s"):
                    fitter_fit(model.tasks[label], table.select(keep, labels=y), rows, job)
            else:
                with timing(parts, "model_construction_s"):
                    fold_model = make_model(job, [label])
                timed_experts(fold_model, parts)
                with timing(parts, "fits_s"):  # Trainer construction included (it is built per fit)
                    trainer_fit(fold_model, train.select(np.asarray(keep)[rows]), label, job, tmp)
            fits += 1
    result.update(parts, fits=fits, labels=list(LABELS), folds=job.folds,
                  head_training_s=time.perf_counter() - started, cpu_time_s=time.process_time() - cpu_started,
                  measured_steps=fits)
    return model if one_store else make_model(job, LABELS)


def train_one(job, train, test, tmp: str, result: dict):
    """One mode of (1)-(3) on the RR interval: train (model construction not timed), evaluate, time inference."""
    model = make_model(job, ["rr_interval"], full=job.mode == "full_finetune")
    y_train = np.asarray(train["rr_interval"], np.float32)
    started = time.perf_counter()
    if job.probe:  # one forward + backward, no optimiser (paper size: MOMENT's cost per lead)
        model.train()
        model(input_values=torch.tensor(train[:1]["signal"]), labels=torch.as_tensor(y_train[:1])).loss.backward()
        steps = 1
    elif job.mode == "cached_features":
        table = store_table(model, train, y_train, tmp, job.batch_size)
        result["feature_extraction_s"] = time.perf_counter() - started
        n = max(job.extrapolate_to, len(train))  # head/gate training is measured in full: the cache is tiled
        table = table.select(np.arange(n) % len(train))
        started = time.perf_counter()
        fitter_fit(model, table, np.arange(n), job)
        steps, result["head_training_records"] = EPOCHS * math.ceil(n / job.batch_size), n
    else:
        steps = trainer_fit(model, train, "rr_interval", job, tmp)
    result.update(head_training_s=time.perf_counter() - started, measured_steps=steps)
    if job.evaluate:  # held-out MAE of the trained model, through the cached-features path
        y_test = np.asarray(test["rr_interval"], np.float32)
        out = predict(model, store_table(model, test, y_test, tmp, job.batch_size))
        result["eval_mae_ms"] = float(np.abs(out["logits"][:, 0] - out["labels"]).mean())
    if job.latency_repeats:  # batch 1, no grad: adds nothing to peak RSS
        result["latency_ms"] = measure_inference(model, torch.tensor(test["signal"]), job.latency_repeats)
    return model


def measure_inference(model, x, repeats: int) -> dict:
    """Per-record latency (batch 1, no grad, eval): each expert's own forward on the normalised record and the
    ensemble's full forward on the record, side by side (`harness.interleaved`); medians over records."""
    model.eval()
    items = [(r[None], normalize_ecg(r[None].float(), model.config.normalization)) for r in x]
    calls = {n: (lambda item, e=e: e(item[1])) for n, e in model.experts.items()}
    calls["ensemble"] = lambda item: model(input_values=item[0])
    with torch.no_grad():
        seconds = interleaved(calls, items, repeats=repeats, warmup=2)
    per_expert = {n: 1000 * statistics.median(seconds[n]) for n in model.expert_names}
    ratios = [seconds["ensemble"][i] / sum(seconds[n][i] for n in per_expert) for i in range(len(items))]
    return {"per_expert": per_expert, "sum_of_experts": sum(per_expert.values()),
            "ensemble": 1000 * statistics.median(seconds["ensemble"]),
            "ensemble_over_sum_of_experts": statistics.median(ratios), "records": len(items), "repeats": repeats}


def run_worker(job) -> dict:
    """One mode (`job.mode`) on the records saved in `job.data`: the raw measurements, summarised by the parent."""
    torch.set_num_threads(THREADS)
    data = datasets.load_from_disk(job.data)
    result = {"mode": job.mode, "baseline_rss_mb": psutil.Process().memory_info().rss / 2**20,
              "feature_extraction_s": 0.0, "train_records": len(data["train"])}
    with tempfile.TemporaryDirectory(prefix="enecg-eff-worker-") as tmp:  # feature store and Trainer output
        if job.mode in LABEL_MODES:
            model = labels_loop(job, data["train"], tmp, result)
        else:
            model = train_one(job, data["train"], data["eval"], tmp, result)
    result.update(trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
                  total_params=sum(p.numel() for p in model.parameters()), experts=model.expert_names,
                  peak_rss_mb=peak_rss_mib()["main"])
    return result


# --- the parent: workers per variant, summaries, ratios ----------------------------------------------------------

def alternating(args, variant: str, data: Path, jobs: dict[str, dict], repeats: int) -> dict[str, list[dict]]:
    """Every job (name: worker settings) `repeats` times, each in a fresh process (its peak memory is its own; past
    --memory-limit-gb it is stopped), the order rotating from one round to the next."""
    names, runs = list(jobs), {name: [] for name in jobs}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            print(f"[efficiency] {variant} {jobs[name]}", flush=True)
            job = {**WORKER_DEFAULTS, "variant": variant, "data": str(data), "folds": args.folds, **jobs[name]}
            runs[name].append(in_fresh_process(__file__, ["--worker", json.dumps(job)], THREADS, args.memory_limit_gb))
    return runs


def summarise_mode(raws: list[dict], n_train: int, batch: int, extrapolated: bool, how: str) -> dict:
    """A mode's runs as reported fields (medians over runs); with `extrapolated`, the measured steps are scaled to 5
    epochs of n_train records ((3): feature extraction scaled, head training measured over n_train records)."""
    rows = []
    for raw in raws:
        step_time = raw["head_training_s"] / raw["measured_steps"]
        if raw["mode"] == "cached_features":
            extraction = raw["feature_extraction_s"] * n_train / raw["train_records"]
            wall = extraction + raw["head_training_s"] * n_train / raw["head_training_records"]
        else:
            extraction = raw["feature_extraction_s"]
            wall = step_time * math.ceil(n_train / batch) * EPOCHS if extrapolated else raw["head_training_s"]
        rows.append({"wall_time_5_epochs_s": wall, "throughput_records_per_s": n_train * EPOCHS / wall,
                     "train_step_throughput_records_per_s": batch / step_time, "feature_extraction_s": extraction,
                     "peak_rss_mb": raw["peak_rss_mb"], "baseline_rss_mb": raw["baseline_rss_mb"],
                     "peak_rss_above_baseline_mb": raw["peak_rss_mb"] - raw["baseline_rss_mb"]})
    first = raws[0]
    return {"trainable_params": first["trainable_params"], "total_params": first["total_params"],
            "train_records": n_train, "batch_size": batch, "epochs": EPOCHS,
            **{k: statistics.median(r[k] for r in rows) for k in rows[0]}, "runs": len(raws),
            "wall_time_runs_s": [r["wall_time_5_epochs_s"] for r in rows], "measured_steps": first["measured_steps"],
            "measured_records": first["train_records"], "extrapolated": extrapolated, "how": how,
            **{k: first[k] for k in ("eval_mae_ms", "fits") if k in first},
            **({"time_parts_s": {k: statistics.median(r[k] for r in raws) for k in TIME_PARTS},
                "cpu_time_s": statistics.median(r["cpu_time_s"] for r in raws),
                "cpu_time_runs_s": [r["cpu_time_s"] for r in raws]} if "fits_s" in first else {})}


def paper_full_finetune(points: dict[str, dict], k: int, n_train: int) -> dict:
    """Full fine-tuning at paper size from the PAPER_FULL_POINTS (each already scaled to 5 epochs of n_train records):
    the whole model with MOMENT reading 1 lead, plus 11 x the per-lead difference of MOMENT alone (time, peak RSS)."""
    all_1, per_lead = points["all_1"], lambda key: points["moment_2"][key] - points["moment_1"][key]
    wall = all_1["wall_time_5_epochs_s"] + 11 * per_lead("wall_time_5_epochs_s")
    peak = all_1["peak_rss_mb"] + 11 * per_lead("peak_rss_mb")
    return {**all_1, "wall_time_5_epochs_s": wall, "throughput_records_per_s": n_train * EPOCHS / wall,
            "train_step_throughput_records_per_s": n_train * EPOCHS / wall, "peak_rss_mb": peak,
            "peak_rss_above_baseline_mb": peak - all_1["baseline_rss_mb"],
            "measured_steps": sum(p["measured_steps"] for p in points.values()),
            "how": (f"extrapolated twice (too large for this machine): {k} AdamW step(s) of batch 1 of the whole model "
                    "with MOMENT reading 1 lead, plus 11 x the per-lead difference (time and peak RSS) of one "
                    f"forward+backward of MOMENT alone on 1 and 2 leads, scaled to 5 epochs of {n_train} records"),
            "measured_points": {name: {f: p[f] for f in ("wall_time_5_epochs_s", "peak_rss_mb", "measured_steps")}
                                for name, p in points.items()}}


def run_variant(args, variant: str, dataset, data: Path) -> dict:
    """Every mode of one variant, summarised, with the ratios between modes (and, for tiny and paper, the targets)."""
    started, load = time.perf_counter(), os.getloadavg()[0]
    n, k, batch, repeats = args.train_records, PAPER_RECORDS, args.batch_size, args.repeats
    if variant == "labels":
        dataset = with_simulated(dataset, args.simulated_records)
        n = len(dataset["train"])
        jobs = {mode: {"mode": mode} for mode in LABEL_MODES}
        how = dict.fromkeys(jobs, f"measured: {len(LABELS)} tasks x {args.folds} folds, 5 epochs each")
    elif variant == "tiny":
        jobs = {mode: {"mode": mode, "evaluate": True} for mode in MODES}
        jobs["cached_features"]["latency_repeats"] = repeats
        how = dict.fromkeys(jobs, "measured: 5 full epochs")
    else:  # paper: k steps of batch 1 on k records, extrapolated; one record for the latency
        batch, repeats = 1, 1
        dataset = type(dataset)({"train": dataset["train"].select(range(k)), "eval": dataset["eval"].select([0])})
        jobs = {"frozen_recompute": {"mode": "frozen_recompute", "max_steps": k},
                "cached_features": {"mode": "cached_features", "extrapolate_to": n, "latency_repeats": 1}}
        jobs |= {name: {"mode": "full_finetune", "max_steps": k, **point} for name, point in PAPER_FULL_POINTS.items()}
        how = {"frozen_recompute": f"extrapolated: {k} step(s) of batch 1 measured on {k} record(s), scaled to 5 "
                                   f"epochs of {n} records",
               "cached_features": f"extrapolated: feature extraction measured on {k} record(s) and scaled to {n}; "
                                  f"head/gate training measured in full (5 epochs over {n} cached records, the "
                                  "measured features tiled)"}
    dataset.save_to_disk(str(data))
    runs = alternating(args, variant, data, {name: {"batch_size": batch, **job} for name, job in jobs.items()}, repeats)
    modes = {name: summarise_mode(r, n, batch, variant == "paper", how.get(name, "")) for name, r in runs.items()}
    block = {"config": VARIANT_CONFIGS[variant], "batch_size": batch,
             "experts": runs["one_store" if variant == "labels" else "cached_features"][0]["experts"],
             "run": {"finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "repeats": repeats, "load_average_start": load,
                     "load_average_end": os.getloadavg()[0], "elapsed_s": time.perf_counter() - started,
                     "machine": machine_info(torch_threads=THREADS, device="cpu")}}
    if variant == "labels":  # per round too: a one-store run lasts a minute, a loop tens of minutes of other load
        loop, store = modes["research_loop"], modes["one_store"]
        ratios = {"research_loop_over_one_store_wall_time": loop["wall_time_5_epochs_s"] / store["wall_time_5_epochs_s"],
                  "research_loop_over_one_store_wall_time_per_round": [
                      a / b for a, b in zip(loop["wall_time_runs_s"], store["wall_time_runs_s"])],
                  "research_loop_over_one_store_cpu_time": loop["cpu_time_s"] / store["cpu_time_s"]}
        return {**block, "labels": list(LABELS), "folds": args.folds, "modes": modes,
                "records": {"ludb": args.train_records, "simulated": args.simulated_records,
                            "simulated_seed": SEED, "per_task": task_records(dataset["train"])},
                "ratios": ratios}
    if variant == "paper":
        modes["full_finetune"] = paper_full_finetune({p: modes.pop(p) for p in PAPER_FULL_POINTS}, k, n)
    (full, recompute, cached), inference = (modes[m] for m in MODES), runs["cached_features"][0]["latency_ms"]
    wall, rss, above = "wall_time_5_epochs_s", "peak_rss_mb", "peak_rss_above_baseline_mb"
    ratios = {"recompute_over_cached_wall_time": recompute[wall] / cached[wall],
              "full_over_cached_wall_time": full[wall] / cached[wall],
              "cached_over_full_peak_rss": cached[rss] / full[rss],
              "cached_over_full_peak_rss_above_baseline": cached[above] / full[above],
              "ensemble_over_sum_of_experts_latency": inference["ensemble_over_sum_of_experts"]}
    targets = {"cached_at_least_4x_faster_than_recompute": ratios["recompute_over_cached_wall_time"] >= 4.0,
               "cached_peak_memory_at_most_half_of_full": ratios["cached_over_full_peak_rss"] <= 0.5,
               "ensemble_latency_within_10pct_of_sum_of_experts": ratios["ensemble_over_sum_of_experts_latency"] <= 1.1}
    return {**block, "modes": {m: modes[m] for m in MODES}, "inference": inference, "ratios": ratios,
            "targets_met": targets}


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__, "efficiency.json")
    p.add_argument("--quick", action="store_true", help="tiny and labels on 8 (+4 simulated) records, 2 folds, one "
                   "repeat")
    p.add_argument("--variants", default=None, help="comma-separated, of tiny,labels,paper (default all; --quick: "
                   "tiny,labels); the other variants' results in --output are kept")
    p.add_argument("--repeats", type=int, default=None, help="runs of every mode, alternating (default 3; --quick 1)")
    p.add_argument("--folds", type=int, default=None, help="labels variant: subject folds per task (default 5; "
                   "--quick 2)")
    p.add_argument("--simulated-records", type=int, default=None, help="labels variant: simulated records added to "
                   "the LUDB ones (default 64; --quick 4)")
    p.add_argument("--memory-limit-gb", type=float, default=14.0, help="a worker past this RSS is stopped")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one worker's settings, as JSON (spawn)
    args = p.parse_args(argv)
    if args.worker:
        return print(json.dumps(run_worker(types.SimpleNamespace(**json.loads(args.worker)))))
    if render_only(args, docs_table, "efficiency"):
        return
    size = SIZES["quick" if args.quick else "full"]
    vars(args).update({key: value for key, value in size.items() if getattr(args, key, None) is None})
    variants = args.variants.split(",") if args.variants else [v for v in VARIANTS if v != "paper" or not args.quick]
    if set(variants) - set(VARIANTS):
        raise SystemExit(f"--variants: unknown {sorted(set(variants) - set(VARIANTS))}; choose from {VARIANTS}")
    started = time.perf_counter()
    dataset = load_records(args.train_records, args.eval_records)
    y_train, y_eval = np.asarray(dataset["train"]["rr_interval"]), np.asarray(dataset["eval"]["rr_interval"])
    results = {"benchmark": "efficiency", "quick": args.quick, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               "machine": machine_info(torch_threads=THREADS, device="cpu"),
               "data": {"source": "ludb (enecg_hf.data.build_dataset)", "label": "rr_interval (ms)",
                        "train_records": args.train_records, "eval_records": args.eval_records,
                        "record_shape": list(np.shape(dataset["train"][0]["signal"])),
                        "mean_predictor_eval_mae_ms": float(np.abs(y_eval - y_train.mean()).mean())}}
    with tempfile.TemporaryDirectory(prefix="enecg-eff-") as workdir:
        results["variants"] = {variant: run_variant(args, variant, dataset, Path(workdir) / variant)
                               for variant in variants}
    results["elapsed_s"] = time.perf_counter() - started
    results["variants"] = merged_variants(args.output, results)
    save(results, args.output, docs_table(results), "efficiency" if args.update_docs else None)


def merged_variants(output: Path, results: dict) -> dict:
    """The variants just measured, plus (in VARIANTS order) those of the saved results in `output` that were not
    re-run, when that file is a run of the same kind (`quick` alike); a kept variant keeps the machine it ran on."""
    saved = json.loads(output.read_text()) if output.is_file() else {}
    if saved.get("quick") != results["quick"]:
        return results["variants"]
    kept = {name: block for name, block in saved.get("variants", {}).items() if name not in results["variants"]}
    for block in kept.values():
        block["run"].setdefault("machine", saved["machine"])
    merged = {**kept, **results["variants"]}
    return {name: merged[name] for name in VARIANTS if name in merged}


def duration(seconds: float) -> str:
    for limit, unit, scale in ((120, "s", 1), (7200, "min", 60), (172800, "h", 3600), (math.inf, "d", 86400)):
        if seconds < limit:
            return f"{seconds / scale:.1f} {unit}"


def docs_table(results: dict) -> str:
    """Per variant: the modes side by side, how the run went, and the ratios (tiny and paper: latency and targets)."""
    lines = []
    for variant, block in results["variants"].items():
        labels, r, run = variant == "labels", block["ratios"], block["run"]
        records, scope = f"{results['data']['train_records']} training records", ""
        if labels and "records" in block:  # since the five-task shape: LUDB plus simulated records
            records = (f"{block['records']['ludb']} LUDB + {block['records']['simulated']} simulated training "
                       "records")
            scope = "; tasks " + ", ".join(f"{task} ({' + '.join(f'{n} {s}' for s, n in by_source.items())})"
                                           for task, by_source in block["records"]["per_task"].items())
            scope += f" x {block['folds']} subject folds"
        elif labels:
            scope = f"; labels {', '.join(block['labels'])} x {block['folds']} folds"
        lines.append(f"**{variant}** (`{block['config']}`, experts: {', '.join(block['experts'])}; batch "
                     f"{block['batch_size']}; {records}{scope})\n")
        header = ["mode", "trainable params", "throughput (records/s)", "wall time, all fits" if labels else
                  "wall time, 5 epochs", "runs", "peak RSS (MB)", "above baseline (MB)", "held-out RR MAE (ms)", "how"]
        rows = [[name, f"{m['trainable_params']:,}", f"{m['throughput_records_per_s']:.3g}",
                 duration(m["wall_time_5_epochs_s"]), ", ".join(map(duration, m["wall_time_runs_s"])) if m["runs"] > 1
                 else "1", f"{m['peak_rss_mb']:,.0f}", f"{m['peak_rss_above_baseline_mb']:,.0f}",
                 f"{m['eval_mae_ms']:.0f}" if "eval_mae_ms" in m else "n/a", m["how"]]
                for mode, name in (LABEL_MODES if labels else MODE_LABELS).items() for m in [block["modes"][mode]]]
        order = (f"every mode {run['repeats']}× in rotating order (medians; each run's wall time in *runs*)"
                 if run["repeats"] > 1 else "every mode once")
        lines += [markdown_table(header, rows, "lrrrlrrrl"), "",
                  f"Run finished {run['finished']}, {duration(run['elapsed_s'])}, {order}, load average "
                  f"{run['load_average_start']:.2f} at start, {run['load_average_end']:.2f} at end (2 shared cores).\n"]
        if labels:
            rounds = ", ".join(f"{x:.1f}×" for x in r.get("research_loop_over_one_store_wall_time_per_round", []))
            lines += time_parts(block) + [
                f"Ratio: research loop / one store, wall time **{r['research_loop_over_one_store_wall_time']:.1f}×** "
                f"for {len(block['labels'])} {'tasks' if 'records' in block else 'labels'} × {block['folds']} folds "
                f"({block['modes']['one_store']['fits']} fits per mode)"
                + (f"; per round (the two runs back to back) {rounds}; process CPU time "
                   f"**{r['research_loop_over_one_store_cpu_time']:.1f}×** (medians: "
                   f"{duration(block['modes']['research_loop']['cpu_time_s'])} against "
                   f"{duration(block['modes']['one_store']['cpu_time_s'])}; CPU time is what load from other jobs "
                   "changes least)" if "research_loop_over_one_store_cpu_time" in r else "") + ".\n"]
            continue
        inf = block["inference"]
        experts = ", ".join(f"{name} {ms:,.1f}" for name, ms in inf["per_expert"].items())
        targets = ", ".join(f"{k.replace('_', ' ')}: {'met' if met else '**not met**'}"
                            for k, met in block["targets_met"].items())
        lines += [f"Inference latency per record (batch 1, ms, median over {inf['records']} records of the median of "
                  f"{inf['repeats']} side-by-side runs): {experts}; **sum of experts {inf['sum_of_experts']:,.1f}, "
                  f"ensemble {inf['ensemble']:,.1f}**.\n",
                  f"Ratios: (2)/(3) wall time **{r['recompute_over_cached_wall_time']:.2f}×**; (1)/(3) wall time "
                  f"**{r['full_over_cached_wall_time']:.2f}×**; peak RSS (3)/(1) "
                  f"**{r['cached_over_full_peak_rss']:.2f}** (above baseline "
                  f"{r['cached_over_full_peak_rss_above_baseline']:.2f}); ensemble / sum of experts latency "
                  f"**{r['ensemble_over_sum_of_experts_latency']:.2f}**. Targets: {targets}.\n"]
    m = results["machine"]
    versions = {name: "torch {torch}, transformers {transformers}".format(**block["run"].get("machine", m))
                for name, block in results["variants"].items()}
    versions_text = (next(iter(versions.values())) if len(set(versions.values())) == 1 else
                     "; ".join(f"{name}: {text}" for name, text in versions.items()))
    lines.append(f"Machine: {m['cpu_count']} CPU cores, {m['torch_threads']} torch thread(s), {versions_text}; data: "
                 f"{results['data']['source']}" + (", labels variant plus simulated records (same builder)"
                                                   if "records" in results["variants"].get("labels", {}) else "")
                 + ".")
    return "\n".join(lines)


def time_parts(block: dict) -> list[str]:
    """The labels variant's time split per mode (medians over runs), when the results have it."""
    parts = {mode: block["modes"][mode].get("time_parts_s") for mode in LABEL_MODES}
    if not all(parts.values()):
        return []
    loop, store = parts["research_loop"], parts["one_store"]
    fits = block["modes"]["one_store"]["fits"]
    return [f"Where the time goes (medians, s): research loop: {fits} models built {loop['model_construction_s']:.1f}, "
            f"{fits} Trainers built and trained {loop['fits_s']:.1f}, of which the experts' forward passes "
            f"{loop['experts_forward_s']:.1f}; one store: one model built {store['model_construction_s']:.1f}, the "
            f"store filled {store['feature_extraction_s']:.1f} (experts' forward passes "
            f"{store['experts_forward_s']:.1f}), {fits} head/gate fits {store['fits_s']:.1f}.\n"]


if __name__ == "__main__":
    main()
