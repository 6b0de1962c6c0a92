"""Source groups and leave-one-source-out folds (`enecg_hf.data.splits`): which database and institution a record
comes from, and folds that never train on the held-out institution."""

from __future__ import annotations

import datasets
import numpy as np

from enecg_hf.data import institution, leave_one_source_out, source_group, source_groups


def test_challenge_records_are_grouped_by_the_database_their_name_says():
    assert source_group("challenge", "E00001") == "challenge/georgia"
    assert source_group("challenge", "HR00599") == "challenge/ptb-xl"
    assert source_group("challenge", "JS01052") == "challenge/chapman-ningbo"
    assert source_group("challenge", "Q0001") == "challenge/cpsc-extra"
    assert source_group("challenge", "A0001") == "challenge/cpsc2018"
    assert source_group("challenge", "X1") == "challenge/other"
    assert source_group("ludb", "1") == "ludb" and source_group(None, "7") == "unknown"


def test_a_source_file_at_another_rate_is_a_group_of_its_own_from_the_same_institution():
    assert source_group("ptb-xl", "17", source_rate=100.0, rate=500) == "ptb-xl@100Hz"
    assert source_group("ptb-xl", "17", source_rate=500.0, rate=500) == "ptb-xl"
    assert source_group("ptb-xl", "17", source_rate=float("nan"), rate=500) == "ptb-xl"
    # PTB-XL in any form, and the Challenge's copy of it, are one institution; so are CPSC 2018 and CPSC-extra.
    assert {institution(g) for g in ("ptb-xl", "ptb-xl@100Hz", "challenge/ptb-xl")} == {"ptb"}
    assert institution("challenge/cpsc2018") == institution("challenge/cpsc-extra") == "cpsc"
    assert institution("ludb") == "ludb"


def test_source_groups_of_a_dataset_follow_its_row_order():
    dataset = datasets.Dataset.from_dict({
        "record_id": ["1", "E00002", "HR00003", "4"], "source": ["ludb", "challenge", "challenge", "ptb-xl"],
        "sampling_rate": [500] * 4, "source_sampling_rate": [500.0, 500.0, 500.0, 100.0]})
    shuffled = dataset.select([3, 0, 2, 1])
    assert source_groups(shuffled).tolist() == ["ptb-xl@100Hz", "ludb", "challenge/ptb-xl", "challenge/georgia"]
    no_rates = dataset.remove_columns(["source_sampling_rate", "sampling_rate"])
    assert source_groups(no_rates).tolist() == ["ludb", "challenge/georgia", "challenge/ptb-xl", "ptb-xl"]


def test_leave_one_source_out_never_trains_on_the_held_out_institution():
    groups = np.array(["ludb"] * 3 + ["ptb-xl"] * 4 + ["challenge/ptb-xl"] * 2 + ["challenge/georgia"] * 2
                      + ["ptb-xl@100Hz"] * 2)
    folds = {group: (train, test) for group, train, test in leave_one_source_out(groups)}
    assert sorted(folds) == ["challenge/georgia", "challenge/ptb-xl", "ludb", "ptb-xl", "ptb-xl@100Hz"]
    for group, (train, test) in folds.items():
        assert set(groups[test]) == {group}
        assert institution(group) not in {institution(g) for g in groups[train]}
    # Holding out any PTB-XL group trains on LUDB and Georgia only.
    assert folds["ptb-xl@100Hz"][0].tolist() == folds["challenge/ptb-xl"][0].tolist() == [0, 1, 2, 9, 10]
    assert [g for g, _, _ in leave_one_source_out(groups, min_records=3)] == ["ludb", "ptb-xl"]
    assert leave_one_source_out(np.array(["ptb-xl", "challenge/ptb-xl"])) == []  # one institution: nothing to train on
