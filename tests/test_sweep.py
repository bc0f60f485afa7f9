"""`tahoe-ft sweep` on the tiny demo: trials on validation folds in an Optuna study that prunes from the logged
validation losses, resumes after a SIGKILL without counting or repeating the killed trial, never reads a
fold's test perturbations, writes a best.yaml that `tahoe-ft train` trains, and refuses bad input in one line
before writing anything."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import optuna
import pytest
import yaml
from omegaconf import OmegaConf

from conftest_train import TINY_DEMO, TINY_MODEL
from tahoe_ft import api, cli
from tahoe_ft.config import SweepSpace, compose, config_dir
from tahoe_ft.errors import UserError
from tahoe_ft.search import trial as sweep_trial
from tahoe_ft.search.space import flatten, parse_param, value_text
from tahoe_ft.study.folds import make_folds

REPO = Path(__file__).resolve().parents[1]
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
# every round of every trial: the tiny model, a few steps, CSV logs only; validation every 3 steps from step 3
TRAIN = [
    "data.batch_size=4", "trainer.val_check_interval=3", "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false", "trainer.accelerator=cpu", "logger=csv", "sched.warmup_steps=0",
    "freeze.warmup_steps=2", "checkpoint.validate_at_start=false",
    *[a for a in TINY_MODEL if not a.startswith("encoder.decoder")],
]  # fmt: skip


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One demo data cache for the module: the tiny demo is generated once."""
    return tmp_path_factory.mktemp("cache")


def _cfg(root: Path, cache: Path, name: str, params: dict, *extra: str, steps: int = 9):
    """A sweep config on the tiny demo, from scratch, over the space `params` of round 0905."""
    args = ["+sweep=genespace", "folds=2", "pretrained=null", f"runs_dir={root}", f"paths.data_cache={cache}"]
    cfg = compose("sweep", [*args, *TINY_DEMO, *extra])
    space = SweepSpace(name=name, rounds=["0905"], params=params)
    return dataclasses.replace(cfg, sweep=space, train_overrides=[*TRAIN, f"trainer.max_steps={steps}"])


def _study(summary: dict) -> optuna.Study:
    return optuna.load_study(study_name=summary["study"], storage=summary["storage"])


# -- a 4-trial sweep with a learning-rate range made bad on purpose ----------------------------------------

PRUNE_SPACE = {"optim.lr": "logfloat(1e-3, 1e3)", "loss.mean_weight": "float(0, 20)"}


@pytest.fixture(scope="module")
def swept(tmp_path_factory, cache):
    root = tmp_path_factory.mktemp("swept") / "runs"
    # sampler_seed=5: Optuna's first draws (random, before TPE models anything) are two sane learning rates
    # (0.02, 0.017), then 0.85 and 39: a median set by sane trials for the pruner to judge the bad ones by. What
    # is tested is the pruner, not the sampler (with seed 0 all four draws were >= 0.35, and none was pruned)
    cfg = _cfg(root, cache, "prune", PRUNE_SPACE, "n_trials=4", "pruner_startup_trials=1", "sampler_seed=5")
    return cfg, api.sweep(cfg)


def test_sweep_finishes_n_trials_in_an_sqlite_study_and_prunes_the_bad_range(swept, tmp_path):
    cfg, summary = swept
    sweep_dir = Path(summary["sweep_dir"])
    assert summary["storage"] == f"sqlite:///{(sweep_dir / 'study.db').resolve()}"
    study = _study(summary)  # a standard Optuna RDB study
    trials = study.get_trials()
    assert len(trials) == 4 and all(t.state in FINISHED for t in trials)
    assert any(t.state == optuna.trial.TrialState.PRUNED for t in trials), [t.state for t in trials]
    assert study.direction == optuna.study.StudyDirection.MINIMIZE

    # fold k's checks are reported at distinct steps: (k * rounds + r) * stride + step, stride 10 (9 steps)
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    for t in done:
        assert sorted(t.intermediate_values) == [3, 6, 9, 13, 16, 19]
        # the objective: the mean over folds of the last round's unbiased validation energy at the step of its
        # best-val.pt (run.json's best_step), as the run's metrics log it
        runs = [Path(r) for r in t.user_attrs["run_dirs"]]
        fair = []
        for r in runs:
            step = json.loads((r / "run.json").read_text())["best_step"]
            (metrics,) = r.glob("*_metrics.csv")
            rows = [row for row in csv.DictReader(metrics.open()) if row.get("val/unbiased_loss")]
            fair.append(float(next(row for row in rows if int(row["step"]) == step)["val/unbiased_loss"]))
        assert t.user_attrs["fold_values"] == pytest.approx(fair, rel=1e-6)
        assert t.value == pytest.approx(np.mean(t.user_attrs["fold_values"]), rel=1e-12)
        # the pruner saw the same metric at each check
        checks = {int(row["step"]) + 10 * k: float(row["val/unbiased_loss"])
                  for k, r in enumerate(runs) for row in csv.DictReader(next(r.glob("*_metrics.csv")).open())
                  if row.get("val/unbiased_loss") and int(row["step"]) > 0}  # fmt: skip
        assert t.intermediate_values == pytest.approx(checks, rel=1e-6)
        assert [r.relative_to(sweep_dir).parts[:3] for r in runs] == [
            (f"trial-{t.number:04d}", f"fold-{k}", "0905") for k in (0, 1)
        ]
        for k, r in enumerate(runs):  # an ordinary run: its trial in run.json, its wandb group in its config
            info = json.loads((r / "run.json").read_text())
            assert info["status"] == "finished"
            assert info["sweep"]["trial"] == t.number and info["sweep"]["fold"] == f"fold-{k}"
            assert info["sweep"]["params"] == t.params and info["sweep"]["study"] == "prune"
            logger = OmegaConf.load(r / "0905_config.yaml").logger
            assert logger.wandb_group == "sweep-prune" and f"trial-{t.number}" in logger.wandb_tags
    for t in trials:
        if t.state == optuna.trial.TrialState.PRUNED:
            last = Path(t.user_attrs["run_dirs"][-1])
            assert json.loads((last / "run.json").read_text())["status"] == "pruned"

    # the folds are nested: make_folds with a final test set of one fold's share (8 perturbations // 3)
    ref = make_folds(cfg.data, 2, tmp_path / "ref", seed=0, n_test=2)
    for fold in ref:
        mine = sweep_dir / "folds" / f"fold-{fold.index}.toml"
        assert mine.read_text() == Path(fold.toml).read_text()

    # a pruned or finished trial keeps no weights (final=true trains again; best.yaml holds the parameters)
    assert not [p.name for p in sweep_dir.rglob("*") if p.suffix in (".pt", ".ckpt")]
    for t in done:
        for r in t.user_attrs["run_dirs"]:
            info = json.loads((Path(r) / "run.json").read_text())
            assert "best-val.pt" in info["sweep"]["weights_removed"], info["sweep"]
            assert (Path(r) / "run.json").is_file() and list(Path(r).glob("*_metrics.csv"))

    # outputs: trials.csv (one row per trial), best.yaml, the plots (importances: >= 2 complete trials)
    rows = (sweep_dir / "trials.csv").read_text().strip().splitlines()
    assert len(rows) == 5 and rows[0].startswith("number,value")
    assert summary["best"]["number"] == study.best_trial.number
    for png in ("history.png", "slice.png"):
        assert (sweep_dir / png).stat().st_size > 1000, png
    # importances need two complete trials (with one startup trial the median pruner may leave one)
    assert (sweep_dir / "importances.png").is_file() == (len(done) >= 2), len(done)


def test_the_final_test_set_is_drawn_before_the_search_and_is_no_folds_validation_set(swept):
    """Nested folds: the final test perturbations are every fold's test and never a validation perturbation of
    any fold (the old dealer validated each fold on the next fold's test part: every test perturbation of the
    study was seen by the search)."""
    cfg, summary = swept
    folds = json.loads((Path(summary["sweep_dir"]) / "folds" / "folds.json").read_text())
    final = set(folds["final_test"])
    assert folds["n_test"] == 2 and len(final) == 2
    validated: set[str] = set()
    for f in folds["folds"]:
        assert set(f["test"]) == final
        validated |= set(f["val"])
    assert not validated & final
    assert validated | final == set(folds["perturbations"])
    for t in _study(summary).get_trials():  # what each trial's runs really validated on
        for r in t.user_attrs["run_dirs"]:
            splits = json.loads((Path(r) / "manifest.json").read_text())["splits"]
            assert splits["val"] and not set(splits["val"]) & final and set(splits["test"]) == final


def test_a_study_refuses_to_continue_on_other_data_or_another_base_model(swept, tmp_path):
    """The study pins its data and base model on creation; a change is one line naming it, and nothing of the
    study (its folds, its database) is written."""
    cfg, summary = swept
    sweep_dir = Path(summary["sweep_dir"])
    stamp = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in [*(sweep_dir / "folds").iterdir()]}
    db = (sweep_dir / "study.db").read_bytes()
    study = _study(summary)
    assert study.user_attrs["tahoe_ft_data"]["files"][0]["name"] == "screen.h5ad"
    assert study.user_attrs["tahoe_ft_base"] == {"0905": None}  # pretrained=null
    recipe = study.user_attrs["tahoe_ft_recipe"]
    assert recipe["params"] == PRUNE_SPACE and recipe["rounds"] == ["0905"] and recipe["nested"]
    root = sweep_dir.parent.parent
    other = _cfg(root, cfg.paths.data_cache, "prune", PRUNE_SPACE, "data.demo.seed=1")
    with pytest.raises(UserError, match=r"study 'prune' .*: the data file\(s\) screen.h5ad .*changed since"):
        api.sweep(dataclasses.replace(other, n_trials=cfg.n_trials))
    base = tmp_path / "base.pt"
    base.write_bytes(b"another base model")
    with pytest.raises(
        UserError, match=r"the base model of round 0905 \(was none \(from scratch\), now .*base.pt"
    ):
        api.sweep(dataclasses.replace(cfg, pretrained=str(base)))
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in (sweep_dir / "folds").iterdir()} == stamp
    assert (sweep_dir / "study.db").read_bytes() == db


def test_a_sweep_that_fails_before_its_first_trial_leaves_nothing_that_refuses_the_retry(
    tmp_path, cache, caplog
):
    root = tmp_path / "runs"
    space = {"optim.lr": "logfloat(1e-4, 1e-2)"}
    missing = compose(
        "sweep", ["+sweep=genespace", "pretrained=null", f"runs_dir={root}", "data=custom",
                  f"data.path={tmp_path / 'missing.h5ad'}"],
    )  # fmt: skip
    with pytest.raises(UserError, match="missing.h5ad"):
        api.sweep(dataclasses.replace(missing, sweep=SweepSpace(name="retry", rounds=["0905"], params=space)))
    assert not (root / "sweeps" / "retry").exists()
    with pytest.raises(UserError, match="folds=100"):
        api.sweep(_cfg(root, cache, "retry", space, "folds=100"))
    assert not (root / "sweeps" / "retry").exists()  # no empty study.db pinned to folds=100
    with caplog.at_level("WARNING", logger="tahoe_ft.search.study"):
        summary = api.sweep(_cfg(root, cache, "retry", space, "n_trials=1", "pruner=none", steps=3))
    assert summary["trials"]["complete"] == 1
    # the final test set (one fold's share, 2 of 8 perturbations, in 2 cell types) is too small for a verdict,
    # and the sweep says so before searching; with n_test=4 (8 groups) it does not
    final = json.loads((root / "sweeps" / "retry" / "folds" / "folds.json").read_text())["final_test"]
    (warning,) = [r.getMessage() for r in caplog.records if "final test set is" in r.getMessage()]
    assert (
        f"the final test set is 4 group(s) ({', '.join(sorted(final))})" in warning and "n_test=" in warning
    )
    caplog.clear()
    with caplog.at_level("WARNING", logger="tahoe_ft.search.study"):
        api.sweep(_cfg(root, cache, "retry4", space, "n_trials=1", "pruner=none", "n_test=4", steps=3))
    assert not [r for r in caplog.records if "final test set is" in r.getMessage()]


def test_untrained_models_of_set_sizes_16_and_64_get_the_same_objective(tmp_path, cache):
    """The objective compares trials on equal terms: the logged val_loss (a V-statistic) counts each cell's
    zero distance to itself, a floor that shrinks as 1/cell_set_len, so the old objective ranked an untrained
    model of 64-cell sets far above one of 16-cell sets; the unbiased energy distance it now reads does not.
    Four seeds, paired (same seed: same weights and draws); the bound is 3 standard errors of the paired
    differences (3.18 is the t-distribution's two-sided 5 % point with 3 degrees of freedom)."""
    from tahoe_ft.search.plan import make_plan
    from tahoe_ft.search.trial import Objective

    big = ["data.demo.cells_per_pert=80", "data.demo.n_ctrl=200"]  # a set of 64 cells needs groups of >= 64
    cfg = _cfg(tmp_path / "runs", cache, "fair", {"model.cell_set_len": "choice(16, 64)"}, "folds=0", *big,
               steps=0)  # fmt: skip
    train = [a for a in cfg.train_overrides if not a.startswith("model.cell_set_len")]
    cfg = dataclasses.replace(cfg, train_overrides=[*train, "checkpoint.validate_at_start=true"])
    plan = make_plan(cfg)
    assert plan.metrics == {"0905": "val/unbiased_loss"}
    objective, study = Objective(plan, [None]), optuna.create_study()
    new: dict[int, list[float]] = {16: [], 64: []}
    old: dict[int, list[float]] = {16: [], 64: []}
    for seed in range(4):
        for n in (16, 64):
            plan.cfg = dataclasses.replace(cfg, seed=seed)
            runs: list[str] = []
            new[n].append(objective.run_fold(study.ask(), {"model.cell_set_len": n}, 0, None, runs))
            info = json.loads((Path(runs[-1]) / "run.json").read_text())
            assert info["steps"] == 0 and info["best_step"] == 0
            old[n].append(info["best_val_loss"])

    def gap(v: dict[int, list[float]]) -> tuple[float, float]:
        d = np.array(v[16]) - np.array(v[64])
        return float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d)))

    mean, se = gap(new)
    assert abs(mean) < 3.18 * se and abs(mean) < 0.1 * np.mean(new[64]), (new, mean, se)
    old_mean, old_se = gap(old)  # the old objective: far apart, in every seed
    assert old_mean > 10 * old_se and all(a > 1.5 * b for a, b in zip(old[16], old[64], strict=True)), old


def test_the_starting_weights_check_is_validated_but_never_judged_by_the_pruner(tmp_path, cache):
    """checkpoint.validate_at_start: step 0 is a candidate for best-val.pt, but a check of the starting weights
    says nothing about the recipe's training, so it is not reported (on Papalexi it pruned whole feature
    sources by 2e-5 before they trained)."""
    space = {"optim.lr": "logfloat(1e-4, 1e-2)"}
    cfg = _cfg(tmp_path / "runs", cache, "start", space, "n_trials=1", "pruner=none", steps=6)
    cfg = dataclasses.replace(
        cfg, train_overrides=[*cfg.train_overrides, "checkpoint.validate_at_start=true"]
    )
    (t,) = _study(api.sweep(cfg)).get_trials()
    assert t.state == optuna.trial.TrialState.COMPLETE
    assert sorted(t.intermediate_values) == [3, 6, 13, 16]  # fold k at k * 10 + step: steps 3 and 6, not 0
    for run in t.user_attrs["run_dirs"]:
        (metrics,) = Path(run).glob("*_metrics.csv")
        checked = [r["step"] for r in csv.DictReader(metrics.open()) if r.get("val_loss")]
        assert checked[0] == "0"  # the step-0 check itself still ran


def test_a_finished_study_is_continued_not_repeated_and_keeps_its_recipe(swept):
    cfg, summary = swept
    again = api.sweep(cfg)  # n_trials=4 already finished: no new trial
    assert len(_study(again).get_trials()) == 4 and again["best"] == summary["best"]
    more = api.sweep(dataclasses.replace(cfg, n_trials=5))  # the total is 5: one more trial
    assert len(_study(more).get_trials(states=FINISHED)) == 5
    folds_dir = Path(summary["sweep_dir"]) / "folds"
    before = {p.name: p.read_text() for p in folds_dir.iterdir()}
    with pytest.raises(UserError, match="was started with folds=2, now 3"):
        api.sweep(dataclasses.replace(cfg, folds=3))
    assert {p.name: p.read_text() for p in folds_dir.iterdir()} == before  # the study's folds untouched


def test_best_yaml_is_an_experiment_file_that_tahoe_ft_train_trains(swept, tmp_path, capsys, monkeypatch):
    """As best.yaml's header says: copied into configs/experiment/ of the folder tahoe-ft runs from (not the
    package's), `tahoe-ft train +experiment=<name>` trains it."""
    cfg, summary = swept
    best = Path(summary["best_yaml"])
    text = best.read_text()
    assert text.startswith("# @package _global_\n")
    doc = yaml.safe_load(text)
    assert doc["defaults"] == ["/experiment/0905", "_self_"] and doc["experiment"] == "prune-best"
    params = summary["best"]["params"]
    assert (
        doc["optim"]["lr"] == params["optim.lr"] and doc["loss"]["mean_weight"] == params["loss.mean_weight"]
    )
    assert doc["step_scale"] == cfg.step_scale
    name = "prune-best"
    assert f"mkdir -p configs/experiment; cp {best} configs/experiment/{name}.yaml" in text
    user = tmp_path / "screen"  # a user's folder: its configs/experiment/ holds the copy
    (user / "configs" / "experiment").mkdir(parents=True)
    shutil.copyfile(best, user / "configs" / "experiment" / f"{name}.yaml")
    monkeypatch.chdir(user)
    assert not (config_dir() / "experiment" / f"{name}.yaml").exists()
    args = [f"+experiment={name}", "pretrained=null", *TINY_DEMO, *TRAIN, "trainer.max_steps=3"]
    cli.main(["train", *args, f"runs_dir={tmp_path / 'runs'}", f"paths.data_cache={cfg.paths.data_cache}"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    run_dir = Path(out["run_dir"])
    assert run_dir.parent.name == "prune-best" and out["best_val_loss"] is not None
    trained = OmegaConf.load(run_dir / "prune-best_config.yaml")
    assert trained.optim.lr == params["optim.lr"] and trained.loss.mean_weight == params["loss.mean_weight"]
    assert trained.freeze.modules == ["transformer_backbone"]  # round 0905's recipe underneath
    assert trained.step_scale == cfg.step_scale


# -- a real `tahoe-ft sweep` SIGKILLed mid-trial, then run again --------------------------------------------


def _sweep_cmd(root: Path, cache: Path, n_trials: int, steps: str = "int(9, 15, 3)") -> list[str]:
    train = "[" + ",".join(f"'{a}'" for a in TRAIN) + "]"
    return [
        sys.executable, "-m", "tahoe_ft.cli", "sweep", "+sweep=genespace", "sweep.name=killed",
        f"n_trials={n_trials}", "folds=2", "pretrained=null", f"runs_dir={root}", f"paths.data_cache={cache}",
        *TINY_DEMO, "~sweep.params.model", "~sweep.params.freeze", "~sweep.params.sched",
        f"sweep.params.trainer.max_steps='{steps}'", f"train_overrides={train}",
    ]  # fmt: skip


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    for k in ("TAHOE_FT_DEBUG", "TAHOE_FT_RUN_DIR", "HYDRA_FULL_ERROR"):
        env.pop(k, None)
    return env


@pytest.mark.timeout(1200)
def test_a_sigkilled_sweep_run_again_ends_with_n_finished_trials_and_no_repeats(tmp_path, cache):
    root = tmp_path / "runs"
    sweep_dir = root / "sweeps" / "killed"
    cmd = _sweep_cmd(root, cache, n_trials=3)
    log_path = tmp_path / "first.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=_env(), stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        # kill it inside trial 1, once that trial has started training a fold
        while proc.poll() is None and time.time() < deadline:
            if list((sweep_dir / "trial-0001").glob("fold-*/0905/2*")):
                break
            time.sleep(0.05)
        assert proc.poll() is None, log_path.read_text()[-3000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    storage = f"sqlite:///{sweep_dir / 'study.db'}"
    states = {t.number: t.state for t in optuna.load_study(study_name="killed", storage=storage).trials}
    assert states[0] in FINISHED and states[1] == optuna.trial.TrialState.RUNNING, states

    again = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=800)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads((sweep_dir / "sweep.json").read_text())
    # the console: a short table of the best trials and the command that trains the winner, one line per
    # trial, no training output of the trials (Lightning's model tables, GPU lines, run paths)
    out = again.stdout.strip().splitlines()
    assert len(out) <= 12 and out[-1].endswith("sweep.json") and "train the best recipe:" in out, out
    assert any("tahoe-ft train +experiment=killed-best" in line for line in out), out
    assert "Trainable params" not in again.stderr and "GPU available" not in again.stderr
    assert len(again.stderr.strip().splitlines()) <= 12, again.stderr[-3000:]
    study = optuna.load_study(study_name="killed", storage=storage)
    trials = study.get_trials()
    assert len(study.get_trials(states=FINISHED)) == 3
    assert summary["trials"]["complete"] + summary["trials"]["pruned"] == 3
    killed = trials[1]
    assert (
        killed.state == optuna.trial.TrialState.FAIL and "ended mid-trial" in killed.user_attrs["fail_reason"]
    )
    assert killed.user_attrs["pid"] == proc.pid
    assert [t.number for t in trials] == list(range(len(trials)))  # no number twice
    drawn = [tuple(sorted(t.params.items())) for t in trials]
    assert len(set(drawn)) == len(drawn)  # the resumed run drew new values, not the first run's again


def _stop_in_trial(cmd: list[str], sweep_dir: Path, trial: int, sig: int, log_path: Path):
    """Run the sweep command; send `sig` once trial `trial` trains a fold; return the finished process and its
    stderr."""
    with open(log_path, "w") as err:
        # SIGINT at its default disposition in the child: a shell's background job (`cmd &`, nohup) runs
        # with SIGINT ignored, which the child would inherit, and Python then never raises KeyboardInterrupt
        proc = subprocess.Popen(
            cmd,
            env=_env(),
            stdout=subprocess.DEVNULL,
            stderr=err,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        deadline = time.time() + 300
        while proc.poll() is None and time.time() < deadline:
            if list((sweep_dir / f"trial-{trial:04d}").glob("fold-*/0905/2*")):
                break
            time.sleep(0.05)
        assert proc.poll() is None, log_path.read_text()[-3000:]
        proc.send_signal(sig)
        proc.wait(timeout=300)
    return proc, log_path.read_text()


@pytest.mark.timeout(900)
def test_ctrl_c_and_sigterm_fail_the_trial_and_say_in_one_line_how_to_continue(tmp_path, cache):
    """Ctrl-C used to exit 1 in silence (Lightning's sys.exit) with the trial left RUNNING; SIGTERM's line
    advised resume=true, which sweep does not take. The trials are long (thousands of steps) so that the
    signal always lands in training: with 9-15 steps a trial could end between two polls."""
    root = tmp_path / "runs"
    sweep_dir = root / "sweeps" / "killed"
    cmd = _sweep_cmd(root, cache, n_trials=3, steps="int(4000, 6000, 1000)")
    storage = f"sqlite:///{sweep_dir / 'study.db'}"
    for trial, sig, how in (
        (0, signal.SIGINT, "interrupted (Ctrl-C)"),
        (1, signal.SIGTERM, "stopped by SIGTERM"),
    ):
        proc, err = _stop_in_trial(cmd, sweep_dir, trial, sig, tmp_path / f"{trial}.log")
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert proc.returncode == 2, err[-3000:]
        assert lines[-1] == (
            f"error: sweep 'killed' {how} during trial {trial}: it is marked FAIL and does not count; run the "
            "same command again to continue the study"
        ), err[-3000:]
        assert "Traceback" not in err and "resume=true" not in err, err[-3000:]
        study = optuna.load_study(study_name="killed", storage=storage)
        t = study.trials[trial]
        assert t.state == optuna.trial.TrialState.FAIL, [x.state for x in study.trials]
        assert not [p for p in (sweep_dir / f"trial-{trial:04d}").rglob("*") if p.suffix in (".pt", ".ckpt")]


# -- a trial never reads a test perturbation --------------------------------------------------------------


def _poisoned_copy(src: Path, dst: Path, perts: list[str], seed: int) -> Path:
    """`src` with the cells of `perts` replaced by garbage (huge, shuffled values in X, the counts layer and
    X_state) that still passes the data checks; everything else as it was."""
    a = ad.read_h5ad(src)
    rows = a.obs["target_gene"].isin(perts).to_numpy()
    assert rows.any()
    rng = np.random.default_rng(seed)
    x = np.asarray(a.X.toarray() if hasattr(a.X, "toarray") else a.X, dtype=np.float32)
    x[rows] = rng.uniform(0, 1000, size=(int(rows.sum()), x.shape[1])).astype(np.float32)
    a.X = x
    for key in list(a.layers):
        layer = np.asarray(a.layers[key].toarray() if hasattr(a.layers[key], "toarray") else a.layers[key])
        layer[rows] = rng.integers(0, 10**6, size=(int(rows.sum()), layer.shape[1]))
        a.layers[key] = layer
    for key in list(a.obsm):
        emb = np.asarray(a.obsm[key]).copy()
        emb[rows] = rng.normal(0, 1e3, size=(int(rows.sum()), emb.shape[1]))
        a.obsm[key] = emb
    dst.parent.mkdir(parents=True)
    a.write_h5ad(dst)
    return dst


def test_trials_never_read_the_folds_test_perturbations(tmp_path, cache, monkeypatch):
    root = tmp_path / "runs"
    space = {"optim.lr": "logfloat(1e-4, 1e-2)", "loss.mean_weight": "float(0, 20)"}
    clean_cfg = _cfg(root, cache, "clean", space, "n_trials=2", "pruner=none")
    clean = api.sweep(clean_cfg)
    assignment = json.loads((Path(clean["sweep_dir"]) / "folds" / "folds.json").read_text())
    screen = Path(clean_cfg.data.path)

    def run_on_copies(name: str, split: str, n_trials: int) -> dict:
        """The same sweep, each fold reading a copy of the screen whose `split` perturbations are garbage."""
        copies = {
            f["index"]: _poisoned_copy(
                screen, tmp_path / name / f"fold-{f['index']}" / screen.name, f[split], 7
            )
            for f in assignment["folds"]
        }
        real = sweep_trial.fold_data

        def poisoned(data, fold):
            return dataclasses.replace(real(data, fold), path=str(copies[fold.index]))

        with monkeypatch.context() as m:
            m.setattr(sweep_trial, "fold_data", poisoned)
            return api.sweep(
                dataclasses.replace(
                    clean_cfg, n_trials=n_trials, sweep=SweepSpace(name=name, rounds=["0905"], params=space)
                )
            )

    poisoned = run_on_copies("poisoned", "test", 2)
    a, b = _study(clean).get_trials(), _study(poisoned).get_trials()
    assert [t.params for t in a] == [t.params for t in b]
    assert [t.value for t in a] == [t.value for t in b]  # exactly
    assert [t.user_attrs["fold_values"] for t in a] == [t.user_attrs["fold_values"] for t in b]
    assert [t.intermediate_values for t in a] == [t.intermediate_values for t in b]
    # the same garbage in the validation perturbations does change the objective: the test can fail
    control = run_on_copies("control", "val", 1)
    assert _study(control).get_trials()[0].value != a[0].value


# -- objective=val_score, then final=true on the data set's own split -------------------------------------


def test_val_score_scores_the_validation_perturbations_and_final_scores_test_once(tmp_path, cache):
    space = {"optim.lr": "logfloat(1e-4, 1e-2)"}
    cfg = _cfg(tmp_path / "runs", cache, "score", space, "n_trials=1", "folds=0", "objective=val_score")
    summary = api.sweep(dataclasses.replace(cfg, final=True))
    study = _study(summary)
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE and summary["direction"] == "maximize"
    (t,) = study.get_trials()
    (run,) = [Path(r) for r in t.user_attrs["run_dirs"]]
    assert run.relative_to(summary["sweep_dir"]).parts[:2] == ("trial-0000", "fold-own")
    predicted = json.loads((run / "predict.json").read_text())
    assert predicted["split"] == "val"  # the trial predicted its validation perturbations, not the test ones
    val = sorted(set(ad.read_h5ad(run / "real.h5ad", backed="r").obs["target_gene"]) - {"non-targeting"})
    assert val == sorted(json.loads((run / "manifest.json").read_text())["splits"]["val"])
    score = json.loads((run / "eval" / "score.json").read_text())
    assert t.value == score["avg_score"] and not score.get("baselines")
    assert all(v < 0 for v in t.intermediate_values.values())  # -val_loss: the pruner maximises too
    # final=true: the best recipe trained again and scored once on the test perturbations, panel and ceiling
    final = summary["final"]
    assert final["trial"] == 0 and final["params"] == t.params
    (final_run,) = (Path(summary["sweep_dir"]) / "final" / "look-1" / "0905").glob("2*")
    assert json.loads((final_run / "predict.json").read_text())["split"] == "test"
    assert json.loads((final_run / "run.json").read_text())["status"] == "finished"
    trained = OmegaConf.load(final_run / "0905_config.yaml")
    assert trained.optim.lr == t.params["optim.lr"] and trained.logger.wandb_group == "sweep-score"
    panel = json.loads((final_run / "eval" / "score.json").read_text())["baselines"]
    assert {"ceiling", "control"} <= set(panel)
    assert Path(final["compare_csv"]).is_file()
    # the look is recorded in the study and in sweep.json: when, the commit, the trial and its recipe
    (look,) = study.user_attrs["tahoe_ft_final_looks"]
    assert look["look"] == 1 and look["trial"] == 0 and look["params"] == t.params and look["when"]
    assert look["commit"] is None or len(look["commit"].removesuffix("-dirty")) == 40
    saved = json.loads((Path(summary["sweep_dir"]) / "sweep.json").read_text())
    assert saved["final_looks"] == [look] and saved["final"]["look"] == 1
    # a second look at the test set is refused in one line, and needs final_again=true, which is recorded
    with pytest.raises(UserError, match=r"scored its final test set already \(1 time\(s\).*final_again=true"):
        api.sweep(dataclasses.replace(cfg, final=True))
    assert not (Path(summary["sweep_dir"]) / "final" / "look-2").exists()
    again = api.sweep(dataclasses.replace(cfg, final=True, final_again=True))
    looks = _study(again).user_attrs["tahoe_ft_final_looks"]
    assert [x["look"] for x in looks] == [1, 2] and looks[1]["final_again"] and again["final"]["look"] == 2


# -- bad input: one line, exit status 2, nothing written ------------------------------------------------------

BAD = {
    "unknown key": (["+sweep.params.optim.lrr='float(0.1, 1)'"], "params.optim.lrr"),
    "empty range": (["sweep.params.loss.mean_weight='float(1, 1)'"], "range is empty"),
    "inverted range": (["sweep.params.trainer.max_steps='int(100, 25)'"], "range is inverted"),
    "non-numeric bound": (["sweep.params.optim.lr='logfloat(a, 1e-2)'"], "is not a finite number"),
    "logfloat from 0": (["sweep.params.optim.lr='logfloat(0, 1e-2)'"], "logfloat needs lo > 0"),
    "empty choice": (["sweep.params.model.feature_prior='choice()'"], "choice() is empty"),
    "unknown range": (["sweep.params.loss.mean_weight='normal(0, 1)'"], "unknown range 'normal'"),
    "not a range": (["sweep.params.loss.mean_weight=3"], "is not a search range"),
    "bad choice value": (["sweep.params.model.cell_set_len='choice(16, many)'"], "params.model.cell_set_len"),
    "unknown round": (["sweep.rounds=[0999]"], "unknown round(s) ['0999']"),
    "no rounds": (["sweep.rounds=[]"], "rounds is empty"),
    "split key": (["+sweep.params.data.test_perts='choice(a, b)'"], "params.data.test_perts"),
    "unknown space": (["+sweep=nope"], "unknown sweep space 'nope'"),
    "no space": ([], "no search space"),
    "missing parent": (["pretrained=run:pretrain/best-val.pt"], "round 0905 starts from run:pretrain"),
    "storage folder missing": (["storage=sqlite:////no/such/folder/study.db"], "does not exist"),
    "storage driver": (["storage=nosuchdb://host/db"], "no SQLAlchemy driver"),
    "storage not a url": (["storage='not a url'"], "is not a database URL"),
    "storage not sqlite": (["storage=sqlite:///{tmp}/junk.db"], "is not a SQLite database"),
    "n_trials": (["n_trials=0"], "n_trials=0 must be >= 1"),
    "folds": (["folds=1"], "folds=1"),
    "storage read-only": (["storage=sqlite:///{tmp}/ro.db"], "ro.db is read-only"),
    "n_test": (["n_test=0"], "n_test=0 must be >= 1"),
    "final_again alone": (["final_again=true"], "final_again=true goes with final=true"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, tmp_path, capsys):
    extra, message = BAD[case]
    work = tmp_path / "work"
    work.mkdir()
    junk = work / "junk.db"
    if case == "storage not sqlite":
        junk.write_text("not a database\n")
    if case == "storage read-only":  # an (empty) SQLite file the user made read-only
        (work / "ro.db").touch()
        (work / "ro.db").chmod(0o444)
    extra = [e.replace("{tmp}", str(work)) for e in extra]
    space = [] if case in ("no space", "unknown space") else ["+sweep=genespace"]
    pretrained = [] if case == "missing parent" else ["pretrained=null"]
    args = [*space, *pretrained, "folds=2", f"runs_dir={work / 'runs'}", f"paths.data_cache={work / 'cache'}"]
    before = sorted(work.rglob("*"))
    with pytest.raises(SystemExit) as exc:
        cli.main(["sweep", *args, *TINY_DEMO, *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert sorted(work.rglob("*")) == before  # no folder, no database, no data


@pytest.mark.parametrize(
    ("name", "data"), [("genespace", "demo"), ("se600m", "demo"), ("defaults", "papalexi")]
)
def test_the_shipped_spaces_compose_with_every_range_end_and_choice(name, data, tmp_path):
    from tahoe_ft.search.plan import make_plan, spaces

    assert name in spaces()
    cfg = compose(
        "sweep", [f"+sweep={name}", f"data={data}", "pretrained=null", f"runs_dir={tmp_path / 'runs'}"]
    )
    plan = make_plan(cfg)  # every round composed with both ends of every range and every choice
    rounds = {"genespace": "0905", "se600m": "0826", "defaults": "0905"}
    assert plan.name == name and plan.params and plan.rounds == [rounds[name]]
    assert not any(tmp_path.iterdir())


# -- the grammar -------------------------------------------------------------------------------------------


def test_the_grammar_parses_each_range_and_values_round_trip_through_hydra():
    assert parse_param("a", "float(0, 2.5)", "w").args == (0.0, 2.5)
    assert parse_param("a", "logfloat(1e-5, 1e-2)", "w").args == (1e-5, 1e-2)
    assert parse_param("a", "int(25, 110, 25)", "w").args == (25, 100, 25)  # hi on the step grid
    assert parse_param("a", "int(1, 3)", "w").args == (1, 3, 1)
    assert parse_param("a", "choice(null, 10, true, 1e-3, pca, 'a b')", "w").args == (
        None, 10, True, 1e-3, "pca", "a b",
    )  # fmt: skip
    with pytest.raises(UserError, match="given twice"):
        flatten({"optim": {"lr": "float(0, 1)"}, "optim.lr": "float(0, 1)"}, "w")
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for v in (None, True, 3, 1.2345678901234567e-05, 0.1, "pca", "a b", "it's", "/x/y:z.pt", [1, "x"]):
        assert parser.parse_overrides([f"k={value_text(v)}"])[0].value() == v, v
