"""End-to-end training on tiny demo data: every round of the case study, parents by name, freeze, init, resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

import tahoe_ft
from conftest_train import TINY_DEMO, column, metrics, train, train_args
from tahoe_ft.config import ExportStateConfig, compose
from tahoe_ft.errors import UserError
from tahoe_ft.runs import newest_run

CHAIN = ["pretrain", "0826", "0901", "0905", "0906", "0907", "0908"]
PARENT = {
    "0826": "pretrain",
    "0901": "0826",
    "0905": "pretrain",
    "0906": "0905",
    "0907": "0906",
    "0908": "0907",
}


def _weights(run_dir: Path, name: str = "best-val.pt") -> dict:
    return torch.load(run_dir / "checkpoints" / name, map_location="cpu", weights_only=True)


def _backbone(sd: dict) -> dict:
    return {k: v for k, v in sd.items() if k.startswith("transformer_backbone.")}


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("chain")
    runs = {exp: train(root, exp) for exp in CHAIN}
    return root, runs


def test_every_round_trains(chain):
    _, runs = chain
    for exp, run_dir in runs.items():
        info = json.loads((run_dir / "run.json").read_text())
        assert info["status"] == "finished", exp
        assert info["steps"] == 6, exp
        assert (run_dir / "checkpoints" / "best-val.pt").is_file()
        assert (run_dir / "checkpoints" / "last.ckpt").is_file()
        assert (run_dir / f"{exp}_config.yaml").is_file()
        assert (run_dir / f"{exp}_metrics.csv").is_file()
        # the latest pointer names this run
        assert (run_dir.parent / "latest").resolve() == run_dir.resolve()


def test_parents_resolve_by_name(chain):
    _, runs = chain
    for exp, parent in PARENT.items():
        info = json.loads((runs[exp] / "run.json").read_text())
        assert Path(info["parent"]).resolve() == (runs[parent] / "checkpoints" / "best-val.pt").resolve(), exp
        report = json.loads((runs[exp] / "init_report.json").read_text())
        assert report["by_module"]["transformer_backbone"]["loaded"] > 0


def test_decoder_weight_logged_as_used(chain):
    _, runs = chain
    w26 = {v for _, v in column(metrics(runs["0826"]), "train/decoder_weight")}
    w01 = {v for _, v in column(metrics(runs["0901"]), "train/decoder_weight")}
    assert w26 == {0.5}
    assert w01 == {1.0}
    # the decoder loss itself is logged in SE600M rounds, and absent in gene-space rounds
    assert column(metrics(runs["0826"]), "train/decoder_loss")
    assert not column(metrics(runs["0906"]), "train/decoder_loss")


@pytest.mark.parametrize("exp", ["0826", "0901", "0905", "0906"])
def test_frozen_rounds_keep_backbone_bit_for_bit(chain, exp):
    _, runs = chain
    child, parent = _weights(runs[exp]), _weights(runs[PARENT[exp]])
    assert child["step"] > 0
    for k, v in _backbone(child["state_dict"]).items():
        assert torch.equal(v, parent["state_dict"][k]), k
    # ... while the heads trained: the perturbation encoder moved away from the parent's weights
    assert not torch.equal(
        child["state_dict"]["pert_encoder.3.weight"], parent["state_dict"]["pert_encoder.3.weight"]
    )
    counts = column(metrics(runs[exp]), "trainable/transformer_backbone")
    assert counts and all(v == 0 for _, v in counts)


@pytest.mark.parametrize("exp", ["0907", "0908"])
def test_unfrozen_rounds_change_backbone(chain, exp):
    _, runs = chain
    child, parent = _weights(runs[exp]), _weights(runs[PARENT[exp]])
    changed = [
        k for k, v in _backbone(child["state_dict"]).items() if not torch.equal(v, parent["state_dict"][k])
    ]
    assert len(changed) > 0
    counts = column(metrics(runs[exp]), "trainable/transformer_backbone")
    assert counts and all(v > 0 for _, v in counts)


def test_encoder_switch_keeps_backbone_and_reports_reinit(chain):
    _, runs = chain
    report = json.loads((runs["0905"] / "init_report.json").read_text())
    skipped = {s["name"]: s for s in report["skipped_shape"]}
    # pretrain read X_state (16-d), 0905 reads 60 genes: new input module and head
    assert skipped["basal_encoder.0.weight"]["checkpoint_shape"] == [32, 16]
    assert skipped["basal_encoder.0.weight"]["model_shape"] == [32, 60]
    assert {"basal_encoder", "project_out", "final_down_then_up"} <= set(report["reinitialised_modules"])
    assert "transformer_backbone" not in report["reinitialised_modules"]
    assert any(k.startswith("gene_decoder.") for k in report["unexpected"])
    bb = report["by_module"]["transformer_backbone"]
    assert set(bb) == {"loaded"}
    child, parent = _weights(runs["0905"]), _weights(runs["pretrain"])
    for k, v in _backbone(child["state_dict"]).items():
        assert torch.equal(v, parent["state_dict"][k])


def test_first_lr_after_init_is_fresh_warmup_start(chain):
    _, runs = chain
    for exp in ("0826", "0907"):
        cfg = json.loads((runs[exp] / "run.json").read_text())
        lr_rows = column(metrics(runs[exp]), "lr")
        step, first = lr_rows[0]
        conf = (runs[exp] / f"{exp}_config.yaml").read_text()
        import yaml

        c = yaml.safe_load(conf)
        assert step == 0, cfg
        assert first == pytest.approx(c["optim"]["lr"] * c["sched"]["warmup_start_factor"], rel=1e-6)


def test_best_val_is_min_of_metrics_csv(chain):
    _, runs = chain
    for exp, run_dir in runs.items():
        vals = column(metrics(run_dir), "val_loss")
        assert len(vals) >= 2
        best_step, best = min(vals, key=lambda sv: sv[1])
        ck = torch.load(run_dir / "checkpoints" / "best-val.pt", map_location="cpu", weights_only=True)
        assert ck["step"] == best_step, exp
        assert ck["val_loss"] == pytest.approx(best, rel=1e-6)
        assert ck["manifest"]["gene_names"] and ck["hparams"]["cell_set_len"] == 8


def test_every_validation_logs_the_unbiased_losses_below_their_plain_forms(chain):
    """val/unbiased_loss: the monitored energy distance over distinct cells, logged beside every val_loss
    (embedding rounds: of the decoder's gene-space loss, which is their val_loss), and below it; the same for
    val/unbiased_mean_loss and val/mean_loss."""
    _, runs = chain
    for exp, run_dir in runs.items():
        rows = metrics(run_dir)
        vals, unbiased = dict(column(rows, "val_loss")), dict(column(rows, "val/unbiased_loss"))
        assert set(unbiased) == set(vals) and len(vals) >= 2, exp
        for step, v in vals.items():
            assert unbiased[step] < v, (exp, step)
            # the same scale of distance, not a different metric
            assert unbiased[step] > -0.5 * v, (exp, step)
        # the set-mean MSE less its sampling noise: below val/mean_loss at every validation
        mean, unbiased_mean = (
            dict(column(rows, "val/mean_loss")),
            dict(column(rows, "val/unbiased_mean_loss")),
        )
        assert set(unbiased_mean) == set(mean) == set(vals), exp
        assert all(unbiased_mean[s] < mean[s] for s in mean), exp


class _Crash(L.Callback):
    def __init__(self, at: int):
        self.at = at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at:
            raise RuntimeError("simulated crash")


class _Fingerprints(L.Callback):
    """What each optimizer step trained on: {global step: sums of the batch tensors}."""

    def __init__(self):
        self.seen = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        keys = ("pert_emb", "ctrl_cell_emb", "pert_cell_emb")
        self.seen[trainer.global_step] = tuple(round(float(batch[k].double().sum()), 6) for k in keys)


class _Probe(L.Callback):
    def __init__(self):
        self.start_step = None
        self.adam_steps = None

    def on_train_start(self, trainer, pl_module):
        self.start_step = trainer.global_step
        opt = trainer.optimizers[0]
        self.adam_steps = {float(s["step"]) for s in opt.state.values() if "step" in s}


def test_resume_is_explicit_and_continues(chain):
    root, _ = chain
    crash_root = root / "crash"
    cfg = compose(
        "train", train_args(crash_root, "0905", f"init_from={chain[1]['pretrain']}/checkpoints/best-val.pt")
    )
    with pytest.raises(RuntimeError, match="simulated crash"):
        tahoe_ft.train(cfg, callbacks=[_Crash(at=4)])
    # the same run, never interrupted, for the batches it trains on
    whole = _Fingerprints()
    init = f"init_from={chain[1]['pretrain']}/checkpoints/best-val.pt"
    tahoe_ft.train(compose("train", train_args(root / "whole", "0905", init)), callbacks=[whole])
    run_dir = newest_run(crash_root / "runs", "0905")
    assert json.loads((run_dir / "run.json").read_text())["status"] == "failed"
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == 3

    # run.json records what the numbers depend on beyond config and seed: code, torch and its thread count
    env = json.loads((run_dir / "run.json").read_text())["environment"]
    threads = torch.get_num_threads()
    assert env["torch_threads"] == threads and env["torch"] == torch.__version__ and "commit" in env

    # resume=true: same run dir, from step 3, with the saved Adam state; here with another thread count, which
    # run.json keeps beside the first
    probe, resumed = _Probe(), _Fingerprints()
    cfg = compose(
        "train",
        train_args(
            crash_root, "0905", f"init_from={chain[1]['pretrain']}/checkpoints/best-val.pt", "resume=true"
        ),
    )
    torch.set_num_threads(1 if threads != 1 else 2)
    try:
        out = tahoe_ft.train(cfg, callbacks=[probe, resumed])
    finally:
        torch.set_num_threads(threads)
    info = json.loads((run_dir / "run.json").read_text())
    assert info["environment"] == env and info["resumed_environment"]["torch_threads"] == (
        1 if threads != 1 else 2
    )
    # mid-epoch resume is exact: steps 3..5 train on the batches the uninterrupted run trained on
    assert sorted(resumed.seen) == [3, 4, 5]
    assert {s: whole.seen[s] for s in resumed.seen} == resumed.seen
    assert out == run_dir
    assert probe.start_step == 3
    assert probe.adam_steps == {3.0}
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "finished" and info["steps"] == 6
    steps = [s for s, _ in column(metrics(run_dir), "train/loss")]
    assert max(steps) >= 5 and min(steps) <= 2  # one CSV, extended, not truncated

    # a changed lr on resume is refused, and nothing is written
    cfg = compose(
        "train",
        train_args(
            crash_root,
            "0905",
            f"init_from={chain[1]['pretrain']}/checkpoints/best-val.pt",
            "resume=true",
            "optim.lr=1e-2",
        ),
    )
    with pytest.raises(UserError, match="optim.lr"):
        tahoe_ft.train(cfg)

    # without resume: a new run directory; every file of the old one is untouched
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    new = train(crash_root, "0905", f"init_from={chain[1]['pretrain']}/checkpoints/best-val.pt")
    assert new != run_dir and new.parent == run_dir.parent
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_freeze_until_step_unfreezes_with_warmup(tmp_path, chain):
    root, runs = chain
    run_dir = train(
        tmp_path,
        "0907",
        f"init_from={runs['0906']}/checkpoints/best-val.pt",
        "freeze.modules=[transformer_backbone]",
        "freeze.until_step=3",
        steps=6,
    )
    counts = column(metrics(run_dir), "trainable/transformer_backbone")
    assert counts[0] == (0, 0.0)
    assert any(step == 3 and v > 0 for step, v in counts)
    lr_frozen = column(metrics(run_dir), "lr/unfrozen_later")
    assert all(v == 0.0 for s, v in lr_frozen if s < 3)
    assert any(v > 0.0 for s, v in lr_frozen if s > 3)


def test_study_parent_switch_reads_weights_from_last_ckpt(tmp_path, chain):
    """0907 as the study ran it: from 0906's LAST checkpoint, weights only (fresh optimizer and schedule)."""
    root, runs = chain
    run_dir = train(
        root,
        "0907",
        "init_from=run:0906/last.ckpt",
        "trainer.max_steps=1",
        "trainer.val_check_interval=1",
        steps=1,
        val_every=1,
    )
    report = json.loads((run_dir / "init_report.json").read_text())
    assert report["source"].endswith("0906/" + runs["0906"].name + "/checkpoints/last.ckpt")
    assert report["by_module"]["transformer_backbone"] == {
        "loaded": len(_backbone(_weights(runs["0906"])["state_dict"]))
    }
    assert not report["missing"] and not report["skipped_shape"]
    lr_rows = column(metrics(run_dir), "lr")
    assert lr_rows[0][0] == 0  # a fresh schedule: step 0, not the parent's step count


def test_bf16_mixed_precision_trains(tmp_path):
    """trainer.precision=bf16-mixed (the GPU default in trainer=gpu) also runs on CPU: finite losses, fp32 weights."""
    run_dir = train(tmp_path, "pretrain", "trainer.precision=bf16-mixed")
    losses = [v for _, v in column(metrics(run_dir), "train/loss")] + [
        v for _, v in column(metrics(run_dir), "val_loss")
    ]
    assert losses and all(np.isfinite(losses))
    sd = _weights(run_dir)["state_dict"]
    assert all(v.dtype == torch.float32 for v in sd.values())


def _tiny_hparams(width: int) -> dict:
    """A one-layer ST over `width` genes (in and out), one-hot over 3 perturbations, sets of 4."""
    return {"input_dim": width, "output_dim": width, "pert_dim": 3, "hidden_dim": 8, "n_encoder_layers": 2,
            "n_decoder_layers": 2, "predict_residual": True, "output_space": "all", "embed_key": None,
            "cell_set_len": 4, "transformer_backbone_key": "llama",
            "transformer_backbone_kwargs": {"hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
                                            "head_dim": 4, "intermediate_size": 16}}  # fmt: skip


def _settings(**loss):
    """The module's settings of a TrainConfig with these loss values, one step."""
    from tahoe_ft.config import LossConfig, TrainConfig, TrainerConfig
    from tahoe_ft.training.module import TrainingSettings

    return TrainingSettings.of(TrainConfig(loss=LossConfig(**loss), trainer=TrainerConfig(max_steps=1)))


def test_loss_is_float32_under_autocast():
    from tahoe_ft.training.module import STLightningModule

    hp = _tiny_hparams(6)
    cfg = _settings(name="energy", blur=0.05, decoder_weight=1.0)
    m = STLightningModule(hp, cfg)
    a, b = torch.randn(2, 4, 6) + 100.0, torch.randn(2, 4, 6) + 100.0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = m._distance(a, b)
    assert got.dtype == torch.float32
    assert torch.allclose(got, m._distance(a, b), rtol=1e-6)


def test_no_forward_pass_holds_the_previous_steps_gradients(tmp_path):
    """The gradients are freed right after each optimizer step (`STLightningModule.optimizer_step`), so no
    forward pass holds a stale full set of them (at ST-Tahoe's size they made the run's peak); every step
    still gets its gradients and moves the weights."""
    import lightning as L

    class Grads(L.Callback):
        def __init__(self):
            self.held_at_start, self.had_before_step, self.moved = [], [], []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.held_at_start.append(any(p.grad is not None for p in pl_module.parameters()))
            self.before = [p.detach().clone() for p in pl_module.parameters()]

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.had_before_step.append(
                all(p.grad is not None for p in pl_module.parameters() if p.requires_grad)
            )

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            now = list(pl_module.parameters())
            self.moved.append(
                any(not torch.equal(a, b.detach()) for a, b in zip(self.before, now, strict=True))
            )

    cb = Grads()
    tahoe_ft.train(
        compose("train", train_args(tmp_path, "0905", "init_from=null", steps=4, val_every=4)), callbacks=[cb]
    )
    assert cb.held_at_start == [False] * 4
    assert cb.had_before_step == [True] * 4 and cb.moved == [True] * 4


def test_trains_with_dataloader_workers_like_without(tmp_path):
    """num_workers=2 (workers only read rows) trains on exactly the batches of num_workers=0, across epochs."""
    seen = {}
    for workers in (0, 2):
        fp = _Fingerprints()
        cfg = compose(
            "train",
            train_args(
                tmp_path / f"w{workers}",
                "pretrain",
                f"data.num_workers={workers}",
                "trainer.max_steps=30",
                "trainer.val_check_interval=15",
            ),
        )
        tahoe_ft.train(cfg, callbacks=[fp])
        seen[workers] = fp.seen
    assert sorted(seen[0]) == list(range(30))  # crosses epoch boundaries
    assert seen[0] == seen[2]


def test_api_trains_from_a_config_built_by_hand(tmp_path):
    """A notebook needs no Hydra: TrainConfig(...) straight into tahoe_ft.train."""
    from tahoe_ft.config import (
        BackboneConfig,
        DataConfig,
        LoggerConfig,
        ModelConfig,
        TrainConfig,
        TrainerConfig,
    )

    screen = compose(
        "train", ["+experiment=0905", f"paths.data_cache={tmp_path / 'cache'}", *TINY_DEMO]
    ).data.path
    cfg = TrainConfig(
        experiment="notebook",
        pretrained=None,
        runs_dir=str(tmp_path / "runs"),
        data=DataConfig(path=screen, test_perts=["GENE00003"], val_perts=["GENE00007"], batch_size=4),
        model=ModelConfig(
            hidden_dim=32, cell_set_len=8, backbone=BackboneConfig(head_dim=8, intermediate_size=48)
        ),
        trainer=TrainerConfig(
            max_steps=3, val_check_interval=3, enable_progress_bar=False, accelerator="cpu"
        ),
        logger=LoggerConfig(wandb=False, wandb_mode="disabled"),
    )
    run_dir = tahoe_ft.train(cfg)
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "finished" and info["steps"] == 3 and run_dir.parent.name == "notebook"
    m = _weights(run_dir)["manifest"]
    assert {g["pert"] for g in m["held_out"]} == {"GENE00003", "GENE00007"}


def test_set_mean_term_changes_the_gradient_only_when_weighted():
    from tahoe_ft.training.module import STLightningModule

    hp = _tiny_hparams(12)
    g = torch.Generator().manual_seed(0)
    batch = {"pert_emb": torch.eye(3)[torch.tensor([0, 2])][:, None].expand(2, 4, 3).contiguous(),
             "ctrl_cell_emb": torch.rand(2, 4, 12, generator=g), "pert_cell_emb": torch.rand(2, 4, 12, generator=g) + 1}  # fmt: skip

    def grads(weight, term="loss"):
        torch.manual_seed(0)
        m = STLightningModule(hp, _settings(name="energy", blur=0.05, decoder_weight=1.0, mean_weight=weight))
        losses = m._losses(batch)
        losses[term].backward()
        return losses, torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None])

    (l0, g0), (_, g_main), (l1, g1) = grads(0.0), grads(0.0, "main_loss"), grads(1.0)
    assert l0["mean_loss"] > 0 and torch.equal(l0["mean_loss"], l1["mean_loss"])  # logged either way
    assert torch.equal(g0, g_main)  # weight 0: exactly the energy distance's gradient
    assert torch.allclose(l1["loss"], l1["main_loss"] + l1["mean_loss"])
    assert not torch.allclose(g0, g1)


def test_se600m_round_can_choose_best_val_on_the_gene_space_decoder_loss(tmp_path):
    run_dir = train(tmp_path, "pretrain", "checkpoint.monitor=decoder", steps=6, val_every=2)
    rows = metrics(run_dir)
    dec = column(rows, "val/decoder_loss")
    main = column(rows, "val/main_loss")
    info = json.loads((run_dir / "run.json").read_text())
    best_step, best = min(dec, key=lambda sv: sv[1])
    assert info["best_val_loss"] == pytest.approx(best, rel=1e-6) and info["best_step"] == best_step
    assert {s for s, _ in dec} == {s for s, _ in main}  # both logged at every validation
    with pytest.raises(UserError, match="needs a gene decoder"):
        train(tmp_path, "0905", "init_from=null", "checkpoint.monitor=decoder")


def test_head_skip_follows_a_loaded_head_and_the_config_for_a_fresh_one():
    """The skip path changes what a head computes, so a head loaded from a parent keeps the parent's choice
    (an upstream checkpoint, which records none, has no skip); a re-initialised head takes model.head_skip."""
    from tahoe_ft.training.recipe import _head_skip

    dims = {"input_dim": 50, "output_dim": 50}
    upstream_same = {"input_dim": 50, "output_dim": 50}  # no head_skip key: upstream's function
    assert _head_skip(True, upstream_same, dims) is False
    assert _head_skip(True, {**upstream_same, "head_skip": True}, dims) is True
    assert _head_skip(False, {**upstream_same, "head_skip": True}, dims) is True
    embedding_parent = {"input_dim": 64, "output_dim": 64, "head_skip": False}  # 0905 from an SE600M base
    assert _head_skip(True, embedding_parent, dims) is True
    assert _head_skip(False, embedding_parent, dims) is False


def test_aux_term_changes_the_gradient_only_when_weighted_and_never_the_prediction():
    """loss.aux_weight: the aux head's energy distance to the cells' embedding is added with its weight (0: the
    gradient is exactly the rest of the loss's); the prediction is the same with or without the head."""
    from tahoe_ft.training.module import STLightningModule

    hp = {**_tiny_hparams(12), "aux_dim": 5}
    g = torch.Generator().manual_seed(0)
    batch = {"pert_emb": torch.eye(3)[torch.tensor([0, 2])][:, None].expand(2, 4, 3).contiguous(),
             "ctrl_cell_emb": torch.rand(2, 4, 12, generator=g), "pert_cell_emb": torch.rand(2, 4, 12, generator=g) + 1,
             "pert_cell_aux": torch.randn(2, 4, 5, generator=g)}  # fmt: skip

    def run(weight, term="loss", aux=True):
        torch.manual_seed(0)
        loss = _settings(name="energy", blur=0.05, decoder_weight=1.0, mean_weight=1.0, aux_weight=weight)
        m = STLightningModule({**hp, "aux_dim": 5 if aux else None}, loss)
        m.eval()
        losses = m._losses(batch)
        losses[term].backward()
        grads = {n: p.grad.clone() for n, p in m.model.named_parameters() if p.grad is not None}
        return losses, grads, m

    (l0, g0, m0), (l1, g1, _) = run(0.0), run(0.5)
    assert l0["aux_loss"] > 0 and torch.equal(l0["aux_loss"], l1["aux_loss"])  # logged either way
    assert torch.allclose(l1["loss"], l0["loss"] + 0.5 * l1["aux_loss"])
    assert all(torch.equal(g0[n], g1[n]) for n in g0 if n.startswith(("project_out", "final_down_then_up")))
    assert not torch.allclose(g0["transformer_backbone.norm.weight"], g1["transformer_backbone.norm.weight"])
    assert "aux_head.0.weight" in g1 and not g0["aux_head.0.weight"].any()
    (_, _, plain) = run(0.0, aux=False)
    same = {k: v for k, v in m0.model.state_dict().items() if not k.startswith("aux_head")}
    plain.model.load_state_dict(same)
    with torch.no_grad():
        assert torch.equal(m0.model.forward_sets(batch["pert_emb"], batch["ctrl_cell_emb"]),
                           plain.model.forward_sets(batch["pert_emb"], batch["ctrl_cell_emb"]))  # fmt: skip


def test_aux_round_learns_x_state_from_the_cells_and_export_drops_its_head(tmp_path):
    """0907aux trains in gene space with X_state as the auxiliary target: both losses logged, the head saved in
    the checkpoint (predictions stay genes-wide), export-state leaves it out; a screen without the key is one
    clear line."""
    import tahoe_ft
    from tahoe_ft.checkpoints.io import read_weights

    run_dir = train(tmp_path, "0907aux", "init_from=null", "model.head_skip=false", steps=6, val_every=3)
    rows = metrics(run_dir)
    aux = [v for _, v in column(rows, "train/aux_loss")]
    assert aux and all(math.isfinite(v) and v > 0 for v in aux)
    assert column(rows, "val/aux_loss")
    weights = read_weights(run_dir / "checkpoints" / "best-val.pt")
    state, hp = weights.state_dict, weights.hparams
    n_genes = hp["output_dim"]
    assert hp["aux_dim"] and hp["aux_dim"] < n_genes and hp["embed_key"] is None
    assert any(k.startswith("aux_head.") for k in state)
    folder = tahoe_ft.export_state(
        ExportStateConfig(ckpt=str(run_dir / "checkpoints" / "best-val.pt"), out=str(tmp_path / "exported"))
    )
    exported = torch.load(next((folder / "checkpoints").glob("*.ckpt")), weights_only=False)
    assert not any("aux_head" in k for k in exported["state_dict"])
    with pytest.raises(UserError, match=r"loss.aux_key='X_nope'.*not found"):
        train(tmp_path, "0907aux", "init_from=null", "loss.aux_key=X_nope")


def test_a_run_without_validation_perturbations_ends_in_final_pt_that_predict_reads(tmp_path):
    """Train on everything but the test knock-outs (a split whose val lists are empty): no validation loss
    exists, so run.json says null (not Infinity, which is no JSON), final.pt holds the end weights with the data
    manifest, `predict ckpt=final.pt` predicts the test groups, and the default `ckpt=best-val.pt` is refused in
    one line rather than answered with an older run's best-val.pt."""
    import re

    from tahoe_ft.config import PredictConfig
    from tahoe_ft.datasets.embedded import ensure_files
    from tahoe_ft.prediction import predict

    older = train(tmp_path, "0905", "pretrained=null")  # an earlier run with a best-val.pt
    assert (older / "checkpoints" / "best-val.pt").is_file()
    split = Path(compose("train", train_args(tmp_path, "0905")).data.split_toml)
    ensure_files(compose("train", train_args(tmp_path, "0905")).data)
    no_val = tmp_path / "no_val.toml"
    no_val.write_text(re.sub(r"(?m)^val = .*$", "val = []", split.read_text()))
    run = train(tmp_path, "0905", "pretrained=null", f"data.split_toml={no_val}")

    def no_constants(name):
        raise AssertionError(f"run.json holds {name}, which is not JSON")

    info = json.loads((run / "run.json").read_text(), parse_constant=no_constants)
    assert info["status"] == "finished" and info["steps"] == 6
    assert info["best_val_loss"] is None and info["best_step"] is None
    assert not (run / "checkpoints" / "best-val.pt").exists()
    final = torch.load(run / "checkpoints" / "final.pt", weights_only=False)
    assert final["step"] == 6 and final["val_loss"] is None and final["manifest"]["pert_names"]

    runs = tmp_path / "runs"
    with pytest.raises(UserError, match=r"no validation loss, so it has final.pt and no best-val.pt"):
        predict(PredictConfig(ckpt="best-val.pt", exp="0905", runs_dir=str(runs), device="cpu"))
    out = predict(PredictConfig(ckpt="final.pt", exp="0905", runs_dir=str(runs), device="cpu"))
    assert out == run
    record = json.loads((run / "predict.json").read_text())
    assert record["checkpoint_step"] == 6 and record["n_groups"] > 0


def test_max_steps_0_trains_nothing_and_keeps_the_starting_weights(tmp_path):
    """`trainer.max_steps=0`: Lightning runs no training hook, yet the run still ends in a checkpoint of the
    starting weights: best-val.pt at step 0 (validated), or final.pt without validation perturbations."""
    parent = train(tmp_path, "0905", "pretrained=null")
    start = torch.load(parent / "checkpoints" / "best-val.pt", weights_only=False)["state_dict"]
    run = train(tmp_path, "0906", f"init_from={parent / 'checkpoints' / 'best-val.pt'}", steps=0)
    info = json.loads((run / "run.json").read_text())
    assert info["steps"] == 0 and info["best_step"] == 0
    got = torch.load(run / "checkpoints" / "best-val.pt", weights_only=False)
    assert got["step"] == 0
    assert all(torch.equal(got["state_dict"][k], v) for k, v in start.items())
