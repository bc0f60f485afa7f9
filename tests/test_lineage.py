"""Run lineage (issue #31): a round never chains onto a parent, or an ancestor, that trained on the perturbations
it holds out, and `run:EXP` resolves among runs of the same data and split.

The failure this pins: after two 0905 runs on two splits, `train +experiment=0906` with the first split chained
onto the newest 0905 run, in which one of its test perturbations had been a training perturbation (avg_score
0.017 -> 0.137, all of it on that perturbation), and nothing said so.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest_train import train
from tahoe_ft.errors import UserError
from tahoe_ft.lineage import check_no_leak, split_id

# two splits of the tiny demo's 8 knock-outs; S2 trains on S1's test perturbations (and the reverse)
S1 = ["data.split_toml=null", "data.val_perts=[GENE00003,GENE00007]", "data.test_perts=[GENE00008,GENE00015]"]
S2 = ["data.split_toml=null", "data.val_perts=[GENE00021,GENE00028]", "data.test_perts=[GENE00038,GENE00053]"]


def _info(run: Path) -> dict:
    return json.loads((run / "run.json").read_text())


@pytest.fixture(scope="module")
def two_splits(tmp_path_factory) -> dict[str, Path]:
    """pretrain, then 0905 on S1 and — newer — 0905 on S2, in one runs folder."""
    root = tmp_path_factory.mktemp("lineage")
    runs = {"root": root, "pretrain": train(root, "pretrain")}
    runs["s1"] = train(root, "0905", *S1)
    runs["s2"] = train(root, "0905", *S2)
    return runs


def test_every_run_records_its_data_split_training_groups_and_ancestors(two_splits):
    s1 = json.loads((two_splits["s1"] / "manifest.json").read_text())
    held = {(e["cell_type"], e["pert"], e["split"]) for e in s1["held_out"]}
    assert {p for _, p, _ in held} == {"GENE00003", "GENE00007", "GENE00008", "GENE00015"}
    for ct, perts in s1[
        "trained"
    ].items():  # what trained: every knock-out of the cell type but the held-out ones
        assert not {p for c, p, _ in held if c == ct} & set(perts)
        assert set(perts) == {"GENE00021", "GENE00028", "GENE00038", "GENE00053"}
    assert s1["split_id"] == split_id(s1["held_out"]) and len(s1["data_fingerprint"]) == 16
    (pre,) = s1["lineage"]  # the base model, with what it trained on
    assert pre["experiment"] == "pretrain" and pre["run_id"] == two_splits["pretrain"].name
    assert pre["trained"] and pre["data_fingerprint"] != s1["data_fingerprint"]
    assert _info(two_splits["s1"])["lineage"][0]["run_id"] == two_splits["pretrain"].name
    assert _info(two_splits["s1"])["split_id"] != _info(two_splits["s2"])["split_id"]


def test_the_next_round_chains_onto_its_own_split_not_the_newest_run(two_splits):
    run = train(two_splits["root"], "0906", *S1)
    lineage = _info(run)["lineage"]
    # the S1 0905 run, though the S2 one is newer; then its own parent
    assert [e["run_id"] for e in lineage] == [two_splits["s1"].name, two_splits["pretrain"].name]
    assert lineage[0]["checkpoint"].startswith(str(two_splits["s1"]))
    report = json.loads((run / "init_report.json").read_text())
    assert str(two_splits["s1"]) in report["source"]
    # the whole chain, with what each trained on, travels in the checkpoint's manifest
    m = json.loads((run / "manifest.json").read_text())
    assert [e["experiment"] for e in m["lineage"]] == ["0905", "pretrain"]
    assert all(e["trained"] for e in m["lineage"])


def test_a_parent_that_trained_on_a_test_perturbation_is_refused(two_splits):
    before = sorted(p.name for p in (two_splits["root"] / "runs" / "0906").iterdir())
    leaky = two_splits["s2"] / "checkpoints" / "best-val.pt"
    with pytest.raises(UserError, match=r"init_from leaks: the parent 0905/\S+ trained on 'GENE000(08|15)'"):
        train(two_splits["root"], "0906", *S1, f"init_from={leaky}")
    assert (
        sorted(p.name for p in (two_splits["root"] / "runs" / "0906").iterdir()) == before
    )  # nothing written


def test_run_ref_with_no_run_of_this_split_is_refused_not_resolved_to_another(two_splits, tmp_path):
    # a folder whose only 0905 run is of S2: the S1 round has no parent of its own split
    s2 = two_splits["s2"]
    shutil.copytree(s2, tmp_path / "runs" / "0905" / s2.name)
    args = [*S1, f"runs_dir={tmp_path / 'runs'}"]
    with pytest.raises(UserError, match=r"no run of '0905' .* trained on this data with this split"):
        train(two_splits["root"], "0906", *args)
    assert not (tmp_path / "runs" / "0906").exists()


def test_an_ancestor_that_trained_on_a_held_out_group_is_refused_per_cell_type():
    held = [{"dataset": "d", "cell_type": "K562", "pert": "KMT2A", "split": "test"}]
    parent = {"experiment": "0906", "run_id": "a", "trained": {"K562": ["HK2"]}}
    grand = {"experiment": "0905", "run_id": "b", "trained": {"K562": ["KMT2A"]}}
    with pytest.raises(UserError, match=r"ancestor 1 \(the parent's parent\) 0905/b trained on 'KMT2A'"):
        check_no_leak([parent, grand], held)
    # the same perturbation trained in another cell type is no leak (the rule is per cell type)
    other = {"experiment": "0905", "run_id": "c", "trained": {"U87MG": ["KMT2A"]}}
    assert check_no_leak([parent, other], held) == []
    # a checkpoint that records no training groups cannot be checked, and is named as such
    assert check_no_leak([{"experiment": "x", "run_id": "u", "trained": None}], held) == ["x/u"]


def test_a_run_that_dies_before_fit_is_marked_failed_with_its_error_line(two_splits, tmp_path):
    bad = tmp_path / "bad.pt"  # a parent whose weights cannot load into the model: dies after the run folder
    import torch

    ck = torch.load(two_splits["s1"] / "checkpoints" / "best-val.pt", weights_only=False)
    ck["state_dict"] = {k: v[..., :1] if v.ndim else v for k, v in ck["state_dict"].items()}
    torch.save(ck, bad)
    with pytest.raises(Exception):  # noqa: B017 - whatever it is, the run must not stay "running"
        train(two_splits["root"], "0906", *S1, f"init_from={bad}", f"runs_dir={tmp_path / 'runs'}")
    (run,) = [p for p in (tmp_path / "runs" / "0906").iterdir() if not p.is_symlink()]
    info = _info(run)
    assert info["status"] == "failed" and info["error"]
