"""Bad input in every command (issue #22): one line `error: what, where, how to fix`, exit status 2, no
traceback, and nothing written: the runs, checkpoints, predictions and scores already on disk stay
byte-identical, and no file or folder is added (not even a temporary one). Every override a message suggests
names a key of the command it is meant for.

One module fixture trains a tiny `pretrain` and `0905`, predicts and scores 0905, and writes the bad files the
cases give the commands. The cases run in-process through `tahoe_ft.cli.main` (the CLI's own error path, from
the fixture's folder); three of them also run as the console script (`python -m tahoe_ft.cli`).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import json
import os
import re
import shutil
import types
import typing
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
from omegaconf import OmegaConf

import tahoe_ft
from conftest_train import TINY_DEMO, train
from tahoe_ft.cli import COMMANDS, main
from tahoe_ft.config import SCHEMAS, EvalConfig, PredictConfig, compose
from tahoe_ft.errors import UserError

REPO = Path(__file__).resolve().parents[1]
RUN = "runs/0905/latest"  # the scored 0905 run (paths are relative to the fixture's folder)
# the tiny demo, its cache, a model small enough for it and no wandb: train fails on the case, not the data
DATA = [*TINY_DEMO, "paths.data_cache=cache"]
TRAIN = [*DATA, "logger=csv", "trainer.accelerator=cpu", "model.cell_set_len=8"]


def case(id_: str, *argv: str, needle: str | tuple[str, ...]):
    """A command line and what its error line must hold (one string, or several)."""
    return pytest.param(list(argv), (needle,) if isinstance(needle, str) else needle, id=id_)


# fmt: off
CASES = [
    # -- train ------------------------------------------------------------------------------------------------
    case("train-unknown-experiment", "train", "+experiment=0999", needle="unknown experiment '0999'"),
    case("train-unknown-key", "train", "+experiment=0905", "optim.lrr=1", *TRAIN, needle="at 'optim.lrr'"),
    case("train-enum-value", "train", "+experiment=0905", "loss.name=foo", *TRAIN,
         needle="'loss.name': Invalid value 'foo', expected one of [energy, sinkhorn, mse]"),
    case("train-wrong-type", "train", "+experiment=0905", "optim.lr=abc", *TRAIN,
         needle="'optim.lr': Value 'abc' of type 'str' could not be converted to Float"),
    case("train-data-path-missing", "train", "+experiment=0905", "init_from=null", "data=custom",
         "data.path=bad/nope.h5ad", "logger=csv", needle="data file not found: bad/nope.h5ad"),
    case("train-key-below-null", "train", "+experiment=0905", "data=custom", "data.demo.n_genes=60",
         needle="'data.demo' is null"),
    case("train-freeze-typo", "train", "+experiment=0905", "init_from=null",
         "freeze.modules=[transformer_bakbone]", *TRAIN, needle="freeze.modules names 'transformer_bakbone'"),
    case("train-init-from-text-file", "train", "+experiment=0905", "init_from=bad/notes.txt", *TRAIN,
         needle="checkpoint bad/notes.txt is truncated or not a torch file"),
    case("train-init-from-truncated", "train", "+experiment=0905", "init_from=bad/truncated.pt", *TRAIN,
         needle="checkpoint bad/truncated.pt is truncated or not a torch file"),
    case("train-resume-nothing", "train", "+experiment=0906", "resume=true", *TRAIN,
         needle="no run of experiment '0906' with checkpoints/last.ckpt"),
    case("train-step-scale", "train", "+experiment=0905", "step_scale=-1", *TRAIN,
         needle="step_scale=-1.0 must be > 0"),
    case("train-max-steps", "train", "+experiment=0905", "trainer.max_steps=-3", *TRAIN,
         needle="trainer.max_steps=-3 must be >= 0"),
    # -- lineage and step bounds (issue #31) -------------------------------------------------------------------
    case("train-max-steps-huge", "train", "+experiment=0905", "trainer.max_steps=100000000000", *TRAIN,
         needle="trainer.max_steps=100000000000 is above 10,000,000"),
    case("train-step-scale-huge", "train", "+experiment=0905", "step_scale=1e30", *TRAIN,
         needle="step_scale=1e+30 is above 1000"),
    case("reproduce-step-scale-huge", "reproduce", "step_scale=1e30", *DATA,
         needle="step_scale=1e+30 must be > 0 and <= 1000"),
    case("train-parent-trained-on-test", "train", "+experiment=0906", *TRAIN, "data.split_toml=null",
         "data.val_perts=[GENE00021]", "data.test_perts=[GENE00003]", f"init_from={RUN}/checkpoints/best-val.pt",
         needle=("init_from leaks: the parent 0905/", "trained on 'GENE00003'", "holds out as test")),
    case("train-no-parent-of-this-split", "train", "+experiment=0906", *TRAIN, "data.split_toml=null",
         "data.val_perts=[GENE00021]", "data.test_perts=[GENE00003]",
         needle="no run of '0905' under"),
    # -- predict ----------------------------------------------------------------------------------------------
    case("predict-ckpt-missing", "predict", "ckpt=bad/missing.pt",
         needle="checkpoint not found: bad/missing.pt"),
    case("predict-ckpt-text-file", "predict", "ckpt=bad/notes.txt",
         needle="checkpoint bad/notes.txt is truncated or not a torch file"),
    case("predict-ckpt-truncated", "predict", "ckpt=bad/truncated.pt",
         needle="checkpoint bad/truncated.pt is truncated or not a torch file"),
    case("predict-other-gene-space", "predict", "exp=0905", "data_path=bad/other_genes.h5ad",
         needle="60 genes of the checkpoint's gene list are not in var of bad/other_genes.h5ad"),
    case("predict-counts-for-log1p", "predict", "exp=0905", "data_path=bad/counts.h5ad",
         needle="X looks like raw integer counts"),
    case("predict-run-dir-missing", "predict", "run_dir=bad/no_run",
         needle="bad/no_run/checkpoints/best-val.pt does not exist"),
    case("predict-split", "predict", "split=train", needle="'split': Invalid value 'train'"),
    case("predict-unknown-exp", "predict", "exp=0999", needle="no training run of experiment '0999'"),
    # -- eval -------------------------------------------------------------------------------------------------
    case("eval-pred-nan", "eval", "pred=bad/pred_nan.h5ad", f"real={RUN}/real.h5ad",
         needle=("bad/pred_nan.h5ad", "NaN")),
    case("eval-pred-counts", "eval", "pred=bad/pred_counts.h5ad", f"real={RUN}/real.h5ad",
         needle=("bad/pred_counts.h5ad", "integer")),
    case("eval-pred-fewer-genes", "eval", "pred=bad/pred_fewer_genes.h5ad", f"real={RUN}/real.h5ad",
         needle=("bad/pred_fewer_genes.h5ad", "missing")),
    case("eval-pred-truncated", "eval", "pred=bad/pred_truncated.h5ad", f"real={RUN}/real.h5ad",
         needle=("bad/pred_truncated.h5ad", "readable")),
    case("eval-nan-into-scored-run", "eval", f"run_dir={RUN}", "pred=bad/pred_nan.h5ad", f"real={RUN}/real.h5ad",
         needle=("bad/pred_nan.h5ad", "NaN")),
    case("eval-real-missing", "eval", f"pred={RUN}/pred.h5ad", "real=bad/missing.h5ad",
         needle="bad/missing.h5ad not found"),
    case("eval-pred-without-real", "eval", f"pred={RUN}/pred.h5ad", needle="give both pred="),
    case("eval-profile", "eval", "profile=pds", needle="'profile': Invalid value 'pds'"),
    # -- compare ----------------------------------------------------------------------------------------------
    case("compare-runs-dir-missing", "compare", "runs_dir=bad/no_runs", needle="bad/no_runs does not exist"),
    case("compare-nothing-evaluated", "compare", "runs_dir=bad", needle="no evaluated runs under bad"),
    # -- export -----------------------------------------------------------------------------------------------
    case("export-unknown-exp", "export", "exp=0999",
         needle="no training run of experiment '0999' with pred.h5ad"),
    case("export-not-predicted", "export", "exp=pretrain", needle="experiment 'pretrain' with pred.h5ad"),
    case("export-pred-missing", "export", "pred=bad/missing.h5ad", needle="bad/missing.h5ad not found"),
    case("export-gene-list-missing", "export", "exp=0905", "gene_list=bad/missing.csv",
         needle="gene list not found: bad/missing.csv"),
    # -- export-state -----------------------------------------------------------------------------------------
    case("export-state-feature-prior", "export-state", "exp=0905",
         needle="feature prior (model.feature_prior=true)"),
    case("export-state-head-skip", "export-state", "exp=pretrain",
         needle="head skip path (model.head_skip=true)"),
    case("export-state-out-exists", "export-state", "exp=0905", f"out={RUN}/eval",
         needle=f"{RUN}/eval already exists"),
    case("export-state-ckpt-text-file", "export-state", "ckpt=bad/notes.txt",
         needle="checkpoint bad/notes.txt is truncated or not a torch file"),
    # -- check ------------------------------------------------------------------------------------------------
    case("check-data-path-missing", "check", "data=custom", "data.path=bad/nope.h5ad",
         needle="data file not found: bad/nope.h5ad"),
    case("check-not-h5ad", "check", "data=custom", "data.path=bad/notes.txt",
         needle="bad/notes.txt is not an HDF5/.h5ad file"),
    case("check-no-column", "check", "data.pert_col=nope", *DATA, needle="obs column 'nope' not found"),
    case("check-unknown-perturbation", "check", "data=custom", "data.path=bad/counts.h5ad",
         "data.input_transform=counts", "data.test_perts=[NOPE]",
         needle="data.test_perts lists 'NOPE', which has no cells"),
    case("check-counts-as-log1p", "check", "data=custom", "data.path=bad/counts.h5ad",
         needle="X looks like raw integer counts"),
    # -- reproduce --------------------------------------------------------------------------------------------
    case("reproduce-unknown-round", "reproduce", "experiments=[pretrain,0999]", *DATA,
         needle="experiments=[...] names unknown rounds ['0999']"),
    case("reproduce-folds", "reproduce", "folds=1", *DATA, needle="folds=1: use folds=0"),
    case("reproduce-step-scale", "reproduce", "step_scale=-1", *DATA, needle="step_scale=-1.0 must be > 0"),
    case("reproduce-seeds", "reproduce", "seeds=[a]", *DATA, needle="seeds=['a']: give whole numbers"),
    case("reproduce-unknown-key", "reproduce", "bogus=1",
         needle="'bogus': Key 'bogus' not in 'ReproduceConfig'"),
    case("reproduce-bad-train-override", "reproduce", "train_overrides=['optim.lrr=1']", *DATA,
         needle="at 'optim.lrr'"),
    # -- splits (issue #31) -------------------------------------------------------------------------------------
    case("train-val-and-test-perts", "train", "+experiment=0905", "init_from=null", "data=custom",
         "data.path={cache}/screen.h5ad", "data.val_perts=[GENE00007]", "data.test_perts=[GENE00007]", "logger=csv",
         needle="'GENE00007' is in both data.val_perts and data.test_perts"),
    case("check-val-and-test-perts", "check", "data=custom", "data.path={cache}/screen.h5ad",
         "data.val_perts=[GENE00007,GENE00008]", "data.test_perts=[GENE00008]",
         needle="'GENE00008' is in both data.val_perts and data.test_perts"),
    case("check-val-and-test-cell-types", "check", "data=custom", "data.path={cache}/screen.h5ad",
         "data.val_cell_types=[CT1]", "data.test_cell_types=[CT1]",
         needle="'CT1' is in both data.val_cell_types and data.test_cell_types"),
    case("train-toml-val-and-test", "train", "+experiment=0905", "init_from=null", "data=custom", "data.path=null",
         "data.split_toml=bad/val_and_test.toml", "logger=csv",
         needle=("bad/val_and_test.toml", "'GENE00007' of cell type 'CT0' is val in [fewshot.\"screen.CT0\"] and "
                 "test in [fewshot.\"screen.CT0\"]")),
    case("check-toml-val-and-test-across-datasets", "check", "data=custom", "data.path=null",
         "data.split_toml=bad/val_and_test_across.toml",
         needle="'GENE00007' of cell type 'CT0' is val in [fewshot.\"screen.CT0\"] and test in [fewshot.\"copy.CT0\"]"),
    case("check-toml-test-trains-elsewhere", "check", "data=custom", "data.path=null",
         "data.split_toml=bad/test_trains_elsewhere.toml",
         needle="'GENE00021' of cell type 'CT0' is test in [fewshot.\"screen.CT0\"] and trains in dataset 'copy'"),
    case("check-toml-dataset-not-a-file", "check", *DATA, "data.split_toml=bad/other_name.toml",
         needle=("[fewshot] 'mine.CT0': no data file is named 'mine'", "named 'screen'", "data.path=null")),
    # -- cli and compare (issue #31) ----------------------------------------------------------------------------
    case("train-runs-dir-file", "train", "+experiment=0905", *TRAIN, "runs_dir=bad/notes.txt",
         needle="runs_dir 'bad/notes.txt' is a file, not a folder; pass runs_dir=<a folder>"),
    case("train-runs-dir-below-file", "train", "+experiment=0905", *TRAIN, "runs_dir=bad/notes.txt/runs",
         needle=("runs_dir 'bad/notes.txt/runs' lies below", "bad/notes.txt, which is a file")),
    case("predict-runs-dir-file", "predict", "runs_dir=bad/notes.txt",
         needle="runs_dir 'bad/notes.txt' is a file, not a folder"),
    case("eval-runs-dir-file", "eval", "runs_dir=bad/notes.txt", needle="runs_dir 'bad/notes.txt' is a file"),
    case("eval-runs-dir-below-file", "eval", f"run_dir={RUN}", "runs_dir=bad/notes.txt/runs",
         needle="runs_dir 'bad/notes.txt/runs' lies below"),
    case("compare-runs-dir-file", "compare", "runs_dir=bad/notes.txt",
         needle="runs_dir 'bad/notes.txt' is a file, not a folder"),
    case("export-runs-dir-file", "export", "runs_dir=bad/notes.txt", needle="runs_dir 'bad/notes.txt' is a file"),
    case("reproduce-runs-dir-below-file", "reproduce", *DATA, "runs_dir=bad/notes.txt/study",
         needle="runs_dir 'bad/notes.txt/study' lies below"),
    case("train-non-ascii-list", "train", "+experiment=0905", *TRAIN, "data.val_perts=[Ä1,B]",
         needle=("cannot read 'data.val_perts=[Ä1,B]'", "data.val_perts='[\"Ä1\", \"B\"]'")),
    case("check-non-ascii-name", "check", "data.control_pert=contrôle", *DATA,
         needle="data.control_pert='\"contrôle\"'"),
    # -- nothing lost (issue #31) -------------------------------------------------------------------------------
    case("predict-foreign-ckpt-into-run", "predict", f"run_dir={RUN}",
         "ckpt=runs/pretrain/latest/checkpoints/best-val.pt",
         needle=("is not a checkpoint of run_dir=runs/0905/latest", "pass run_dir=<a new folder>")),
    case("export-out-exists", "export", "exp=0905", "out=bad/notes.txt",
         needle="out=bad/notes.txt already exists; pass out=<a new file>"),
    case("export-out-folder", "export", "exp=0905", "out=bad", needle="out=bad is a folder; pass out=<a new file>"),
    case("eval-no-training-cells-no-cache", "eval", "pred=bad/pred_alone.h5ad", "real=bad/real_alone.h5ad",
         "runs_dir=bad/fresh_runs", needle=("no training cells for the cell-mean baseline", "pass train=")),
    case("eval-real-without-controls", "eval", "pred=bad/pred_alone.h5ad", "real=bad/real_no_controls.h5ad",
         needle=("real_no_controls.h5ad) has no control cells: pred has", "add them to real")),
    case("sweep-folds-too-many", "sweep", "+sweep=genespace", "pretrained=null", "folds=100", *DATA,
         needle="folds=100 with n_test="),
    case("sweep-n-test-zero", "sweep", "+sweep=genespace", "pretrained=null", "n_test=0", *DATA,
         needle="n_test=0 must be >= 1"),
    case("sweep-malformed-yaml", "sweep", "+sweep=broken", "pretrained=null", *DATA,
         needle=("configs/sweep/broken.yaml, line 3: not valid YAML", "fix the file")),
    case("sweep-final-again-alone", "sweep", "+sweep=genespace", "pretrained=null", "final_again=true", *DATA,
         needle="final_again=true goes with final=true"),
    # -- count space (issue #33) ---------------------------------------------------------------------------------
    case("predict-counts-no-library-sizes", "predict", "exp=0905", "output=counts", "data_path=bad/log1p_only.h5ad",
         needle=("predict output=counts: bad/log1p_only.h5ad holds log1p values with no raw counts",
                 "or predict with output=log1p")),
    case("export-vcc2026-fractional", "export", "format=vcc2026", f"pred={RUN}/pred.h5ad", "out=bad/up.h5ad",
         needle=("fractional values", "predict output=counts")),
    case("export-vcc2026-negative", "export", "format=vcc2026", "pred=bad/counts_negative.h5ad", "out=bad/up.h5ad",
         needle="negative values"),
    case("export-vcc2026-genes-outside", "export", "format=vcc2026", "pred=bad/counts_pred.h5ad",
         "gene_list=bad/fewer_genes.csv", "out=bad/up.h5ad", needle=("5 genes outside the gene list", "gene_list=")),
    case("export-vcc2026-too-few-cells", "export", "format=vcc2026", "pred=bad/counts_pred.h5ad", "min_cells=1000",
         "out=bad/up.h5ad", needle=("predicted cells in pred", "fewer than min_cells=1000")),
    case("export-vcc2026-not-predicted", "export", "format=vcc2026", "exp=0905",
         needle="experiment '0905' with pred_counts.h5ad"),
    case("export-vcc2026-out-exists", "export", "format=vcc2026", "pred=bad/counts_pred.h5ad", "out=bad/notes.txt",
         needle="out=bad/notes.txt already exists"),
    # -- no such command --------------------------------------------------------------------------------------
    case("unknown-command", "frobnicate", needle="unknown command 'frobnicate'"),
]
# fmt: on

# run as the console script too (the `tahoe-ft` entry point's path: a fresh process, its own stderr)
CONSOLE = ("train-unknown-key", "predict-ckpt-text-file", "unknown-command")


# -- the fixture: a scored run, and the bad files -------------------------------------------------------------


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad-input")
    pre = train(root, "pretrain")
    run = train(root, "0905", f"init_from={pre / 'checkpoints' / 'best-val.pt'}")
    tahoe_ft.predict(PredictConfig(run_dir=str(run), runs_dir=str(root / "runs")))
    tahoe_ft.evaluate(EvalConfig(run_dir=str(run), runs_dir=str(root / "runs")))
    _write_bad_files(root / "bad", run, next((root / "cache").glob("demo-*")) / "screen.h5ad")
    assert (root / RUN / "eval" / "score.json").is_file()
    return root


def _write_bad_files(bad: Path, run: Path, screen: Path) -> None:
    bad.mkdir()
    (bad / "notes.txt").write_text("not a checkpoint\n")
    (bad / "truncated.pt").write_bytes((run / "checkpoints" / "best-val.pt").read_bytes()[:1000])
    pred = ad.read_h5ad(run / "pred.h5ad")
    x = np.asarray(pred.X, dtype=np.float32)
    for name, values in (("pred_nan", x.copy()), ("pred_counts", np.round(np.expm1(x) * 50))):
        if name == "pred_nan":
            values[0, 0] = np.nan
        bad_pred = pred.copy()
        bad_pred.X = values.astype(np.float32)
        bad_pred.write_h5ad(bad / f"{name}.h5ad")
    pred[:, :-5].copy().write_h5ad(bad / "pred_fewer_genes.h5ad")
    # a prediction outside any run (no predict.json), its real cells, and those without their control cells
    shutil.copy(run / "pred.h5ad", bad / "pred_alone.h5ad")
    shutil.copy(run / "real.h5ad", bad / "real_alone.h5ad")
    real = ad.read_h5ad(run / "real.h5ad")
    control = read_json(run / "predict.json")["control_pert"]
    pert_col = read_json(run / "predict.json")["pert_col"]
    real[(real.obs[pert_col] != control).to_numpy()].copy().write_h5ad(bad / "real_no_controls.h5ad")
    (bad / "pred_truncated.h5ad").write_bytes((run / "pred.h5ad").read_bytes()[:2000])
    cells = ad.read_h5ad(screen)
    other = cells.copy()
    other.var_names = [f"OTHER{i}" for i in range(other.n_vars)]  # a screen of another gene space
    other.write_h5ad(bad / "other_genes.h5ad")
    counts = cells.copy()
    counts.X = counts.layers["counts"].copy()  # raw counts where the checkpoint reads log1p
    counts.write_h5ad(bad / "counts.h5ad")
    _write_bad_split_tomls(bad, screen)
    _write_bad_count_files(bad, run, cells)
    # a user's sweep space that is not YAML (an unclosed list), in the user-config folder of the fixture's root
    spaces = bad.parent / "configs" / "sweep"
    spaces.mkdir(parents=True)
    (spaces / "broken.yaml").write_text(
        'name: broken\nrounds: ["0905"\nparams:\n  optim:\n    lr: logfloat(1e-5, 1e-3)\n'
    )


def _write_bad_count_files(bad: Path, run: Path, cells: ad.AnnData) -> None:
    """Count space (issue #33): a log1p screen with no raw counts nor library sizes, a counts prediction (its
    genes, all but five of them in a gene list), and one with a negative count."""
    import scipy.sparse as sp

    log1p_only = cells.copy()
    del log1p_only.layers["counts"]
    log1p_only.obs = log1p_only.obs.drop(columns=["n_counts"])
    log1p_only.write_h5ad(bad / "log1p_only.h5ad")
    pred = ad.read_h5ad(run / "pred.h5ad")
    counts = pred.copy()
    counts.X = sp.csr_matrix(np.round(np.expm1(np.asarray(pred.X)) * 3).astype(np.float32))
    counts.write_h5ad(bad / "counts_pred.h5ad")
    (bad / "fewer_genes.csv").write_text("".join(f"{g}\n" for g in pred.var_names[:-5]))
    negative = counts.copy()
    negative.X = negative.X.toarray()
    negative.X[0, 0] = -1
    negative.X = sp.csr_matrix(negative.X)
    negative.write_h5ad(bad / "counts_negative.h5ad")


def _write_bad_split_tomls(bad: Path, screen: Path) -> None:
    """Split TOMLs that share a perturbation between val and test, or hold one out in a cell type while it
    trains there through another file (`copy`, the screen again)."""
    from tahoe_ft.data.split_file import write_split_toml

    shutil.copy(screen, bad / "screen_copy.h5ad")
    both = {"screen": os.path.relpath(screen, bad.parent), "copy": "bad/screen_copy.h5ad"}
    held = {"val": ["GENE00007"], "test": ["GENE00021"]}
    write_split_toml(bad / "val_and_test.toml", {"screen": both["screen"]},
                     fewshot={("screen", "CT0"): {"val": ["GENE00007"], "test": ["GENE00007"]}})  # fmt: skip
    write_split_toml(bad / "val_and_test_across.toml", both,
                     fewshot={("screen", "CT0"): held, ("copy", "CT0"): {"val": [], "test": ["GENE00007"]}})  # fmt: skip
    # data.path's file (named by its stem, 'screen') is not the file the TOML names 'mine'
    write_split_toml(bad / "other_name.toml", {"mine": both["copy"]}, fewshot={("mine", "CT0"): held})
    write_split_toml(bad / "test_trains_elsewhere.toml", both,
                     fewshot={("screen", "CT0"): held, ("copy", "CT0"): {"val": ["GENE00007"], "test": []}})  # fmt: skip


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def snapshot(root: Path) -> dict[str, str]:
    """Every path under `root`: a file's sha256, a link's target, or "dir"."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            rel = p.relative_to(root).as_posix()
            if p.is_symlink():
                out[rel] = "-> " + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def changes(before: dict[str, str], after: dict[str, str]) -> list[str]:
    return sorted(
        [f"added {p}" for p in after.keys() - before.keys()]
        + [f"removed {p}" for p in before.keys() - after.keys()]
        + [f"changed {p}" for p in before.keys() & after.keys() if before[p] != after[p]]
    )


def expand(argv: list[str], root: Path) -> list[str]:
    cache = next((root / "cache").glob("demo-*")).relative_to(root).as_posix()
    return [a.replace("{cache}", cache) for a in argv]


def error_line(stderr: str) -> str:
    """The one `error: ` line, which ends stderr."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert lines, "nothing on stderr"
    assert lines[-1].startswith("error: "), stderr[-3000:]
    assert sum(ln.startswith("error") for ln in lines) == 1, stderr[-3000:]
    return lines[-1]


@pytest.fixture(scope="module")
def pristine(root, tmp_path_factory) -> Path:
    """A copy of the fixture's folder: a case that writes is undone, so it cannot hide the next case's writes."""
    copy = tmp_path_factory.mktemp("pristine") / "root"
    shutil.copytree(root, copy, symlinks=True)
    return copy


def restore(root: Path, pristine: Path) -> None:
    for p in root.iterdir():
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    for p in pristine.iterdir():
        if p.is_dir() and not p.is_symlink():
            shutil.copytree(p, root / p.name, symlinks=True)
        else:
            shutil.copy2(p, root / p.name, follow_symlinks=False)


@pytest.fixture
def in_root(root, monkeypatch) -> Path:
    monkeypatch.chdir(root)
    for var in ("TAHOE_FT_DEBUG", "HYDRA_FULL_ERROR", "TAHOE_FT_RUN_DIR"):
        monkeypatch.delenv(var, raising=False)
    return root


@pytest.mark.parametrize("argv, needle", CASES)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(in_root, pristine, capfd, argv, needle):
    before = snapshot(in_root)
    capfd.readouterr()
    try:
        main(expand(argv, in_root))
        code = 0
    except SystemExit as exc:
        code = exc.code
    finally:
        written = changes(before, snapshot(in_root))
        if written:
            restore(in_root, pristine)
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err, err[-3000:]
    assert code == 2, err[-3000:]
    line = error_line(err)
    assert all(n in line for n in needle), line
    assert written == []
    assert_names_existing_keys(argv[0], line.removeprefix("error: "))


@pytest.mark.parametrize("argv, needle", [c for c in CASES if c.id in CONSOLE])
def test_console_script_bad_input(root, pristine, argv, needle):
    from test_cli import cli

    before = snapshot(root)
    try:
        proc = cli(*expand(argv, root), cwd=root)
    finally:
        written = changes(before, snapshot(root))
        if written:
            restore(root, pristine)
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = error_line(proc.stderr)
    assert all(n in line for n in needle), line
    assert written == []


def test_the_table_covers_every_command():
    per_command: dict[str, int] = {}
    for c in CASES:
        per_command[c.values[0][0]] = per_command.get(c.values[0][0], 0) + 1
    assert len(CASES) >= 25 and len({c.id for c in CASES}) == len(CASES)
    for command in ("train", "predict", "eval", "compare", "export", "export-state", "check", "reproduce"):
        assert per_command.get(command, 0) >= 2, (command, per_command)


# -- every key a message names exists ------------------------------------------------------------------------

# `key=` (a suggested override, `+experiment=` included): not inside a word, a path or a placeholder's braces,
# not `<=`, `>=` or `==`
_OVERRIDE = re.compile(r"(?<![\w./{}:<>=!-])(\+?[a-z_][a-z0-9_]*(?:\.[a-z0-9_]+)*)=(?!=)")
# a dotted key named without a value (`check data.path`, `lower model.cell_set_len`); kept when its first part
# is a section of some command's config (so `best-val.pt`, `pred.h5ad` or `torch.load` are not keys)
_DOTTED = re.compile(r"(?<![\w./{}:-])([a-z_][a-z0-9_]*(?:\.[a-z0-9_]+)+)(?![\w(/-]|\.\w)")
# a quoted name is what the input said ('optim.lrr'), not a suggestion; an apostrophe inside a word is prose
_QUOTED = re.compile(r"(?<!\w)'[^']*'(?!\w)")
_COMMAND = re.compile(r"tahoe-ft ([a-z-]+)")
_TRAINED = re.compile(r"\btrain(?:ed|ing|s)?\b")


def _composed(command: str):
    if command not in _COMPOSED:
        _COMPOSED[command] = OmegaConf.structured(compose(command))
    return _COMPOSED[command]


_COMPOSED: dict[str, object] = {}
_COMPOSE_OK: dict[tuple[str, str], str | None] = {}


def _field_type(tp: object) -> object:
    """`X` of `X | None`."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def _schema_has(schema: object, key: str) -> bool:
    """`key` is declared in the schema dataclass, also below a section that is null by default (`data.demo`
    without data=demo, `sweep` without +sweep=NAME)."""
    for part in key.split("."):
        if not dataclasses.is_dataclass(schema):
            return False
        hints = typing.get_type_hints(schema)
        if part not in hints:
            return False
        schema = _field_type(hints[part])
    return True


def has_key(command: str, key: str) -> bool:
    """`key` (`+experiment` as `experiment`) is in `command`'s composed config or its schema."""
    key = key.lstrip("+")
    found = OmegaConf.select(_composed(command), key, default=_MISSING) is not _MISSING
    return found or _schema_has(SCHEMAS[command], key)


@functools.cache
def sections() -> set[str]:
    """Top-level keys that hold a section (`data`, `model`, `demo`, `sweep`, ...) in some command's schema."""
    return {
        name
        for command in COMMANDS
        for name, tp in typing.get_type_hints(SCHEMAS[command]).items()
        if dataclasses.is_dataclass(_field_type(tp))
    }


def _outside_a_call(text: str, start: int) -> bool:
    """False for `torch.load(weights_only=True)`: a keyword argument of a call shown in a message."""
    opened = text.rfind("(", 0, start)
    return opened < 1 or text.rfind(")", opened, start) != -1 or not text[opened - 1].isalnum()


def named_keys(message: str) -> list[tuple[str, str | None]]:
    """(key, value or None) of every key `message` names: `key=value` overrides and dotted section keys."""
    text = _QUOTED.sub("''", message)
    found: list[tuple[str, str | None]] = []
    for m in _OVERRIDE.finditer(text):
        if _outside_a_call(text, m.start()):
            value = re.match(r"[^\s;,)]*", text[m.end() :]).group(0).rstrip(".:")
            found.append((m.group(1), value))
    named = {k.lstrip("+") for k, _ in found}
    for m in _DOTTED.finditer(text):
        key = m.group(1)
        if key.split(".")[0] in sections() and key not in named and text[m.end() : m.end() + 1] != "=":
            found.append((key, None))
    return found


def _placeholder(value: str | None) -> bool:
    # "''": a value in shell quotes (key='["Ä1", "B"]'), elided by _QUOTED; test_cli composes those suggestions
    return (
        not value or value == "''" or value[0] in "<[{." or value.isupper() or "<" in value or "..." in value
    )


def key_problem(commands: list[str], key: str, value: str | None) -> str | None:
    """None when `key` exists in one of `commands`' configs (and `key=value`, a literal, composes there)."""
    for command in commands:
        if not has_key(command, key):
            continue
        if (
            _placeholder(value)
            or OmegaConf.select(_composed(command), key.lstrip("+"), default=_MISSING) is _MISSING
        ):
            return None
        override = f"{key}={value}"
        if (command, override) not in _COMPOSE_OK:
            try:
                compose(command, [override])
                _COMPOSE_OK[command, override] = None
            except UserError as exc:
                _COMPOSE_OK[command, override] = f"'{override}' does not compose for {command}: {exc}"
        return _COMPOSE_OK[command, override]
    return f"'{key}' is not a key of {' or '.join(commands)}"


_MISSING = object()


def assert_names_existing_keys(command: str, message: str) -> None:
    """Every key `message` names is one of `command`'s, or of the command it names (`tahoe-ft train ...`, or
    train for how a checkpoint was trained), and a suggested literal value composes."""
    commands = [command, *_COMMAND.findall(message)]
    if _TRAINED.search(message):
        commands.append("train")
    commands = [c for c in dict.fromkeys(commands) if c in COMMANDS]
    problems = [p for key, value in named_keys(message) if (p := key_problem(commands, key, value))]
    assert not problems, f"{message}\n" + "\n".join(problems)


def test_the_key_check_catches_a_key_the_command_lacks():
    # predict's message before the fix: predict has no data.gene_list
    old = (
        "60 genes of the checkpoint's gene list are not in var of bad/other_genes.h5ad ('GENE00001', "
        "'GENE00002' (+58 more)); fix data.gene_list or the file's var_names"
    )
    with pytest.raises(AssertionError, match="'data.gene_list' is not a key of predict"):
        assert_names_existing_keys("predict", old)
    assert_names_existing_keys("train", old)
    with pytest.raises(AssertionError, match="does not compose"):
        assert_names_existing_keys("train", "X is counts; set data.input_transform=raw")
    # the key the input named (quoted), a call's keyword, file names and comparisons are not suggestions
    prose = (
        "config error at 'optim.lrr': Key 'lrr' not in 'OptimConfig'; write it with "
        "normalize_total(target_sum=1e4), see best-val.pt or pred.h5ad (or pass pred= and real=), 2 <= folds"
    )
    assert named_keys(prose) == [("pred", ""), ("real", "")]
    assert named_keys("tahoe-ft train +experiment=NAME; check data.path; lower model.cell_set_len to 8") == [
        ("+experiment", "NAME"),
        ("data.path", None),
        ("model.cell_set_len", None),
    ]


def _user_error_texts() -> list[tuple[str, int, str]]:
    """(file, line, text) of every string in a `UserError(...)` call under src/tahoe_ft; an f-string's values
    are `{}`."""
    found = []
    for path in sorted((REPO / "src" / "tahoe_ft").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for call in ast.walk(tree):
            if not (isinstance(call, ast.Call) and getattr(call.func, "id", None) == "UserError"):
                continue
            inner: set[int] = set()
            for node in ast.walk(call):
                if isinstance(node, ast.JoinedStr):
                    inner.update(id(v) for v in node.values)
                    text = "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
                elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in inner:
                    text = node.value
                else:
                    continue
                found.append((str(path.relative_to(REPO)), node.lineno, text))
    return found


def test_every_key_a_user_error_names_exists():
    texts = _user_error_texts()
    assert len(texts) > 150
    problems = [
        f"{where}:{line}: {keys} in {text!r}" for where, line, text in texts if (keys := unknown_keys(text))
    ]
    assert not problems, "\n".join(problems)


def unknown_keys(text: str) -> list[str]:
    """The keys `text` names that no command has."""
    return [key for key, _ in named_keys(text) if not any(has_key(c, key) for c in COMMANDS)]


def test_the_source_scan_catches_a_key_no_command_has():
    # datamodule.py's message before the fix: the key is data.basal_mapping
    old = "data.basal_mapping=batch needs data.batch_col; set it or use basal_mapping=random"
    assert unknown_keys(old) == ["basal_mapping"]
    assert unknown_keys(old.replace("use basal", "use data.basal")) == []
    # the scan reads f-strings with their values as `{}`, and finds the strings of every UserError(...)
    texts = [t for _, _, t in _user_error_texts()]
    assert "data.basal_mapping=batch needs data.batch_col; set it or use data.basal_mapping=random" in texts
    assert "step_scale={} must be > 0; it multiplies the study's step counts" in texts
