"""The console script: composition, one-line errors with exit status 2, nothing lost, real wandb offline files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import tahoe_ft
from conftest_train import TINY_DEMO, cli, train, train_args
from tahoe_ft.config import compose
from tahoe_ft.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def test_experiment_files_carry_the_case_study_values(tmp_path):
    expect = {  # steps, lr, batch, decoder weight, frozen, parent
        "0826": (8000, 3e-4, 32, 0.5, True, "${pretrained}"),
        "0901": (4000, 5e-5, 48, 1.0, True, "run:0826/best-val.pt"),
        "0905": (1000, None, None, None, True, "${pretrained}"),
        "0907": (10000, None, None, None, False, "run:0906/best-val.pt"),
        "0908": (40000, None, None, None, False, "run:0907/best-val.pt"),
    }
    for exp, (steps, lr, batch, dw, frozen, parent) in expect.items():
        cfg = compose("train", [f"+experiment={exp}", f"paths.data_cache={tmp_path}", *TINY_DEMO])
        assert cfg.trainer.max_steps == steps, exp
        if lr is not None:
            assert cfg.optim.lr == pytest.approx(lr)
            assert cfg.data.batch_size == batch
        if dw is not None:
            assert cfg.loss.decoder_weight == dw
            assert cfg.encoder.name == "se600m"
        else:
            assert cfg.encoder.name == "raw_expression"
        assert ("transformer_backbone" in cfg.freeze.modules) == frozen
        raw = (REPO / "configs" / "experiment" / f"{exp}.yaml").read_text()
        assert f"init_from: {parent}" in raw


def test_configs_in_the_folder_tahoe_ft_runs_from_are_found_beside_the_shipped_ones(tmp_path, monkeypatch):
    """Your own `configs/experiment/NAME.yaml` (a sweep's best.yaml) and `configs/data/NAME.yaml`, in the folder
    you run from, compose by name; without the folder they are unknown; a file named like a shipped option is
    refused in one line (Hydra would silently take the shipped one)."""
    user = tmp_path / "screen"
    (user / "configs" / "experiment").mkdir(parents=True)
    (user / "configs" / "data").mkdir()
    (user / "configs" / "experiment" / "mine.yaml").write_text(
        "# @package _global_\ndefaults:\n  - /experiment/0905\n  - _self_\nexperiment: mine\n"
        "optim:\n  lr: 0.00123\n"
    )
    (user / "configs" / "data" / "myscreen.yaml").write_text(
        "defaults:\n  - custom\n  - _self_\npath: screen.h5ad\ninput_transform: counts\n"
    )
    monkeypatch.chdir(tmp_path)  # no configs/ here
    with pytest.raises(UserError, match="unknown experiment 'mine'"):
        compose("train", ["+experiment=mine"])
    monkeypatch.chdir(user)
    cfg = compose("train", ["+experiment=mine", "data=myscreen", f"paths.data_cache={tmp_path}"])
    assert cfg.experiment == "mine" and cfg.optim.lr == pytest.approx(0.00123)
    assert cfg.freeze.modules == ["transformer_backbone"]  # round 0905's recipe underneath
    assert cfg.data.path == "screen.h5ad" and cfg.data.input_transform == "counts"
    (user / "configs" / "experiment" / "0905.yaml").write_text("# @package _global_\nexperiment: '0905'\n")
    with pytest.raises(UserError, match=r"experiment/0905.yaml: '0905' is the name of a shipped experiment"):
        compose("train", ["+experiment=mine"])
    (user / "configs" / "experiment" / "0905.yaml").unlink()
    (user / "configs" / "data" / "custom.yaml").write_text("name: custom\npath: x.h5ad\n")
    with pytest.raises(UserError, match=r"data/custom.yaml: 'custom' is the name of a shipped data option"):
        compose("train", ["+experiment=mine", "data=myscreen"])


def test_step_scale_scales_study_steps(tmp_path):
    cfg = compose(
        "train", ["+experiment=0908", "step_scale=0.01", f"paths.data_cache={tmp_path}", *TINY_DEMO]
    )
    assert cfg.trainer.max_steps == 400


@pytest.mark.parametrize(
    "args, needle",
    [
        (["train", "+experiment=0999"], "unknown experiment '0999'"),
        (["train", "+experiment=0906", "optim.lrr=1"], "optim.lrr"),
        (
            [
                "train",
                "+experiment=0905",
                "init_from=null",
                "data.path=/nonexistent/screen.h5ad",
                "logger=csv",
            ],
            "/nonexistent/screen.h5ad",
        ),
        (
            [
                "train",
                "+experiment=0905",
                "init_from=null",
                "freeze.modules=[transformer_bakbone]",
                "model.cell_set_len=8",
                "logger=csv",
            ],
            "transformer_bakbone",
        ),
        (
            ["train", "+experiment=0905", "init_from=null", "model.cell_set_len=500", "logger=csv"],
            "cell_set_len",
        ),
        (["predict", "ckpt=missing.pt"], "no training run"),
        (["frobnicate"], "unknown command"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, needle):
    extra = (
        [f"runs_dir={tmp_path / 'runs'}", f"paths.data_cache={tmp_path / 'cache'}"]
        if args[0] == "train"
        else []
    )
    extra += [f"runs_dir={tmp_path / 'runs'}"] if args[0] == "predict" else []
    out = cli(*args, *extra, *(TINY_DEMO if args[0] == "train" else []), cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = [ln for ln in out.stderr.strip().splitlines() if ln.strip()]
    assert lines[-1].startswith("error: ") and needle in lines[-1], out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    # nothing half-written: a refused training leaves no run directory behind
    assert not list((tmp_path / "runs").glob("*/2*"))


def test_bad_checkpoint_refused_and_runs_untouched(tmp_path):
    run_dir = train(tmp_path, "pretrain")
    before = {p: p.read_bytes() for p in (run_dir / "checkpoints").iterdir()}
    bad = tmp_path / "truncated.pt"
    bad.write_bytes((run_dir / "checkpoints" / "best-val.pt").read_bytes()[:1000])
    with pytest.raises(UserError, match="truncated"):
        train(tmp_path, "0905", f"init_from={bad}")
    evil = tmp_path / "pickle.pt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "obj": object.__new__(_Evil)}, evil)
    with pytest.raises(UserError, match="unpickling"):
        train(tmp_path, "0905", f"init_from={evil}")
    not_tensor = tmp_path / "list.pt"
    torch.save([1, 2, 3], not_tensor)
    with pytest.raises(UserError, match="not a checkpoint"):
        train(tmp_path, "0905", f"init_from={not_tensor}")
    # nothing was written: no new run of 0905, the pretrain checkpoints are unchanged
    assert not (tmp_path / "runs" / "0905").exists() or not any((tmp_path / "runs" / "0905").iterdir())
    assert {p: p.read_bytes() for p in (run_dir / "checkpoints").iterdir()} == before


class _Evil:
    pass


def test_wandb_offline_run_files(tmp_path):
    args = [a for a in train_args(tmp_path, "pretrain") if a != "logger=csv"]
    os.environ["WANDB_MODE"] = "offline"
    try:
        run_dir = tahoe_ft.train(compose("train", args))
    finally:
        os.environ.pop("WANDB_MODE", None)
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1
    files = {p.name for p in offline[0].rglob("*")}
    assert any(name.endswith(".wandb") for name in files)
    assert (run_dir / "pretrain_metrics.csv").is_file()


def test_reproduce_gives_every_round_its_own_wandb_run(tmp_path, monkeypatch):
    """Rounds trained in one process (reproduce, sweeps) each get one offline wandb run with their own metrics;
    before, every round after the first logged into the first round's run."""
    from conftest_train import TINY_MODEL, column, metrics
    from wandb_file import summary

    monkeypatch.setenv("WANDB_MODE", "offline")
    data = [f"paths.data_cache={tmp_path / 'cache'}", *TINY_DEMO]
    cfg = compose(
        "reproduce",
        [f"runs_dir={tmp_path / 'runs'}", "experiments=[pretrain,0905,0906]", "evaluate=[0906]", *data],
    )
    cfg.train_overrides = [a for a in train_args(tmp_path, "0905") if a.split("=")[0] in _RUN_KEYS] + [
        a for a in TINY_MODEL if not a.startswith("encoder.")
    ]
    tahoe_ft.reproduce(cfg)
    for exp in ("pretrain", "0905", "0906"):
        run_dir = (tmp_path / "runs" / exp / "latest").resolve()
        files = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
        assert len(files) == 1, (exp, files)
        got = summary(files[0])
        assert got["config"]["experiment"] == exp
        logged = [h["train/loss"] for h in got["history"] if "train/loss" in h]
        assert logged == pytest.approx([v for _, v in column(metrics(run_dir), "train/loss")], rel=1e-6), exp


_RUN_KEYS = {
    "data.batch_size", "trainer.max_steps", "trainer.val_check_interval", "trainer.log_every_n_steps",
    "trainer.enable_progress_bar", "trainer.accelerator", "sched.warmup_steps", "freeze.warmup_steps",
}  # fmt: skip


def test_check_reports_splits_without_training(tmp_path):
    summary = tahoe_ft.check(
        compose("check", [f"paths.data_cache={tmp_path}", *TINY_DEMO, "model.cell_set_len=8"])
    )
    sp = summary["splits"]
    assert len(sp["val"]["perturbations"]) == 2 and len(sp["test"]["perturbations"]) == 2
    assert not set(sp["train"]["perturbations"]) & (
        set(sp["val"]["perturbations"]) | set(sp["test"]["perturbations"])
    )
    assert summary["genes"] == 60 and summary["batches_per_epoch"]["train"] > 0
    out = cli(
        "check", "data=papalexi", "data.input_transform=log1p", f"paths.data_cache={tmp_path}", cwd=tmp_path
    )
    assert out.returncode == 2 and out.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "counts" in out.stderr.strip().splitlines()[-1]


def test_ddp_two_processes_share_one_run(tmp_path):
    """trainer.strategy=ddp on 2 CPU processes (gloo): Lightning re-runs the command for rank 1, which must
    join rank 0's run directory; the sampler shards training sets per rank, every rank validates all sets."""
    args = [
        a
        for a in train_args(tmp_path, "pretrain", steps=4, val_every=2)
        if not a.startswith("trainer.accelerator")
    ]
    out = cli(
        "train",
        *args[1:],
        "+experiment=pretrain",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.strategy=ddp",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    runs = [p for p in (tmp_path / "runs" / "pretrain").iterdir() if p.name != "latest"]
    assert len(runs) == 1
    info = json.loads((runs[0] / "run.json").read_text())
    assert info["status"] == "finished" and info["steps"] == 4 and info["best_step"] in (2, 4)
    assert (runs[0] / "checkpoints" / "best-val.pt").is_file()


@pytest.mark.parametrize(
    "command, override, allowed",
    [
        ("train", "data.input_transform=log2", "log1p, counts"),
        ("train", "data.basal_mapping=plate", "random, batch"),
        ("train", "loss.name=l1", "energy, sinkhorn, mse"),
        ("train", "sched.name=step", "cosine, onecycle, constant"),
        ("train", "checkpoint.monitor=best", "auto, main, decoder"),
        ("train", "encoder.name=scgpt", "raw_expression, se600m"),
        ("predict", "precision=fp16", "32, bf16"),
        ("predict", "split=train", "test, val"),
        ("eval", "profile=pds", "vcc, full"),
        ("reproduce", "profile=pds", "vcc, full"),
    ],
)
def test_an_option_outside_its_set_is_one_line_naming_the_key_and_the_choices(command, override, allowed):
    key, value = override.split("=")
    with pytest.raises(UserError) as err:
        compose(command, [override])
    msg = str(err.value)
    assert "\n" not in msg and f"'{key}'" in msg and f"'{value}'" in msg and f"[{allowed}]" in msg


def test_enum_options_compose_and_are_saved_as_plain_strings():
    from tahoe_ft.config import as_dict

    assert compose("predict", ["precision=32"]).precision == "32"
    cfg = compose("train", ["+experiment=0905", "sched.name=onecycle", "data.basal_mapping=batch"])
    assert cfg.sched.name == "onecycle" and cfg.data.basal_mapping == "batch"
    saved = as_dict(cfg)
    assert type(saved["sched"]["name"]) is str and type(saved["checkpoint"]["monitor"]) is str
    assert json.dumps(saved["data"]["input_transform"]) == '"log1p"'


# -- runs_dir that cannot hold runs, and names Hydra cannot read unquoted (issue #31) -------------------------

#: every command whose schema has runs_dir, with what it needs besides
RUNS_DIR_COMMANDS = [
    ("train", ["+experiment=0905", "data=demo", "logger=csv"]),
    ("predict", []),
    ("eval", []),
    ("compare", []),
    ("reproduce", []),
    ("sweep", ["+sweep=genespace"]),
    ("export", []),
    ("export-state", []),
]


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("error: ") and "Traceback" not in err, err[-3000:]
    assert sum(ln.startswith("error") for ln in lines) == 1, err[-3000:]
    return lines[-1]


@pytest.mark.parametrize("command, extra", RUNS_DIR_COMMANDS, ids=[c for c, _ in RUNS_DIR_COMMANDS])
def test_runs_dir_that_is_a_file_is_one_line_before_anything_is_written(
    tmp_path, monkeypatch, capsys, command, extra
):
    """runs_dir= a file, or a path below one: one line (what, where, how to fix), exit 2, and nothing written
    (train used to generate the demo data into the cache first, then die in mkdir with a traceback)."""
    from tahoe_ft.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("not a folder\n")
    for runs_dir, needle in (
        ("notes.txt", "runs_dir 'notes.txt' is a file, not a folder; pass runs_dir=<a folder>"),
        ("notes.txt/runs", f"runs_dir 'notes.txt/runs' lies below {tmp_path / 'notes.txt'}, which is a file"),
    ):
        with pytest.raises(SystemExit) as exc:
            main([command, *extra, f"runs_dir={runs_dir}"])
        assert exc.value.code == 2
        assert needle in _error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_runs_dir_this_user_cannot_write_is_one_line(tmp_path, monkeypatch, capsys):
    """A read-only runs folder: the commands that write there refuse it in one line; those that only read it
    (export; compare with out_dir=) go on. Root writes anywhere, so as root the permission check sees the
    folder's mode bits as a user would (the real check, os.access, says yes to root)."""
    import stat
    import types

    from tahoe_ft import config
    from tahoe_ft.cli import main

    runs = tmp_path / "runs"
    (runs / "0905").mkdir(parents=True)
    runs.chmod(0o555)
    if os.access(runs, os.W_OK):  # root: answer as the folder's owner without root's privilege would get

        def by_mode(path, mode):
            return bool(os.stat(path).st_mode & stat.S_IWUSR) or not mode & os.W_OK

        monkeypatch.setattr(config, "os", types.SimpleNamespace(access=by_mode, W_OK=os.W_OK, X_OK=os.X_OK))
    monkeypatch.chdir(tmp_path)
    try:
        for command, extra in RUNS_DIR_COMMANDS:
            if command in ("export", "export-state"):
                continue
            with pytest.raises(SystemExit) as exc:
                main([command, *extra, "runs_dir=runs"])
            assert exc.value.code == 2
            line = _error_line(capsys)
            assert f"runs_dir 'runs': {runs} is not writable by this user, and {command} writes" in line, line
            assert "chmod u+w" in line
        # below a read-only folder, train cannot make the runs folder either
        with pytest.raises(SystemExit):
            main(["train", "+experiment=0905", "runs_dir=runs/new"])
        assert f"{runs} is not writable" in _error_line(capsys)
        # compare writing elsewhere only reads runs_dir (nothing evaluated there: its own message)
        with pytest.raises(SystemExit):
            main(["compare", "runs_dir=runs", f"out_dir={tmp_path / 'report'}"])
        assert "no evaluated runs" in _error_line(capsys)
    finally:
        runs.chmod(0o755)
    assert sorted(p.name for p in runs.iterdir()) == ["0905"] and not (tmp_path / "report").exists()


@pytest.mark.parametrize(
    "command, override, fixed",
    [
        ("train", "data.val_perts=[Ä1,B]", """data.val_perts='["Ä1", "B"]'"""),
        ("train", "data.test_perts=[HK2, IER5L,KMT2Aé]", """data.test_perts='["HK2", "IER5L", "KMT2Aé"]'"""),
        ("check", "data.control_pert=contrôle", """data.control_pert='"contrôle"'"""),
    ],
)
def test_an_unquoted_non_ascii_name_says_how_to_quote_it(capsys, command, override, fixed):
    """Hydra's lexer reads unquoted names in ASCII only; its bare `LexerNoViableAltException` and a caret
    become one line that gives the override back quoted, which composes."""
    from tahoe_ft.cli import main

    with pytest.raises(SystemExit) as exc:
        main([command, "+experiment=0905" if command == "train" else "data=demo", override])
    assert exc.value.code == 2
    line = _error_line(capsys)
    assert fixed in line and "Lexer" not in line and "quote" in line, line
    # what the shell hands over for the fixed override composes to the names
    key, _, quoted = fixed.partition("=")
    base = ["+experiment=0905"] if command == "train" else []
    cfg = compose(command, [*base, f"{key}={quoted.strip(chr(39))}"])
    got = OmegaConf.select(OmegaConf.structured(cfg), key)
    names = [n.strip() for n in override.partition("=")[2].strip("[]").split(",")]
    assert (list(got) if "[" in override else [got]) == names
