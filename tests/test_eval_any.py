"""`tahoe-ft eval` on predictions from anywhere (no predict.json): the labels by key, the training cells from
`train=` (or the whole screen with `split_toml=`), the features from `features=`, and the whole panel and the
ceiling beside the prediction. Real files, the real CLI and the real cell-eval on the tiny demo screen, with
non-default column names (perturbations in `condition`, control `control`, cell types in `line`).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

import tahoe_ft
from conftest_train import cli
from tahoe_ft.config import EvalConfig

REPO = Path(__file__).resolve().parents[1]
PC, CTRL, CT = "condition", "control", "line"
LABELS = {"pert_col": PC, "control_pert": CTRL, "cell_type_col": CT}
ARGS = [f"{k}={v}" for k, v in LABELS.items()]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The tiny demo screen relabelled; real = its test perturbations and controls, train = the screen minus
    the split's val/test perturbations, pred = real's cells with noise on the perturbed ones (in their own
    folder, as a prediction from elsewhere would be)."""
    from tahoe_ft.data.inputs import parse_split_toml
    from upstream_run import demo_files

    root = tmp_path_factory.mktemp("eval_any")
    demo = demo_files(root)
    screen = ad.read_h5ad(demo["screen"])
    screen.obs = screen.obs.rename(columns={"target_gene": PC, "cell_type": CT})
    screen.obs[PC] = screen.obs[PC].astype(str).replace({"non-targeting": CTRL}).astype("category")
    screen.X = np.asarray(screen.X.toarray(), dtype=np.float32)
    del screen.layers["counts"], screen.obsm["X_state"]
    split = parse_split_toml(demo["split"])
    test = {p for t in split.fewshot.values() for p in t["test"]}
    held = test | {p for t in split.fewshot.values() for p in t["val"]}
    perts = screen.obs[PC].astype(str)
    real = screen[perts.isin(test | {CTRL}).to_numpy()].copy()
    train = screen[~perts.isin(held).to_numpy()].copy()
    pred = real.copy()
    moved = (pred.obs[PC] != CTRL).to_numpy()
    noise = np.random.default_rng(0).normal(0, 0.5, (int(moved.sum()), pred.n_vars))
    pred.X[moved] = np.clip(pred.X[moved] + noise, 0, 14).astype(np.float32)
    out = {"root": root, "pred": root / "outside" / "pred.h5ad", "features": demo["pert_features"]}
    out["pred"].parent.mkdir()
    for name, a in (("screen", screen), ("real", real), ("train", train), ("pred", pred)):
        out.setdefault(name, root / f"{name}.h5ad")
        a.write_h5ad(out[name])
    out["toml"] = root / "split.toml"  # the demo's split, naming the relabelled screen
    out["toml"].write_text(Path(demo["split"]).read_text().replace(str(demo["screen"]), str(out["screen"])))
    out["test"], out["runs"] = sorted(test), root / "runs"
    return out


def evaluate(files, run_dir: Path, **keys) -> tahoe_ft.evaluation.Score:
    keys = {"pred": files["pred"], "real": files["real"], "train": files["train"], **keys}
    return tahoe_ft.evaluate(
        EvalConfig(
            **{k: str(v) for k, v in keys.items()},
            **LABELS,
            run_dir=str(run_dir),
            runs_dir=str(files["runs"]),
            num_threads=1,
        )
    )


@pytest.fixture(scope="module")
def scored(files):
    """`tahoe-ft eval pred= real= train= pert_col= control_pert= cell_type_col=` through the CLI."""
    args = [f"pred={files['pred']}", f"real={files['real']}", f"train={files['train']}", *ARGS]
    proc = cli("eval", *args, f"runs_dir={files['runs']}", "num_threads=1", cwd=files["root"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads((files["pred"].parent / "eval" / "score.json").read_text())


def test_outside_files_get_the_panel_and_the_ceiling_through_the_cli(files, scored):
    stdout, on_disk = scored
    assert {"ceiling", "cell_mean", "linear", "control"} <= set(on_disk["baselines"])
    assert "feature_ridge" not in on_disk["baselines"] and "feature_ridge" in on_disk["baseline_notes"]
    assert str(files["train"]) in on_disk["baseline_notes"]["training_cells"]
    assert (on_disk["pert_col"], on_disk["control_pert"], on_disk["celltype_col"]) == (PC, CTRL, CT)
    assert set(on_disk["per_celltype"]) == {"CT0", "CT1"}
    assert math.isfinite(on_disk["avg_score"]) and on_disk["baselines"]["cell_mean"][
        "avg_score"
    ] == pytest.approx(0.0, abs=1e-6)
    # the table: the prediction named by its file, then every baseline and the ceiling
    rows = [line.split()[0] for line in stdout.strip().splitlines()[1:] if line.strip()]
    assert rows[0] == "pred.h5ad" and f"{on_disk['avg_score']:.4f}" in stdout.splitlines()[1]
    assert set(on_disk["baselines"]) <= set(rows) and rows[len(on_disk["baselines"])] == "ceiling"
    # only eval/ is written beside the prediction
    assert sorted(p.name for p in files["pred"].parent.iterdir()) == ["eval", "pred.h5ad"]
    # the Python API on the same keys gives the same score and panel (the panel from the cache)
    api = evaluate(files, files["root"] / "api")
    assert api.avg_score == pytest.approx(on_disk["avg_score"], rel=1e-12)
    assert api.baselines == on_disk["baselines"]


def test_split_toml_route_gives_the_panel_of_the_filtered_train_file(files, scored):
    """train=<whole screen> split_toml=<its TOML>: the same training cells, so the same panel."""
    from tahoe_ft.data.labels import ScreenLabels
    from tahoe_ft.evaluation.run import read_training_cells

    labels = ScreenLabels(PC, CTRL, CT)
    genes = list(ad.read_h5ad(files["real"], backed="r").var_names)
    held = {(ct, p) for ct in ("CT0", "CT1") for p in files["test"]}
    common = dict(labels=labels, celltype_col=CT, genes=genes, held_out=held, max_per_group=15)
    a, _ = read_training_cells(files["train"], **common)
    b, note = read_training_cells(files["screen"], split_toml=str(files["toml"]), **common)
    assert "split_toml=" in note and a.obs.equals(b.obs) and np.array_equal(a.X, b.X)
    _, on_disk = scored
    score = evaluate(files, files["root"] / "toml", train=files["screen"], split_toml=files["toml"])
    assert score.baselines == on_disk["baselines"]
    assert score.avg_score == pytest.approx(on_disk["avg_score"], rel=1e-12)


def test_features_add_feature_ridge(files, scored):
    score = evaluate(files, files["root"] / "feat", features=files["features"])
    ridge = score.baselines["feature_ridge"]
    assert math.isfinite(ridge["avg_score"]) and "penalty" in score.baseline_notes["feature_ridge"]
    assert {"ceiling", "cell_mean", "linear"} <= set(score.baselines)


def test_real_cells_as_the_prediction_beat_cell_mean(files, scored):
    folder = files["root"] / "perfect"
    folder.mkdir()
    shutil.copy(files["real"], folder / "pred.h5ad")
    score = evaluate(files, folder, pred=folder / "pred.h5ad")
    assert score.avg_score > max(
        score.baselines["cell_mean"]["avg_score"], score.baselines["linear"]["avg_score"]
    )
    assert score.avg_score > 0.9


def _refused(files, capsys, *args: str) -> str:
    """`tahoe-ft eval ARGS` in this process: exit 2, one line on stderr (returned), nothing under eval/."""
    from tahoe_ft import cli as tahoe_cli

    run_dir = files["root"] / "refused"
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        tahoe_cli.main(["eval", f"run_dir={run_dir}", f"runs_dir={files['runs']}", *args])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert not (run_dir / "eval").exists()
    return err


def test_leaking_or_bad_inputs_are_one_line_naming_the_key(files, capsys, tmp_path):
    screen = ad.read_h5ad(files["screen"])
    leaked = (screen.obs[PC].astype(str) == files["test"][0]) & (screen.obs[CT].astype(str) == "CT0")
    train = ad.concat([ad.read_h5ad(files["train"]), screen[leaked.to_numpy()]])
    train.write_h5ad(tmp_path / "leaky.h5ad")
    pair = [f"pred={files['pred']}", f"real={files['real']}"]
    err = _refused(files, capsys, *pair, f"train={tmp_path / 'leaky.h5ad'}", *ARGS)
    assert "leak" in err and f"CT0/{files['test'][0]}" in err and "train=" in err
    # the wrong labels: each names its key (and the file's columns or labels)
    err = _refused(files, capsys, *pair, f"train={files['train']}")
    assert "pert_col=target_gene" in err and "condition" in err
    err = _refused(files, capsys, *pair, f"pert_col={PC}", "cell_type_col=cell_type")
    assert "cell_type_col=cell_type" in err and CT in err
    err = _refused(files, capsys, *pair, f"pert_col={PC}")
    assert "control_pert=non-targeting" in err
    err = _refused(files, capsys, *pair, *ARGS, f"split_toml={files['toml']}")
    assert "split_toml=" in err and "train=" in err
    err = _refused(files, capsys, *pair, *ARGS, f"train={files['real']}")  # the held-out cells themselves
    assert "leak" in err
    # train without a gene of real, and features without a held-out perturbation's vector
    ad.read_h5ad(files["train"])[:, 1:].copy().write_h5ad(tmp_path / "fewer_genes.h5ad")
    err = _refused(files, capsys, *pair, *ARGS, f"train={tmp_path / 'fewer_genes.h5ad'}")
    assert "train=" in err and "genes" in err
    import torch

    feats = torch.load(files["features"], weights_only=True)
    torch.save({k: v for k, v in feats.items() if k != files["test"][0]}, tmp_path / "feats.pt")
    err = _refused(
        files, capsys, *pair, *ARGS, f"train={files['train']}", f"features={tmp_path / 'feats.pt'}"
    )
    assert "features=" in err and files["test"][0] in err


# -- nothing lost (issue #31): a failed eval leaves every earlier file as it was -------------------------------


def _tree(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_eval_without_training_cells_or_a_cached_baseline_writes_nothing(files, capsys, tmp_path):
    """Without train= and without a checkpoint, the baseline the score is normalised against must come from
    the cache: that is checked first (it used to fail after writing eval.log, four cell-eval tables and a
    real-DE cache entry)."""
    from tahoe_ft import cli as tahoe_cli

    run_dir, runs = tmp_path / "run", tmp_path / "runs"
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        tahoe_cli.main(
            [
                "eval",
                f"pred={files['pred']}",
                f"real={files['real']}",
                *ARGS,
                f"run_dir={run_dir}",
                f"runs_dir={runs}",
            ]
        )
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1, err
    assert "no training cells for the cell-mean baseline" in err and "pass train=" in err
    assert not run_dir.exists() and not runs.exists()


def test_a_failing_evaluation_keeps_the_earlier_one_and_appends_to_its_log(files, tmp_path, monkeypatch):
    import tahoe_ft.evaluation.run as run_mod

    run_dir = tmp_path / "run"
    keys = {"baselines": "false"}
    first = evaluate(files, run_dir, **keys)
    before = _tree(run_dir / "eval")
    assert {"score.json", "eval.log", "CT0_results.csv", "CT1_agg_results.csv"} <= set(before)

    def broken(*args, **kwargs):  # the diagnostics come after every cell-eval table was written
        raise RuntimeError("the disk went away")

    monkeypatch.setattr(run_mod, "diagnostics", broken)
    with pytest.raises(RuntimeError, match="the disk went away"):
        evaluate(files, run_dir, **keys)
    after = _tree(run_dir / "eval")
    assert after.keys() == before.keys()  # no staging folder or partial table left
    assert {k: v for k, v in after.items() if k != "eval.log"} == {
        k: v for k, v in before.items() if k != "eval.log"
    }
    assert after["eval.log"].startswith(before["eval.log"]) and len(after["eval.log"]) > len(
        before["eval.log"]
    )
    assert json.loads(after["score.json"])["avg_score"] == first.avg_score


def test_real_without_control_cells_is_told_so(files, capsys, tmp_path):
    real = ad.read_h5ad(files["real"])
    real[(real.obs[PC] != CTRL).to_numpy()].copy().write_h5ad(tmp_path / "no_controls.h5ad")
    err = _refused(files, capsys, f"pred={files['pred']}", f"real={tmp_path / 'no_controls.h5ad'}", *ARGS)
    assert "no_controls.h5ad) has no control cells: pred has" in err and "add them to real" in err
    assert "pass control_pert" not in err  # the label is right: real lacks the cells


def test_a_re_evaluation_removes_only_what_an_evaluation_wrote(files, tmp_path):
    """eval/ beside a `pred=` from elsewhere may hold the user's own files: a re-evaluation replaces and removes
    only the files the previous evaluation listed as written (its stale tables), never another file."""
    import tahoe_ft.evaluation.run as run_mod

    run_dir = tmp_path / "run"
    evaluate(files, run_dir, baselines="false")
    eval_dir = run_dir / "eval"
    listed = json.loads((eval_dir / run_mod.WRITTEN).read_text())
    assert "score.json" in listed and "CT0_results.csv" in listed
    (eval_dir / "stale_table.csv").write_text("from an earlier evaluation\n")
    (eval_dir / run_mod.WRITTEN).write_text(json.dumps([*listed, "stale_table.csv"]))
    (eval_dir / "my_notes.txt").write_text("the user's own\n")
    evaluate(files, run_dir, baselines="false")
    assert not (eval_dir / "stale_table.csv").exists()
    assert (eval_dir / "my_notes.txt").read_text() == "the user's own\n"
    assert sorted(json.loads((eval_dir / run_mod.WRITTEN).read_text())) == sorted(listed)
