"""Frozen expert pass at fp32 vs int8 vs bf16 (`model.set_expert_precision`): time, embedding drift, downstream CV.

Model: hub_configs/offline_pretrained.json (REAL openecg and deepfade weights, features, dlinear) with DeepFADE on lead
II only (its time is linear in leads: 12 leads ~7 s/record). `--moment`: a paper-size MOMENT-large (random weights,
1 lead). One process, one torch thread; per record, each precision's forward (of each expert and of the whole frozen
pass) interleaved, warm-up first, median over repetitions then over records. Each precision is what the option gives
(experts it leaves at fp32 run fp32); bf16 autocast forced on the KEEP_IN_FP32 experts is timed on one record apart.
Drift: ||e - e_fp32|| / ||e_fp32|| per record. Downstream: heads + gate (`enecg_hf.training` core) on fp32 vs int8
features, same subject folds and seeds.

    python bench/expert_precision.py --records 200 --folds 3 --update-docs   # ~25 min on 2 cores
    python bench/expert_precision.py --moment --precisions fp32,int8 --time-records 3 --update-docs  # MOMENT-large
"""

from __future__ import annotations

import json
import os
import time
from functools import partial

import numpy as np
import torch

from enecg_hf import EnECGConfig, EnECGModel
from enecg_hf.data import TASKS, subject_kfold
from enecg_hf.signal_enecg import normalize_ecg
from enecg_hf.features import FeatureTable
from enecg_hf.training import FitSettings, cross_validate, summarize
from enecg_hf.training.labels import encode_labels
from harness import REPO, RESULTS, interleaved, ludb, markdown_table, median_ms, parser, render_only, save


def build_models(moment: bool, precisions: list[str]) -> dict[str, EnECGModel]:
    """One model per precision (fp32 first), all with the fp32 model's weights: int8 holds a quantised copy, bf16
    autocasts the experts that take it."""
    config = json.loads((REPO / "hub_configs" / "offline_pretrained.json").read_text())
    if moment:
        config["experts"] = [{"name": "moment", "type": "moment", "input_length": 5000, "leads": ["II"],
                              "pretrained": None, "settings": {"preset": "large"}}]
    else:
        next(e for e in config["experts"] if e["name"] == "deepfade")["leads"] = ["II"]
    torch.manual_seed(0)
    models = {}
    for precision in precisions:
        models[precision] = EnECGModel.from_expert_sources(EnECGConfig(**config)).eval()
        if precision != "fp32":
            models[precision].load_state_dict(models["fp32"].state_dict())
            models[precision].set_expert_precision(precision)
    return models


@torch.no_grad()
def forward(model: EnECGModel, record: tuple[torch.Tensor, torch.Tensor], target: str = "pass"):
    """`record` = (raw, normalised) signals: the whole frozen pass on the raw one, or expert `target`'s forward on the
    normalised one; returns (output, ms)."""
    start = time.perf_counter()
    out = model.compute_features(record[0]) if target == "pass" else model.experts[target](record[1])
    return out, 1000 * (time.perf_counter() - start)


def timing(models: dict[str, EnECGModel], signals: torch.Tensor, repeats: int) -> dict:
    """ms per record of each expert and of the whole pass at each precision, and the speed-ups over fp32."""
    targets = [*models["fp32"].expert_names, "pass"]
    records = [(x, normalize_ecg(x, models["fp32"].config.normalization)) for x in signals[:, None]]
    calls = {f"{p}/{t}": partial(forward, model, target=t) for p, model in models.items() for t in targets}
    seconds = interleaved(calls, records, repeats)
    ms = {p: {t: median_ms(seconds[f"{p}/{t}"]) for t in targets} for p in models}
    return {"ms_per_record": ms, "speedup_over_fp32": {p: {t: ms["fp32"][t] / ms[p][t] for t in targets} for p in ms}}


def forced_bf16(model: EnECGModel, x: torch.Tensor) -> dict:
    """One record through each KEEP_IN_FP32 expert of the fp32 model, then with bf16 autocast forced (what the option
    refuses to do): time and drift."""
    record, out = (x, normalize_ecg(x, model.config.normalization)), {}
    for name, expert in model.experts.items():
        if expert.KEEP_IN_FP32 and expert.has_weights:
            ref, fp32_ms = forward(model, record, name)
            expert.autocast_dtype = torch.bfloat16
            got, bf16_ms = forward(model, record, name)
            expert.autocast_dtype = None
            drift_pct = float(100 * (got - ref).norm() / ref.norm())
            out[name] = {"fp32_ms": fp32_ms, "bf16_ms": bf16_ms, "drift_pct": drift_pct}
    return out


def drift(tables: dict[str, FeatureTable], names: list[str]) -> dict:
    """||e - e_fp32|| / ||e_fp32|| per record, in %: median and max over records, per precision and expert."""
    out = {p: {} for p in tables if p != "fp32"}
    for p, per_expert in out.items():
        for name, a, b in zip(names, tables["fp32"].expert_embeddings, tables[p].expert_embeddings):
            rel = ((b - a).norm(dim=1) / a.norm(dim=1).clamp_min(1e-12)).numpy()
            per_expert[name] = {"median_pct": 100 * float(np.median(rel)), "max_pct": 100 * float(rel.max())}
    return out


def downstream(config: EnECGConfig, tables: dict[str, FeatureTable], dataset, folds: int, epochs: int) -> dict:
    """Heads + gate cross-validated on fp32 and on int8 features: the same subject folds, initial weights and seeds."""
    result = {}
    for name in ("rr_interval", "sex"):
        keep, labels = encode_labels(dataset, TASKS[name])
        cv = subject_kfold(dataset.select(keep), folds, seed=0)
        task_config = EnECGConfig(**{**config.to_dict(), **TASKS[name].config_fields()})
        result[name] = {"records": len(keep)}
        for p in ("fp32", "int8"):
            torch.manual_seed(0)
            scores = cross_validate(EnECGModel(task_config).eval(), tables[p].select(keep, labels), cv, TASKS[name],
                                    FitSettings(epochs=epochs, seed=42))
            result[name][p] = summarize(scores)
    return result


def table(r: dict) -> str:
    """Time, speed-up and drift per expert and for the whole pass, forced bf16, and downstream CV."""
    ms, speedup, drifts = r["timing"]["ms_per_record"], r["timing"]["speedup_over_fp32"], r.get("drift", {})

    def pct(v):
        return f"{v['median_pct']:.2f} / {v['max_pct']:.2f}" if v else "–"

    rows = []
    for k in ms["fp32"]:
        bf16_ran = r["bf16_precisions"].get(k, "pass") if r["bf16_precisions"] else "–"
        bf16 = [f"{ms['bf16'][k]:.0f}", f"{speedup['bf16'][k]:.2f}×"] if "bf16" in ms else ["not run", "–"]
        rows.append([f"{k} (int8: {r['precisions'].get(k, 'pass')}, bf16: {bf16_ran})", f"{ms['fp32'][k]:.1f}",
                     f"{ms['int8'][k]:.1f}", f"{speedup['int8'][k]:.2f}×", *bf16,
                     pct(drifts.get("int8", {}).get(k)), pct(drifts.get("bf16", {}).get(k))])
    for k, v in r.get("forced_bf16", {}).items():
        rows.append([f"{k}, bf16 autocast forced (1 record)", f"{v['fp32_ms']:.0f}", "", "", f"{v['bf16_ms']:.0f}",
                     f"{v['fp32_ms'] / v['bf16_ms']:.2f}×", "", f"{v['drift_pct']:.2f} / –"])
    header = ["expert / pass", "fp32 ms", "int8 ms", "int8 speed-up", "bf16 ms", "bf16 speed-up",
              "int8 drift % (median / max)", "bf16 drift %"]
    measured = (f"Measured {r['date']}, {r['machine']}, load average {r['load'][0]:.1f} / {r['load'][1]:.1f} "
                f"(start / end); {r['time_records']} records × {r['repeats']} repetitions.")
    parts = [measured, markdown_table(header, rows, "lrrrrrrr")]
    if r.get("downstream"):
        metrics = {"rr_interval": ("mae", "rmse"), "sex": ("auroc", "accuracy")}
        rows = [[name, row["records"], m,
                 *(f"{row[p][m]['mean']:.4g} ± {row[p][m]['std']:.2g}" for p in ("fp32", "int8"))]
                for name, row in r["downstream"].items() for m in metrics[name]]
        header = ["task (LUDB, subject-wise CV)", "records", "metric", "fp32 features (mean ± std)", "int8 features"]
        parts.append(markdown_table(header, rows, "lrlrr"))
    return "\n\n".join(parts)


def main() -> None:
    p = parser(__doc__, "expert_precision.json")
    p.add_argument("--records", type=int, default=200, help="LUDB records for drift and downstream CV")
    p.add_argument("--time-records", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--moment", action="store_true", help="time a paper-size MOMENT-large instead (no downstream; "
                   "default --output bench/results/expert_precision_moment.json)")
    p.add_argument("--precisions", default="fp32,int8,bf16", help="fp32 and int8 always, fp32 first")
    args = p.parse_args()
    if args.moment and args.output == p.get_default("output"):
        args.output = RESULTS / "expert_precision_moment.json"
    section = "expert_precision_moment" if args.moment else "expert_precision"
    if render_only(args, table, section):
        return
    torch.set_num_threads(1)
    load = [os.getloadavg()[0]]
    models = build_models(args.moment, args.precisions.split(","))
    dataset, signals = ludb(args.time_records if args.moment else args.records)
    r = {"date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} CPU cores, 1 torch thread",
         "time_records": args.time_records, "repeats": args.repeats, "precisions": models["int8"].expert_precisions,
         "bf16_precisions": models["bf16"].expert_precisions if "bf16" in models else {},
         "timing": timing(models, signals[: args.time_records], args.repeats)}
    if not args.moment:
        tables = {p: FeatureTable.from_model(model, signals, torch.zeros(len(signals)), dataset["subject_id"],
                                             batch_size=8) for p, model in models.items()}
        r["drift"] = drift(tables, models["fp32"].expert_names)
        r["forced_bf16"] = forced_bf16(models["fp32"], signals[:1])
        r["downstream"] = downstream(models["fp32"].config, tables, dataset, args.folds, args.epochs)
    r["load"] = load + [os.getloadavg()[0]]
    save(r, args.output, table(r), section if args.update_docs else None)


if __name__ == "__main__":
    main()
