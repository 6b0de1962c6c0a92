"""The benchmarks' `--quick` modes run end to end and write complete, finite results (to a temporary path: the committed
results in bench/results/ are never touched by tests)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest


REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("ENECG_DATA_DIR", REPO.parent / "shared" / "data"))
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

EFFICIENCY_MODE_FIELDS = (
    "trainable_params", "total_params", "train_records", "batch_size", "epochs", "wall_time_5_epochs_s",
    "throughput_records_per_s", "train_step_throughput_records_per_s", "feature_extraction_s", "peak_rss_mb",
    "baseline_rss_mb", "peak_rss_above_baseline_mb", "measured_steps", "measured_records", "extrapolated", "how",
    "eval_mae_ms", "runs", "wall_time_runs_s",
)
EFFICIENCY_RATIOS = (
    "recompute_over_cached_wall_time", "full_over_cached_wall_time", "cached_over_full_peak_rss",
    "cached_over_full_peak_rss_above_baseline", "ensemble_over_sum_of_experts_latency",
)
QUALITY_METRICS = {"regression": ("mae", "mse", "rmse"),
                   "single_label_classification": ("accuracy", "precision", "recall", "f1")}


def non_finite_numbers(value, path="$"):
    """Paths of every number in a JSON tree that is NaN/infinite, and of every null."""
    if value is None:
        return [path]
    if isinstance(value, bool) or isinstance(value, str):
        return []
    if isinstance(value, (int, float)):
        return [] if math.isfinite(value) else [path]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in non_finite_numbers(v, f"{path}.{k}")]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in non_finite_numbers(v, f"{path}[{i}]")]
    return [f"{path} (unexpected {type(value).__name__})"]


def run_quick(script: str, tmp_path: Path, *extra: str) -> tuple[dict, str]:
    output = tmp_path / f"{Path(script).stem}.json"
    cmd = [sys.executable, str(REPO / "bench" / script), "--quick", "--output", str(output), *extra]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{script} --quick failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert output.is_file()
    return json.loads(output.read_text()), proc.stdout


@pytest.mark.slow
@pytest.mark.skipif(not (DATA_DIR / "ludb").is_dir(), reason=f"real ECGs not found under {DATA_DIR}")
def test_efficiency_quick(tmp_path):
    result, stdout = run_quick("efficiency.py", tmp_path)
    # It prints the table --update-docs would write into docs/benchmarks.md.
    assert "Ratios: (2)/(3) wall time" in stdout and "(1)/(3) wall time" in stdout and "| (3) cached" in stdout
    assert result["data"]["source"].endswith("(enecg_hf.data.build_dataset)")
    tiny = result["variants"]["tiny"]
    for mode in ("full_finetune", "frozen_recompute", "cached_features"):
        missing = [f for f in EFFICIENCY_MODE_FIELDS if f not in tiny["modes"][mode]]
        assert not missing, f"{mode} lacks {missing}"
        assert tiny["modes"][mode]["extrapolated"] is False  # quick runs every epoch in full
    assert set(tiny["inference"]["per_expert"]) == set(tiny["experts"])
    for key in ("sum_of_experts", "ensemble", "ensemble_over_sum_of_experts", "repeats"):
        assert key in tiny["inference"]
    assert set(EFFICIENCY_RATIOS) <= set(tiny["ratios"])
    assert len(tiny["targets_met"]) == 3
    # Frozen experts: LoRA modes train far fewer parameters than full fine-tuning, and the same number as each other.
    modes = tiny["modes"]
    assert modes["cached_features"]["trainable_params"] == modes["frozen_recompute"]["trainable_params"]
    assert modes["cached_features"]["trainable_params"] < modes["full_finetune"]["trainable_params"]
    # The labels variant: the paper's five tasks x folds on LUDB plus simulated records (the only ones with a potassium
    # label), the research loop (a fresh model and Trainer per task and fold, experts recomputed every step) against
    # one feature store shared by every fit; each task on the records that carry its label.
    labels = result["variants"]["labels"]
    assert labels["labels"] == ["rr_interval", "age", "sex", "potassium_flag", "arrhythmia"] and labels["folds"] == 2
    records = labels["records"]
    assert records["per_task"]["potassium_flag"] == {"simulated": records["simulated"]}
    assert records["per_task"]["age"] == {"ludb": records["ludb"], "simulated": records["simulated"]}
    loop, store = labels["modes"]["research_loop"], labels["modes"]["one_store"]
    assert loop["fits"] == store["fits"] == 5 * 2
    assert loop["train_records"] == store["train_records"] == records["ludb"] + records["simulated"]
    assert store["feature_extraction_s"] > 0 and loop["feature_extraction_s"] == 0
    for mode in (loop, store):  # where the time goes, each part measured and inside the whole loop's wall time
        parts = mode["time_parts_s"]
        assert parts["model_construction_s"] > 0 and parts["fits_s"] > 0 and parts["experts_forward_s"] > 0
        assert sum(parts[k] for k in ("model_construction_s", "feature_extraction_s", "fits_s")) <= \
            mode["wall_time_5_epochs_s"]
    assert store["time_parts_s"]["experts_forward_s"] <= store["time_parts_s"]["feature_extraction_s"]
    assert loop["time_parts_s"]["experts_forward_s"] <= loop["time_parts_s"]["fits_s"]
    assert "Where the time goes" in stdout
    assert 0 < store["cpu_time_s"] <= store["wall_time_5_epochs_s"] * 1.2 and loop["cpu_time_s"] > 0
    assert len(labels["ratios"]["research_loop_over_one_store_wall_time_per_round"]) == loop["runs"]
    assert labels["ratios"]["research_loop_over_one_store_wall_time"] > 1
    assert "Ratio: research loop / one store" in stdout
    assert not non_finite_numbers(result), non_finite_numbers(result)


@pytest.mark.slow
@pytest.mark.skipif(not (DATA_DIR / "ludb").is_dir(), reason=f"real ECGs not found under {DATA_DIR}")
def test_quality_quick(tmp_path):
    result, stdout = run_quick("quality.py", tmp_path, "--feature-store", str(tmp_path / "store"))
    assert "| **EnECG, default settings** (linear + FFN-LoRA heads, learned gate) |" in stdout  # docs/benchmarks.md
    tasks = result["tasks"]
    assert set(tasks) == {"rr_interval", "age", "sex", "arrhythmia"}
    experts = result["setup"]["experts"]
    for task, block in tasks.items():
        expected_rows = {"baseline:mean_or_majority", "uniform_ensemble", "enecg", "paper", "ablation:full_heads",
                         "ablation:gate_in_sample", "ablation:stacked_gate_only", "ablation:joint"}
        expected_rows |= {f"expert:{name}" for name in experts}
        if task == "rr_interval":
            expected_rows.add("baseline:neurokit_rr")
        assert expected_rows <= set(block["rows"]), f"{task}: missing rows {expected_rows - set(block['rows'])}"
        for row, values in block["rows"].items():
            for metric in QUALITY_METRICS[block["problem_type"]]:
                assert metric in values["metrics"], f"{task}/{row} lacks {metric}"
                assert {"mean", "std"} <= set(values["metrics"][metric])
        # The verdict compares the default EnECG with its own experts, their uniform average and the baseline.
        verdict = block["verdict"]
        assert verdict["best_expert"] in {f"expert:{name}" for name in experts}
        assert {"as_good_as_best_expert", "as_good_as_uniform", "beats_baseline"} <= set(verdict)
        if task != "rr_interval":  # several sources: the same folds also scored without LUDB's records
            assert "metrics_excluding_ludb" in block["rows"]["enecg"]
    # Leave-one-source-out: every task, each held-out group scored by the default, its experts, the uniform average,
    # the baseline and the fitted alternatives; RR trained on LUDB and scored on the Challenge records and MIT-BIH
    # windows against their references.
    assert set(result["loso"]) == set(tasks)
    for task, block in result["loso"].items():
        assert {"enecg", "uniform_ensemble", "baseline:mean_or_majority", "loso:previous_default",
                "loso:ffn_heads", "loso:source_inner_folds"} | {f"expert:{n}" for n in experts} <= set(block["rows"])
        if task == "rr_interval":  # LUDB trains RR; it is never held out
            assert "ludb" not in block["groups"]
        for values in block["rows"].values():
            assert block["metric"] in values["pooled"] and set(values["groups"]) == set(block["groups"])
        assert {"as_good_as_best_expert", "beats_baseline"} <= set(block["verdict"])
    assert "mitdb" in result["loso"]["rr_interval"]["groups"]
    assert "Challenge, pooled" in stdout and "**pooled**" in stdout
    # Nulls are allowed only where a field does not apply (label_mean of a classification task, no pretrained config).
    bad = [p for p in non_finite_numbers(result) if not p.endswith((".label_mean", ".pretrained_config"))]
    assert not bad, bad


@pytest.mark.slow
@pytest.mark.skipif(not (DATA_DIR / "ludb").is_dir(), reason=f"real ECGs not found under {DATA_DIR}")
def test_median_beat_quick(tmp_path):
    result, stdout = run_quick("median_beat.py", tmp_path)
    assert "| QRS onset |" in stdout and "| median_beat |" in stdout
    (run,) = result["runs"]
    assert len(run["records"]) == 12 and set(run["ms_per_record"]) == {
        "median_beat", "median_beat+measurements", "features (dwt)", "features (prominence)"}
    for name in ("p_on", "p_off", "qrs_on", "qrs_off", "t_on", "t_off", "p_dur", "pr", "qrs", "qt"):
        assert run["all_leads"][name]["scored"] > 0 and run["all_leads"][name]["mae_ms"] < 100, name
    assert set(run["per_lead"]) == {"I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"}
    assert not non_finite_numbers({k: v for k, v in result.items() if k != "runs"})


@pytest.mark.slow
@pytest.mark.skipif(not (DATA_DIR / "ptbxl_sample500").is_dir(), reason=f"PTB-XL sample not found under {DATA_DIR}")
def test_source_rate_quick(tmp_path):
    result, stdout = run_quick("source_rate.py", tmp_path, "--feature-store", str(tmp_path / "store"))
    assert "| **EnECG, default settings** (linear + FFN-LoRA heads, learned gate) |" in stdout  # docs/data.md's table
    assert set(result["tasks"]) == {"age", "sex", "arrhythmia"} and result["data"]["records"] == 40
    experts = result["setup"]["experts"]
    assert set(result["embedding_drift"]) == set(experts)
    assert all(0 <= drift < 1 for drift in result["embedding_drift"].values())
    for task, block in result["tasks"].items():
        assert {"enecg", "uniform_ensemble", "baseline:mean_or_majority", *(f"expert:{n}" for n in experts)} <= set(
            block["rows"]), task
        for row, values in block["rows"].items():
            assert values["folds"] == 2 and {"mean", "std"} <= set(values["native"]) <= set(values["via_100hz"])
        # The baseline sees only labels: identical on both versions, so the folds and labels are the same.
        assert block["rows"]["baseline:mean_or_majority"]["difference_mean"] == 0
    bad = [p for p in non_finite_numbers(result) if not p.endswith((".label_mean", ".pretrained_config"))]
    assert not bad, bad


# Every docs table that a script writes, with the function that renders it from the saved results (`--render-only`).
RENDERED_SECTIONS = [  # (script, renderer, results file, docs section, docs file)
    ("efficiency", "docs_table", "efficiency.json", "efficiency", "benchmarks.md"),
    ("quality", "docs_table", "quality.json", "quality", "benchmarks.md"),
    ("quality", "loso_table", "quality_loso.json", "quality_loso", "benchmarks.md"),
    ("multitask", "markdown", "multitask.json", "multitask", "benchmarks.md"),
    ("expert_precision", "table", "expert_precision.json", "expert_precision", "benchmarks.md"),
    ("expert_precision", "table", "expert_precision_moment.json", "expert_precision_moment", "benchmarks.md"),
    ("features_accuracy", "table", "features_accuracy.json", "features_accuracy", "experts.md"),
    ("median_beat", "TABLES", "median_beat.json", "median_beat_accuracy", "experts.md"),
    ("median_beat", "TABLES", "median_beat.json", "median_beat_speed", "experts.md"),
    ("data_build", "readers_table", "data_build.json", "wfdb_reader", "data.md"),
    ("data_build", "TABLES", "data_build.json", "build_dataset", "data.md"),
    ("source_rate", "table", "source_rate.json", "source_rate", "data.md"),
    ("expert_speed", "table", "expert_speed.json", "expert-speed", "benchmarks.md"),
    ("expert_speed", "options_table", "expert_speed_options.json", "expert-speed-options", "benchmarks.md"),
    ("extraction_processes", "table", "extraction_processes.json", "extraction-processes", "benchmarks.md"),
    ("enecg_base", "docs_table", "enecg_base.json", "enecg_base", "benchmarks.md"),
]


@pytest.mark.parametrize("script,renderer,results,section,docs", RENDERED_SECTIONS,
                         ids=[f"{s}:{section}" for s, _, _, section, _ in RENDERED_SECTIONS])
def test_docs_tables_are_what_the_committed_results_render_to(monkeypatch, script, renderer, results, section, docs):
    """A table edited by hand, or results re-measured without `--update-docs`, would leave the docs saying other
    numbers than bench/results/ holds."""
    import datasets

    monkeypatch.syspath_prepend(str(REPO / "bench"))
    module = __import__(script)
    datasets.enable_progress_bars()  # some scripts turn them off for their own output
    render = module.TABLES[section] if renderer == "TABLES" else getattr(module, renderer)
    text = (REPO / "docs" / docs).read_text()
    start, end = f"<!-- {section}:start -->", f"<!-- {section}:end -->"
    assert start in text and end in text, f"docs/{docs} has no section {section}"
    committed = text.split(start, 1)[1].split(end, 1)[0].strip("\n")
    assert committed == render(json.loads((REPO / "bench" / "results" / results).read_text()))


def test_quality_groups_a_patient_across_folders_of_one_database(monkeypatch, tmp_path):
    """bench/quality.py's subject of a record: its database and subject id, not its folder, so a PTB-XL patient with
    records in two folders (e.g. ptbxl_sample500 and ptbxl_lr1500) is one subject of every subject-wise fold."""
    monkeypatch.syspath_prepend(str(REPO / "tests" / "data"))
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import quality
    from ecg_files import write_ptbxl_tree

    write_ptbxl_tree(tmp_path / "high", rates=lambda ecg_id: (500,))
    write_ptbxl_tree(tmp_path / "low", records=[(601, 13243, 61, 0, "{'SR': 0.0}", 2),
                                                (602, 20001, 44, 1, "{'SR': 0.0}", 4)], rates=lambda ecg_id: (100,))
    _, labels = quality.load_records(None, {"high": "ptb-xl", "low": "ptb-xl"}, tmp_path)
    subject = dict(zip(labels["record_id"], labels["subject"]))
    assert subject["2"] == subject["3"] == subject["601"] != subject["602"]
    groups = labels["subject"].to_numpy()
    patient = np.flatnonzero(labels["record_id"].isin(["2", "3", "601"]))
    for seed in range(3):
        for _, test in quality.subject_folds(groups, 3, seed):
            assert set(patient) <= set(test) or not set(patient) & set(test)


def test_rr_references_of_the_unseen_sources(monkeypatch):
    """The leave-one-source-out RR references: R-peak intervals of neurokit2 on lead II (a simulated record's exact RR
    within 1 %), and MIT-BIH windows cut by the pipeline's windowed prediction with the mean interval of the
    annotated beats inside each (checked by hand against the R-peak file)."""
    import pandas as pd

    from enecg_hf.data.simulate import simulate_record

    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import quality

    signals, labels = zip(*(simulate_record(i) for i in range(3)))
    reference, agree = quality.reference_rr(signals)
    np.testing.assert_allclose(reference, [label["rr_interval"] for label in labels], rtol=0.01)
    assert agree.all()
    assert np.isnan(quality.reference_rr([np.zeros((12, 5000), dtype=np.float32)])[0][0])  # flat: no reference
    if not (DATA_DIR / "mitdb" / "100.hea").is_file():
        pytest.skip(f"MIT-BIH records not found under {DATA_DIR}")
    monkeypatch.setattr(quality, "DATA_DIR", DATA_DIR)
    config = json.loads((REPO / "hub_configs" / "tiny.json").read_text())
    windows, table = quality.mitdb_windows(config, max_windows=2)
    assert "102@0s" not in set(table["record_id"]) and "104@0s" not in set(table["record_id"])  # V5, not lead II
    assert windows[0]["signal"] is not None and np.asarray(windows[0]["signal"]).shape == (12, 5000)
    beats = pd.read_csv(DATA_DIR / "mitdb" / "100_all.csv")["R"].to_numpy() / 360.0
    second = beats[(beats >= 10) & (beats < 20)]
    assert table.set_index("record_id").loc["100@10s", "reference_rr"] == pytest.approx(np.diff(second).mean() * 1000)
    lead_ii = np.asarray(windows[0]["signal"])[1]
    assert np.ptp(lead_ii) > 0.5 and not np.asarray(windows[0]["signal"])[[0, 2, 6]].any()  # II read, others zero


@pytest.mark.slow
@pytest.mark.skipif(not (DATA_DIR / "ludb").is_dir(), reason=f"LUDB not found under {DATA_DIR}")
def test_extraction_processes_quick(tmp_path):
    """One process and two (`accelerate launch`) fill stores with the same values."""
    result, stdout = run_quick("extraction_processes.py", tmp_path)
    assert "| 2 processes |" in stdout and result["stores_equal"] is True
    assert set(result["median_s"]) == {"1 process", "2 processes"} and result["speedup"] > 0


def test_learning_curve_subsamples_whole_subjects_nested(monkeypatch):
    """bench/enecg_base.py's learning curve: a fraction keeps whole subjects of the training fold (never a record of
    a subject without the others), the smaller fraction's subjects are among the larger's, and 100 % is the fold."""
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    from enecg_base import subsample_subjects

    groups = np.asarray([f"s{i // 3}" for i in range(90)])  # 30 subjects of 3 records
    train = np.arange(0, 90, 1)[np.arange(90) % 5 != 0]  # a fold's rows (some records of a subject held out)
    quarter, half = (subsample_subjects(train, groups, f, seed=7) for f in (0.25, 0.5))
    assert np.array_equal(subsample_subjects(train, groups, 1.0, seed=7), train)
    assert set(quarter) <= set(half) <= set(train)
    assert len(set(groups[quarter])) == 8 and len(set(groups[half])) == 15  # ceil(0.25 * 30), 0.5 * 30
    for rows in (quarter, half):  # whole subjects: every training row of a chosen subject is kept
        chosen = set(groups[rows])
        assert set(train[np.isin(groups[train], list(chosen))]) == set(rows)
    assert not np.array_equal(quarter, subsample_subjects(train, groups, 0.25, seed=8))


def test_learning_curve_runs_over_other_folds_combine_by_fold_number(monkeypatch):
    """bench/enecg_base.py --combine: runs over other outer folds (--folds 4,5 after --first-folds 3) become one task
    block with every fold once, in order, and runs over other fractions of the same fold merge into that fold."""
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    from enecg_base import combine

    def run(folds, fraction, seconds):
        entries = [{"fold": f, "fractions": {fraction: {"fold_seen": f}}} for f in folds]
        return {"tasks": {"age": {"folds": entries}}, "setup": {"fractions": [float(fraction)]},
                "run": {"elapsed_s": seconds}}

    merged = combine([run([1, 2, 3], "1.0", 10.0), run([4, 5], "1.0", 30.0), run([2], "0.5", 5.0)])
    folds = merged["tasks"]["age"]["folds"]
    assert [f["fold"] for f in folds] == [1, 2, 3, 4, 5]
    assert all(f["fractions"]["1.0"] == {"fold_seen": f["fold"]} for f in folds)
    assert set(folds[1]["fractions"]) == {"1.0", "0.5"} and set(folds[0]["fractions"]) == {"1.0"}
    assert merged["setup"]["fractions"] == [0.5, 1.0] and merged["run"]["elapsed_s"] == 30.0
