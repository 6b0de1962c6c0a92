"""Training and inference efficiency of EnECG: three ways to train the same model on the same records.

    (1) full_finetune     experts AND heads/gate trained (experts unfrozen, in train mode), experts run every step
    (2) frozen_recompute  EnECG with frozen experts recomputed every step (the research code's loop), LoRA heads/gate
    (3) cached_features   EnECG on expert features computed once, then 5 epochs of LoRA heads/gate on the cache (ours)

For each mode: trainable parameters, training throughput, wall time for 5 epochs, peak memory (process RSS on CPU,
peak allocated on CUDA) and, once per variant, inference latency per record of each expert and of the ensemble.
Every mode runs in its own subprocess, so peak RSS is that mode's own.

Two variants: `tiny` (hub_configs/tiny.json; every mode trained in full, 5 epochs, held-out RR MAE measured) and
`paper` (hub_configs/paper_rr_interval.json, random weights: the Hub is unreachable). Paper-size training is far too
slow on 2 CPU cores to run in full (MOMENT-large alone takes ~100 s per record forward), so for `paper` a few steps
on a handful of records are measured and the 5-epoch wall time is extrapolated linearly to the tiny run's training
set; full fine-tuning of MOMENT-large over 12 leads does not fit in memory, so it is measured with MOMENT reading
1 and 2 leads and extrapolated linearly to 12 (MOMENT encodes each lead as an independent sequence, so its time and
activation memory are linear in the lead count). The JSON says which numbers are measured and which extrapolated.

    python bench/efficiency.py                 # tiny + paper (~40 min on 2 shared cores), writes bench/results/
    python bench/efficiency.py --quick         # tiny only, few records (< 2 min)
    python bench/efficiency.py --variants tiny --output /tmp/eff.json --figure /tmp/eff.png
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from docs_sections import replace_section


REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
DEFAULT_DATA = Path(os.environ.get("ENECG_DATA_DIR", REPO.parent / "shared" / "data"))
VARIANT_CONFIGS = {"tiny": "hub_configs/tiny.json", "paper": "hub_configs/paper_rr_interval.json"}
MODES = ("full_finetune", "frozen_recompute", "cached_features")
MODE_LABELS = {
    "full_finetune": "(1) full fine-tuning",
    "frozen_recompute": "(2) frozen experts recomputed every step",
    "cached_features": "(3) cached expert features (ours)",
}
EPOCHS = 5


# ---------------------------------------------------------------------------------------------------- data
def load_records(data_dir: Path, count: int, seed: int) -> tuple[Any, Any, str]:
    """`count` 12-lead 10 s records at 500 Hz (float32 mV) with their RR interval (ms).

    Real LUDB records (cardiologist R-peak annotations) through the data helper's loader when it is importable, else a
    small wfdb reader here; neurokit2-simulated ECGs when the data folder is absent (e.g. a machine without ../shared).
    """
    import numpy as np

    ludb = data_dir / "ludb"
    if ludb.is_dir():
        try:
            import datasets

            from enecg_hf.data import build_dataset  # the data helper's loader, when it is in

            datasets.disable_progress_bars()
            dataset = build_dataset("ludb", str(ludb))
            dataset = dataset.filter(lambda row: row["rr_interval"] is not None and math.isfinite(row["rr_interval"]))
            dataset = dataset.select(range(min(count, len(dataset))))
            x = np.stack([np.asarray(s, dtype=np.float32) for s in dataset["signal"]])
            return x, np.asarray(dataset["rr_interval"], dtype=np.float32), "ludb (enecg_hf.data.build_dataset)"
        except Exception as err:  # not there yet, or not working yet: read LUDB ourselves
            print(f"[efficiency] enecg_hf.data unavailable ({type(err).__name__}); reading LUDB with wfdb", flush=True)
        import wfdb

        records = sorted((ludb / "data").glob("*.hea"), key=lambda p: int(p.stem))
        xs, ys = [], []
        for header in records:
            path = str(header.with_suffix(""))
            ann = wfdb.rdann(path, "ii")
            beats = np.asarray(ann.sample)[np.asarray(ann.symbol) == "N"]
            if beats.size < 2:
                continue
            signal = wfdb.rdrecord(path).p_signal.T.astype(np.float32)
            xs.append(np.nan_to_num(signal))
            ys.append(np.diff(beats).mean() / 500.0 * 1000.0)
            if len(xs) == count:
                break
        return np.stack(xs), np.asarray(ys, dtype=np.float32), "ludb (wfdb reader in bench/efficiency.py)"
    from enecg_hf.tools.quickstart import simulated_ecg

    rng = np.random.default_rng(seed)
    rates = rng.uniform(45, 120, size=count)
    x = np.stack([simulated_ecg(float(r), seed=seed + i) for i, r in enumerate(rates)])
    return x, (60000.0 / rates).astype(np.float32), "simulated (neurokit2 ecg_simulate; no data folder found)"


# ---------------------------------------------------------------------------------------------------- worker
def build_config(variant: str, adaptation: str, target_mean: float, target_std: float, moment_leads: int | None,
                 only_experts: str | None = None):
    from enecg_hf import EnECGConfig

    raw = json.loads((REPO / VARIANT_CONFIGS[variant]).read_text())
    if only_experts:
        raw["experts"] = [e for e in raw["experts"] if e["name"] in only_experts.split(",")]
    for expert in raw["experts"]:
        expert["pretrained"] = None  # random weights: converted/* folders do not exist and the Hub is unreachable
        if moment_leads and expert["type"] == "moment":
            expert["leads"] = expert["leads"][:moment_leads]
    raw.update(adaptation=adaptation, target_mean=float(target_mean), target_std=float(target_std))
    return EnECGConfig(**raw)


class PeakMemoryGuard:
    """Samples this process's RSS; past `limit_mb` it writes a result saying so and exits (protects a shared box)."""

    def __init__(self, limit_mb: float, out_path: Path, partial: dict):
        import psutil

        self.process, self.limit_mb, self.out_path, self.partial = psutil.Process(), limit_mb, out_path, partial
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            rss = self.process.memory_info().rss / 2**20
            if rss > self.limit_mb:
                self.partial.update(status="memory_limit", peak_rss_mb=rss)
                self.out_path.write_text(json.dumps(self.partial))
                os._exit(3)
            time.sleep(0.05)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def run_worker(args: argparse.Namespace) -> None:
    import psutil
    import torch

    torch.set_num_threads(args.threads)
    out_path = Path(args.worker_out)
    data = torch.load(args.data, weights_only=True)
    x_train, y_train, x_eval, y_eval = data["x_train"], data["y_train"], data["x_eval"], data["y_eval"]
    device = torch.device(args.device)
    baseline = psutil.Process().memory_info().rss / 2**20
    result: dict[str, Any] = {"status": "ok", "mode": args.worker, "baseline_rss_mb": baseline}
    PeakMemoryGuard(args.memory_limit_gb * 1024, out_path, result)

    adaptation = "full" if args.worker == "full_finetune" else "lora"
    config = build_config(args.variant, adaptation, float(y_train.mean()), float(y_train.std()) or 1.0, args.moment_leads,
                          args.only_experts)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    from enecg_hf import EnECGModel

    model = EnECGModel(config).to(device)
    result["build_s"] = time.perf_counter() - started
    if args.worker == "full_finetune":
        for param in model.experts.parameters():
            param.requires_grad_(True)
    result["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    result["total_params"] = sum(p.numel() for p in model.parameters())
    result["experts"] = model.expert_names

    def set_train() -> None:
        model.train()
        if args.worker == "full_finetune":
            model.experts.train()  # EnECGModel.train() keeps experts in eval; full fine-tuning trains them

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    generator = torch.Generator().manual_seed(args.seed)
    n_train, batch = len(x_train), args.batch_size
    max_steps = args.max_steps or None
    step_times: list[float] = []

    def train_epochs(step_fn, n: int) -> float:
        """EPOCHS shuffled passes over n records (or max_steps steps); returns the wall time of the loop."""
        set_train()
        loop_start = time.perf_counter()
        for _ in range(EPOCHS):
            order = torch.randperm(n, generator=generator)
            for start in range(0, n, batch):
                t0 = time.perf_counter()
                loss = step_fn(order[start : start + batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if not args.backward_only:
                    optimizer.step()
                step_times.append(time.perf_counter() - t0)
                if max_steps and len(step_times) >= max_steps:
                    return time.perf_counter() - loop_start
        return time.perf_counter() - loop_start

    def features_of(x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        embeddings, gates = [], []
        model.eval()
        with torch.no_grad():
            for start in range(0, len(x), batch):
                features = model.compute_features(x[start : start + batch].to(device))
                embeddings.append(features.expert_embeddings)
                gates.append(features.gate_inputs)
        return [torch.cat(parts) for parts in zip(*embeddings)], torch.cat(gates)

    y_train_d = y_train.to(device)
    if args.worker in ("full_finetune", "frozen_recompute"):
        x_train_d = x_train.to(device)
        loop_s = train_epochs(lambda idx: model(input_values=x_train_d[idx], labels=y_train_d[idx]).loss, n_train)
        result["feature_extraction_s"] = 0.0
        result["head_training_s"] = loop_s
    else:
        t0 = time.perf_counter()
        cached, cached_gate = features_of(x_train)
        result["feature_extraction_s"] = time.perf_counter() - t0
        n_cache = n_train
        if args.extrapolate_to and args.extrapolate_to > n_train:
            # Head/gate training on the cache is cheap enough to run in full at the target size: tile the cache.
            reps = math.ceil(args.extrapolate_to / n_train)
            cached = [e.repeat(reps, 1)[: args.extrapolate_to] for e in cached]
            cached_gate = cached_gate.repeat(reps, 1)[: args.extrapolate_to]
            y_train_d = y_train_d.repeat(reps)[: args.extrapolate_to]
            n_cache = args.extrapolate_to
        max_steps = None  # always measured in full
        result["head_training_s"] = train_epochs(
            lambda idx: model(expert_embeddings=[e[idx] for e in cached], gate_inputs=cached_gate[idx],
                              labels=y_train_d[idx]).loss,
            n_cache,
        )
        result["head_training_records"] = n_cache
    result["measured_steps"] = len(step_times)
    result["step_times_s"] = step_times
    result["train_records"] = n_train

    if args.evaluate:
        model.eval()
        with torch.no_grad():
            if args.worker == "cached_features":
                emb, gate = features_of(x_eval)
                pred = model(expert_embeddings=emb, gate_inputs=gate).logits
            else:
                pred = torch.cat([model(input_values=x_eval[i : i + batch].to(device)).logits
                                  for i in range(0, len(x_eval), batch)])
        result["eval_mae_ms"] = float((pred.view(-1).cpu() - y_eval).abs().mean())
    if args.repeats:
        # Inference latency, measured here to save a model build: batch 1, no grad, so it adds nothing to peak RSS.
        result.update(measure_inference(model, x_eval.to(device), args.repeats, args.warmup))
    result["peak_rss_mb"] = peak_rss_mb()
    if device.type == "cuda":
        result["peak_cuda_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    out_path.write_text(json.dumps(result))


def measure_inference(model, x, repeats: int, warmup: int) -> dict[str, Any]:
    """Per-record latency (batch 1, no grad, eval): each expert's own forward on the normalised record, and the
    ensemble's full forward (normalisation, every expert, gate, heads). Interleaved; medians over records/repeats."""
    import statistics

    import torch

    from enecg_hf.modeling_enecg import normalize_ecg

    model.eval()
    times: dict[str, list[float]] = {name: [] for name in model.expert_names}
    times["ensemble"] = []
    with torch.no_grad():
        for i in range(warmup + repeats):
            record = x[i % len(x)].unsqueeze(0)
            sample: dict[str, float] = {}
            normalized = normalize_ecg(record.float(), model.config.normalization)
            for name, expert in model.experts.items():
                t0 = time.perf_counter()
                expert(normalized)
                sample[name] = time.perf_counter() - t0
            t0 = time.perf_counter()
            model(input_values=record)
            sample["ensemble"] = time.perf_counter() - t0
            if i >= warmup:
                for key, value in sample.items():
                    times[key].append(value)
    names = model.expert_names
    per_expert = {name: min(times[name]) * 1000 for name in names}
    # Ratio per repeat (the ensemble and its experts ran back to back on the same record), median over repeats: a
    # ratio of minima would compare the luckiest run of each expert with one ensemble run.
    ratios = [ens / sum(times[n][i] for n in names) for i, ens in enumerate(times["ensemble"])]
    return {"latency_ms": {"per_expert": per_expert, "sum_of_experts": sum(per_expert.values()),
                           "ensemble": min(times["ensemble"]) * 1000,
                           "ensemble_over_sum_of_experts": statistics.median(ratios),
                           "per_expert_median": {n: statistics.median(times[n]) * 1000 for n in names},
                           "ensemble_median": statistics.median(times["ensemble"]) * 1000},
            "latency_repeats": repeats, "latency_warmup": warmup}


# ---------------------------------------------------------------------------------------------------- driver
def spawn(args: argparse.Namespace, mode: str, variant: str, data_path: Path, workdir: Path, **extra) -> dict:
    name = f"{variant}-{mode}-{extra.get('moment_leads') or 'all'}"
    name += f"-{extra['only_experts']}" if extra.get("only_experts") else ""
    out = workdir / (name + ("-backward_only" if extra.get("backward_only") else "") + ".json")
    if args.reuse and out.is_file():
        print(f"[efficiency] reusing {out}", flush=True)
        return json.loads(out.read_text())
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", mode, "--variant", variant, "--data",
           str(data_path), "--worker-out", str(out), "--threads", str(args.threads), "--device", args.device,
           "--seed", str(args.seed), "--memory-limit-gb", str(args.memory_limit_gb)]
    for key, value in extra.items():
        if value is not None and value is not False:
            cmd += [f"--{key.replace('_', '-')}"] + ([] if value is True else [str(value)])
    label = f"{variant}/{mode}" + (f" (MOMENT on {extra['moment_leads']} lead(s))" if extra.get("moment_leads") else "")
    label += f" (experts: {extra['only_experts']})" if extra.get("only_experts") else ""
    label += " (forward+backward, no optimiser)" if extra.get("backward_only") else ""
    print(f"[efficiency] {label} ...", flush=True)
    started = time.perf_counter()
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=str(REPO))
    if not out.is_file():
        raise RuntimeError(f"worker {label} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    result = json.loads(out.read_text())
    print(f"[efficiency] {label}: {result['status']}, {time.perf_counter() - started:.1f} s, "
          f"peak RSS {result['peak_rss_mb']:.0f} MB", flush=True)
    return result


def summarise_mode(raw: dict, n_train: int, batch: int, extrapolated: bool, note: str) -> dict:
    """Turn a worker's measurements into the reported fields; extrapolate per-step times to 5 epochs of n_train."""
    steps_per_epoch = math.ceil(n_train / batch)
    steps = raw["step_times_s"]
    if raw["mode"] == "cached_features":
        extraction = raw["feature_extraction_s"] * (n_train / raw["train_records"])
        head = raw["head_training_s"] * (n_train / raw["head_training_records"])
        wall = extraction + head
        step_time = sum(steps) / len(steps)
    else:
        # Drop the first step (allocator and AdamW state warm-up) when there are others to average.
        timed = steps[1:] if len(steps) > 2 else steps
        step_time = sum(timed) / len(timed)
        wall = step_time * steps_per_epoch * EPOCHS if extrapolated else raw["head_training_s"]
        extraction = 0.0
    fields = {
        "trainable_params": raw["trainable_params"],
        "total_params": raw["total_params"],
        "train_records": n_train,
        "batch_size": batch,
        "epochs": EPOCHS,
        "wall_time_5_epochs_s": wall,
        "throughput_records_per_s": n_train * EPOCHS / wall,
        "train_step_throughput_records_per_s": batch / step_time,
        "feature_extraction_s": extraction,
        "peak_rss_mb": raw["peak_rss_mb"],
        "baseline_rss_mb": raw["baseline_rss_mb"],
        "peak_rss_above_baseline_mb": raw["peak_rss_mb"] - raw["baseline_rss_mb"],
        "measured_steps": raw["measured_steps"],
        "measured_records": raw["train_records"],
        "extrapolated": extrapolated,
        "how": note,
    }
    if "eval_mae_ms" in raw:
        fields["eval_mae_ms"] = raw["eval_mae_ms"]
    if "peak_cuda_allocated_mb" in raw:
        fields["peak_cuda_allocated_mb"] = raw["peak_cuda_allocated_mb"]
    return fields


def run_variant(args, variant: str, data: dict, workdir: Path) -> dict:
    import torch

    n_train = len(data["x_train"])
    if variant == "tiny":
        batch = args.batch_size
        data_path = workdir / "tiny-data.pt"
        torch.save(data, data_path)
        modes, inference = {}, {}
        for mode in MODES:
            latency = {"repeats": args.latency_repeats, "warmup": 2} if mode == "cached_features" else {}
            raw = spawn(args, mode, variant, data_path, workdir, batch_size=batch, evaluate=True, **latency)
            modes[mode] = summarise_mode(raw, n_train, batch, False, "measured: 5 full epochs")
            inference = raw if latency else inference
    else:
        batch, k = 1, args.paper_records
        small = {"x_train": data["x_train"][:k], "y_train": data["y_train"][:k],
                 "x_eval": data["x_eval"][:1], "y_eval": data["y_eval"][:1]}
        data_path = workdir / "paper-data.pt"
        torch.save(small, data_path)
        note = (f"extrapolated: {k} step(s) of batch 1 measured on {k} record(s), scaled to 5 epochs of {n_train} "
                "records")
        modes = {}
        raw = spawn(args, "frozen_recompute", variant, data_path, workdir, batch_size=1, max_steps=k)
        modes["frozen_recompute"] = summarise_mode(raw, n_train, 1, True, note)
        raw = spawn(args, "cached_features", variant, data_path, workdir, batch_size=1, extrapolate_to=n_train,
                    repeats=1, warmup=0)
        inference = raw
        modes["cached_features"] = summarise_mode(
            raw, n_train, 1, True,
            f"extrapolated: feature extraction measured on {k} record(s) and scaled to {n_train}; head/gate training "
            f"measured in full (5 epochs over {n_train} cached records, the measured features tiled)")
        modes["full_finetune"] = paper_full_finetune(args, data_path, workdir, n_train)
    ratios = {
        "recompute_over_cached_wall_time": modes["frozen_recompute"]["wall_time_5_epochs_s"]
        / modes["cached_features"]["wall_time_5_epochs_s"],
        "full_over_cached_wall_time": modes["full_finetune"]["wall_time_5_epochs_s"]
        / modes["cached_features"]["wall_time_5_epochs_s"],
        "cached_over_full_peak_rss": modes["cached_features"]["peak_rss_mb"] / modes["full_finetune"]["peak_rss_mb"],
        "cached_over_full_peak_rss_above_baseline": modes["cached_features"]["peak_rss_above_baseline_mb"]
        / modes["full_finetune"]["peak_rss_above_baseline_mb"],
        "ensemble_over_sum_of_experts_latency": inference["latency_ms"]["ensemble_over_sum_of_experts"],
    }
    targets = {
        "cached_at_least_4x_faster_than_recompute": ratios["recompute_over_cached_wall_time"] >= 4.0,
        "cached_peak_memory_at_most_half_of_full": ratios["cached_over_full_peak_rss"] <= 0.5,
        "ensemble_latency_within_10pct_of_sum_of_experts": ratios["ensemble_over_sum_of_experts_latency"] <= 1.10,
    }
    return {
        "config": VARIANT_CONFIGS[variant],
        "experts": inference["experts"],
        "random_weights": "every expert has random weights (pretrained set to null: the Hub is unreachable and no "
                          "converted checkpoints exist); compute and memory do not depend on weight values",
        "batch_size": batch,
        "modes": modes,
        "inference": {**inference["latency_ms"], "repeats": inference["latency_repeats"],
                      "warmup": inference["latency_warmup"]},
        "ratios": ratios,
        "targets_met": targets,
    }


def paper_full_finetune(args, data_path: Path, workdir: Path, n_train: int) -> dict:
    """Full fine-tuning at paper size. The whole model with MOMENT reading 1 lead just fits (~14 GB peak RSS); more
    leads do not (MOMENT alone on 2 leads with AdamW passes 14 GB). MOMENT's cost per extra lead is measured on MOMENT
    alone, forward + backward without the optimiser (whose state does not depend on the lead count), at 1 and 2
    leads, and added 11 times to the whole-model 1-lead run."""
    k = args.paper_records
    runs = {}
    plan = (("all_1", {"moment_leads": 1, "max_steps": k}),
            ("moment_1", {"moment_leads": 1, "only_experts": "moment", "backward_only": True, "max_steps": 1}),
            ("moment_2", {"moment_leads": 2, "only_experts": "moment", "backward_only": True, "max_steps": 1}))
    for key, extra in plan:
        raw = spawn(args, "full_finetune", "paper", data_path, workdir, batch_size=1, **extra)
        if raw["status"] != "ok":
            raise RuntimeError(f"paper full fine-tuning {key} exceeded the memory limit ({args.memory_limit_gb} GB)")
        runs[key] = summarise_mode(raw, n_train, 1, True, "")
    extra_leads = 11

    def per_lead(key: str) -> float:
        return runs["moment_2"][key] - runs["moment_1"][key]

    wall = runs["all_1"]["wall_time_5_epochs_s"] + extra_leads * per_lead("wall_time_5_epochs_s")
    peak = runs["all_1"]["peak_rss_mb"] + extra_leads * per_lead("peak_rss_mb")
    fields = dict(runs["all_1"])
    fields.update(
        wall_time_5_epochs_s=wall,
        throughput_records_per_s=n_train * EPOCHS / wall,
        train_step_throughput_records_per_s=n_train * EPOCHS / wall,  # batch 1: one record per step
        peak_rss_mb=peak,
        peak_rss_above_baseline_mb=peak - runs["all_1"]["baseline_rss_mb"],
        measured_steps=sum(r["measured_steps"] for r in runs.values()),
        how=(f"extrapolated twice: full fine-tuning with MOMENT-large over 12 leads needs far more memory than this "
             f"machine has, so {k} AdamW step(s) of batch 1 were measured for the whole model with MOMENT reading 1 "
             "lead, and one forward+backward of MOMENT alone reading 1 and 2 leads; 11 x the per-lead difference "
             "(time and peak RSS; MOMENT encodes leads independently) is added, then scaled to 5 epochs of "
             f"{n_train} records"),
        measured_points={key: {"wall_time_5_epochs_s": r["wall_time_5_epochs_s"], "peak_rss_mb": r["peak_rss_mb"],
                               "measured_steps": r["measured_steps"]} for key, r in runs.items()},
    )
    return fields


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny variant on a few records (< 2 min on 2 cores)")
    parser.add_argument("--variants", default=None, help="comma-separated: tiny,paper (default both; --quick: tiny)")
    parser.add_argument("--output", default=str(RESULTS / "efficiency.json"))
    parser.add_argument("--figure", default=None, help="PNG path (default: next to --output)")
    parser.add_argument("--merge", action="store_true", help="keep other variants already in --output")
    parser.add_argument("--workdir", default=None, help="keep each worker's raw JSON here (default: a temp folder)")
    parser.add_argument("--reuse", action="store_true", help="reuse worker results already in --workdir")
    parser.add_argument("--replot", action="store_true", help="only redraw the figure (and docs) from --output")
    parser.add_argument("--update-docs", action="store_true", help="rewrite the efficiency table in docs/benchmarks.md")
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA))
    parser.add_argument("--train-records", type=int, default=None)
    parser.add_argument("--eval-records", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--paper-records", type=int, default=2, help="records (= steps, batch 1) measured at paper size")
    parser.add_argument("--latency-repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if _cuda_available() else "cpu")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--memory-limit-gb", type=float, default=14.0, help="a worker past this RSS stops itself")
    # worker-only arguments
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    parser.add_argument("--max-steps", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--moment-leads", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--only-experts", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--backward-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--extrapolate-to", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--evaluate", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, default=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        run_worker(args)
        return {}
    if args.replot:  # re-render figure, summary and docs from an existing JSON
        results = json.loads(Path(args.output).read_text())
        plot(results, Path(args.figure) if args.figure else Path(args.output).with_suffix(".png"))
        print_summary(results)
        if args.update_docs:
            update_docs(results)
        return results

    import torch

    variants = (args.variants or ("tiny" if args.quick else "tiny,paper")).split(",")
    n_train = args.train_records or (8 if args.quick else 96)
    n_eval = args.eval_records or (4 if args.quick else 32)
    args.batch_size = args.batch_size or (4 if args.quick else 16)
    args.latency_repeats = args.latency_repeats or (5 if args.quick else 20)
    started = time.perf_counter()
    x, y, source = load_records(Path(args.data_dir), n_train + n_eval, args.seed)
    if len(x) < n_train + n_eval:
        raise RuntimeError(f"only {len(x)} records available, need {n_train + n_eval}")
    data = {"x_train": torch.from_numpy(x[:n_train]), "y_train": torch.from_numpy(y[:n_train]),
            "x_eval": torch.from_numpy(x[n_train:]), "y_eval": torch.from_numpy(y[n_train:])}
    results: dict[str, Any] = {
        "benchmark": "efficiency",
        "quick": args.quick,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(args),
        "data": {"source": source, "label": "rr_interval (ms)", "train_records": n_train, "eval_records": n_eval,
                 "record_shape": list(x.shape[1:]),
                 "mean_predictor_eval_mae_ms": float(abs(y[n_train:] - y[:n_train].mean()).mean())},
        "definitions": {
            "wall_time_5_epochs_s": "training wall time for 5 epochs over train_records; for (3) it includes the one-off "
                                    "feature extraction. Model construction and evaluation excluded.",
            "throughput_records_per_s": "train_records * 5 / wall_time_5_epochs_s",
            "train_step_throughput_records_per_s": "batch_size / mean optimiser-step time (for (3): steps on the cache)",
            "peak_rss_mb": "ru_maxrss of the mode's own subprocess (weights, activations, optimiser, data, interpreter)",
            "peak_rss_above_baseline_mb": "peak_rss_mb minus the RSS after imports and data loading, before the model",
            "latency_ms": "per-record (batch 1) no-grad forward time, eval mode, expert and ensemble calls interleaved; "
                          "best of `repeats` (the compute floor on a shared machine), medians alongside; "
                          "ensemble_over_sum_of_experts is the median over repeats of ensemble / sum of that repeat's "
                          "expert calls",
        },
        "variants": {},
    }
    output = Path(args.output)
    if args.merge and output.is_file():  # keep the other variants of an earlier run (each records its own load)
        results["variants"] = json.loads(output.read_text())["variants"]
    with tempfile.TemporaryDirectory(prefix="enecg-eff-") as tmp:
        workdir = Path(args.workdir) if args.workdir else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for variant in variants:
            variant_start, load = time.perf_counter(), os.getloadavg()
            block = run_variant(args, variant, data, workdir)
            block["run"] = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "load_average_start": list(load),
                            "load_average_end": list(os.getloadavg()), "elapsed_s": time.perf_counter() - variant_start}
            results["variants"][variant] = block
    results["elapsed_s"] = time.perf_counter() - started

    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2, default=_json_default, allow_nan=False) + "\n")
    figure = Path(args.figure) if args.figure else output.with_suffix(".png")
    plot(results, figure)
    print_summary(results)
    print(f"[efficiency] wrote {output} and {figure} in {results['elapsed_s']:.0f} s")
    if args.update_docs:
        update_docs(results)
    return results


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def _json_default(value):
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(type(value))


def machine_info(args) -> dict:
    import torch
    import transformers

    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "cpu_count": os.cpu_count(), "torch_threads": args.threads,
            "device": args.device}
    try:
        info["memory_total_gb"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        pass
    if args.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# ---------------------------------------------------------------------------------------------------- reporting
def print_summary(results: dict) -> None:
    for variant, block in results["variants"].items():
        print(f"\n== {variant} ({block['config']}; experts {', '.join(block['experts'])}) ==")
        print(f"{'mode':44s} {'trainable':>12s} {'rec/s':>9s} {'5-epoch wall':>13s} {'peak RSS MB':>12s}")
        for mode in MODES:
            m = block["modes"][mode]
            flag = " (extrapolated)" if m["extrapolated"] else ""
            print(f"{MODE_LABELS[mode]:44s} {m['trainable_params']:12,d} {m['throughput_records_per_s']:9.3g} "
                  f"{_duration(m['wall_time_5_epochs_s']):>13s} {m['peak_rss_mb']:12.0f}{flag}")
        inf = block["inference"]
        print("latency per record (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in inf["per_expert"].items())
              + f"; sum {inf['sum_of_experts']:.1f}; ensemble {inf['ensemble']:.1f}")
        r = block["ratios"]
        print(f"ratio (2)/(3) wall time: {r['recompute_over_cached_wall_time']:.2f}x   "
              f"ratio (1)/(3) wall time: {r['full_over_cached_wall_time']:.2f}x   "
              f"peak RSS (3)/(1): {r['cached_over_full_peak_rss']:.2f}   "
              f"ensemble/sum of experts latency: {r['ensemble_over_sum_of_experts_latency']:.2f}")
        print("targets: " + ", ".join(f"{k}={'met' if v else 'NOT met'}" for k, v in block["targets_met"].items()))


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def plot(results: dict, path: Path) -> None:
    """Figure-3 style: performance (held-out RR MAE, tiny variant: every mode trained 5 full epochs) against peak
    memory and against training throughput; paper size (not trained to completion: no performance) as bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    variants = results["variants"]
    rows = 1 + ("paper" in variants)
    fig, axes = plt.subplots(rows, 2, figsize=(11, 4.2 * rows), squeeze=False)
    colors = {"full_finetune": "tab:red", "frozen_recompute": "tab:orange", "cached_features": "tab:green"}
    if "tiny" in variants:
        modes = variants["tiny"]["modes"]
        for ax, key, xlabel in ((axes[0][0], "peak_rss_mb", "peak memory: process RSS (MB)"),
                                (axes[0][1], "throughput_records_per_s", "training throughput (records/s, 5 epochs)")):
            for mode in MODES:
                m = modes[mode]
                ax.scatter(m[key], m.get("eval_mae_ms", float("nan")), s=160, color=colors[mode], label=MODE_LABELS[mode],
                           edgecolor="black", zorder=3)
            baseline = results["data"].get("mean_predictor_eval_mae_ms")
            if baseline is not None:
                ax.axhline(baseline, color="gray", linestyle="--", linewidth=1, label="mean predictor (no learning)")
                maes = [modes[m].get("eval_mae_ms", baseline) for m in MODES] + [baseline]
                low, high = min(maes), max(maes)
                pad = max(0.15 * (high - low), 0.05 * high)
                ax.set_ylim(low - pad, high + pad)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("held-out RR MAE (ms), lower is better")
            ax.grid(alpha=0.3)
            ax.set_title(f"tiny variant, {results['data']['train_records']} train / "
                         f"{results['data']['eval_records']} eval records")
        axes[0][1].set_xscale("log")
        axes[0][1].xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        axes[0][1].xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        axes[0][0].legend(fontsize=8, loc="best")
    if "paper" in variants:
        modes = variants["paper"]["modes"]
        names = [MODE_LABELS[m].split(" ", 1)[0] + " " + m.replace("_", " ") for m in MODES]
        for ax, key, xlabel in ((axes[-1][0], "peak_rss_mb", "peak memory: process RSS (MB, log)"),
                                (axes[-1][1], "throughput_records_per_s", "training throughput (records/s, log)")):
            values = [modes[m][key] for m in MODES]
            ax.barh(names, values, color=[colors[m] for m in MODES], edgecolor="black")
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_xlabel(xlabel)
            ax.set_title("paper size: extrapolated from measured steps\n(no performance: not trained to the end)",
                         fontsize=9)
            for i, v in enumerate(values):
                ax.text(v, i, f" {v:.3g}", va="center", fontsize=8)
            ax.grid(alpha=0.3, axis="x")
    loads = ", ".join(f"{v} {b['run']['load_average_start'][0]:.1f}" for v, b in variants.items())
    fig.suptitle(f"EnECG training efficiency on {results['machine']['cpu_count']} shared CPU cores "
                 f"(load average at start: {loads})", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def docs_table(results: dict) -> str:
    lines = []
    for variant, block in results["variants"].items():
        lines.append(f"**{variant}** (`{block['config']}`, experts: {', '.join(block['experts'])}; batch "
                     f"{block['batch_size']}; {block['modes']['cached_features']['train_records']} training records)\n")
        lines.append("| mode | trainable params | throughput (records/s) | wall time, 5 epochs | peak RSS (MB) | "
                     "above baseline (MB) | held-out RR MAE (ms) | how |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|---|")
        for mode in MODES:
            m = block["modes"][mode]
            mae = f"{m['eval_mae_ms']:.0f}" if "eval_mae_ms" in m else "n/a"
            lines.append(f"| {MODE_LABELS[mode]} | {m['trainable_params']:,} | {m['throughput_records_per_s']:.3g} | "
                         f"{_duration(m['wall_time_5_epochs_s'])} | {m['peak_rss_mb']:,.0f} | "
                         f"{m['peak_rss_above_baseline_mb']:,.0f} | {mae} | {m['how']} |")
        inf, r = block["inference"], block["ratios"]
        run = block["run"]
        lines.append("")
        lines.append(f"Run {run['created']}, {_duration(run['elapsed_s'])}, load average {run['load_average_start'][0]:.2f} "
                     f"at start, {run['load_average_end'][0]:.2f} at end (2 cores; other engineers' jobs included).\n")
        lines.append("Inference latency per record (batch 1, ms): "
                     + ", ".join(f"{k} {v:,.1f}" for k, v in inf["per_expert"].items())
                     + f"; **sum of experts {inf['sum_of_experts']:,.1f}, ensemble {inf['ensemble']:,.1f}** "
                     f"(best of {inf['repeats']}).\n")
        lines.append(f"Ratios: (2)/(3) wall time **{r['recompute_over_cached_wall_time']:.2f}×**; (1)/(3) wall time "
                     f"**{r['full_over_cached_wall_time']:.2f}×**; peak RSS (3)/(1) **{r['cached_over_full_peak_rss']:.2f}**"
                     f" (above baseline {r['cached_over_full_peak_rss_above_baseline']:.2f}); ensemble / sum of experts "
                     f"latency **{r['ensemble_over_sum_of_experts_latency']:.2f}**. Targets: "
                     + ", ".join(f"{k.replace('_', ' ')}: {'met' if v else '**not met**'}"
                                 for k, v in block["targets_met"].items()) + ".\n")
    m = results["machine"]
    lines.append(f"Machine: {m['cpu_count']} CPU cores, {m['torch_threads']} torch threads, torch {m['torch']}, "
                 f"transformers {m['transformers']}; data: {results['data']['source']}.")
    return "\n".join(lines)


def update_docs(results: dict) -> None:
    replace_section("efficiency", docs_table(results))


if __name__ == "__main__":
    main()
