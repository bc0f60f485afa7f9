"""The console script: composition, one-line errors with exit status 2, nothing lost, real wandb offline files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

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
