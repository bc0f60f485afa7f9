"""Predicted sets: random draws of basal control cells, as training sets are; predict streams its blocks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tahoe_ft.config import PredictConfig
from tahoe_ft.errors import UserError
from tahoe_ft.prediction import draw_basal


def _config(ckpt, out, **kw) -> PredictConfig:
    """predict's typed config: the checkpoint file `ckpt`, the predictions into `out`."""
    return PredictConfig(ckpt=str(ckpt), run_dir=str(out), **kw)


def test_basal_sets_mix_replicates_of_a_file_stored_by_replicate():
    # a control pool stored sorted by replicate: rows 0-299 replicate 0, 300-599 replicate 1
    pool = np.arange(600)
    replicate = pool // 300
    rows = draw_basal(np.random.default_rng(0), pool, 256)
    sets = rows.reshape(-1, 32)  # cell_set_len 32, in the order predict reads and cuts them
    mixed = [len(set(replicate[s])) == 2 for s in sets]
    assert all(mixed)  # a sorted draw would give sets of one replicate each
    assert np.unique(rows).size == rows.size  # without replacement while the pool is large enough
    assert not np.array_equal(rows, np.sort(rows))


def test_basal_draws_repeat_cells_only_when_the_pool_is_smaller():
    rows = draw_basal(np.random.default_rng(0), np.arange(10), 25)
    assert rows.size == 25 and set(rows) <= set(range(10))


# -- streamed prediction == the in-memory path it replaced -------------------------------------------------


def _in_memory_reference(ckpt, out, shuffle, recentre=False):
    """predict as it was before streaming (tahoe-ft 9d4247b): every block predicted set by set with
    `predict_sets`, the matrices concatenated and stacked in memory, then written with `write_h5ad`.
    `recentre`: each group's basal cells moved so that their mean is the whole control pool's mean."""
    import anndata as ad
    import pandas as pd

    from tahoe_ft.checkpoints.io import load_checkpoint
    from tahoe_ft.data import CellCatalog, Manifest
    from tahoe_ft.evaluation.diagnostics import derangement
    from tahoe_ft.prediction import PRED_MAX, predict_sets
    from tahoe_ft.prediction.plan import _prediction_order

    loaded = load_checkpoint(ckpt)
    model = loaded.model
    m = Manifest.from_dict(loaded.manifest)
    dev = torch.device("cpu")
    catalog = CellCatalog.from_manifest(m)
    cells = catalog.groups("test")
    groups = _prediction_order(cells)
    pert_index = {p: i for i, p in enumerate(m.pert_names)}
    rng = np.random.default_rng(0)
    real_rows, labels, basal_rows = [], [], []
    for key in groups:
        rows = cells[key]
        basal_rows.append(draw_basal(rng, catalog.controls(key.dataset, key.cell_type), rows.size))
        real_rows.append(rows)
        labels += [(key.pert, key.cell_type)] * rows.size
    real_x = catalog.read_expression(np.concatenate(real_rows))
    ctrl_rows, ctrl_labels = [], []
    for ct, ds in sorted({(k.cell_type, k.dataset) for k in groups}):
        pool = catalog.controls(ds, ct)
        pick = np.sort(rng.choice(pool, size=min(pool.size, 2000), replace=False))
        ctrl_rows.append(pick)
        ctrl_labels += [(m.control_pert, ct)] * pick.size
    ctrl_x = catalog.read_expression(np.concatenate(ctrl_rows))
    pred_blocks = []
    for key, rows in zip(groups, basal_rows, strict=True):
        basal = catalog.read_input(rows)
        if recentre:  # on the mean of the control cells written into the files
            written = np.intersect1d(np.concatenate(ctrl_rows), catalog.controls(key.dataset, key.cell_type))
            basal = basal - basal.mean(axis=0) + catalog.read_input(written).mean(axis=0)
        ct = m.cell_types.index(key.cell_type) if model.feature_prior is not None else None
        pred_blocks.append(predict_sets(model, m.pert_matrix[pert_index[key.pert]], basal, dev, cell_type=ct))
    pred_x = np.clip(np.concatenate(pred_blocks).astype(np.float32), 0.0, PRED_MAX)
    obs = pd.DataFrame(labels + ctrl_labels, columns=[m.pert_col, m.cell_type_col])
    obs.index = [f"cell{i}" for i in range(len(obs))]
    obs = obs.astype("category")
    var = pd.DataFrame(index=pd.Index(m.gene_names))
    files = {
        "pred.h5ad": ad.AnnData(np.vstack([pred_x, ctrl_x]), obs=obs.copy(), var=var.copy()),
        "real.h5ad": ad.AnnData(np.vstack([real_x, ctrl_x]), obs=obs.copy(), var=var.copy()),
    }
    derange = derangement(sorted({k.pert for k in groups})) if shuffle else {}
    if derange:
        blocks = [
            predict_sets(
                model,
                m.pert_matrix[pert_index[derange[k.pert]]],
                catalog.read_input(rows),
                dev,
                cell_type=m.cell_types.index(k.cell_type) if model.feature_prior is not None else None,
            )
            for k, rows in zip(groups, basal_rows, strict=True)
        ]
        x = np.clip(np.concatenate(blocks).astype(np.float32), 0.0, PRED_MAX)
        files["pred_shuffled.h5ad"] = ad.AnnData(np.vstack([x, ctrl_x]), obs=obs.copy(), var=var.copy())
    for name, a in files.items():
        a.write_h5ad(out / name)
    return files


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """A raw-expression round and an embedding round (X_state in, gene decoder out), 2 steps each."""
    from conftest_train import train

    root = tmp_path_factory.mktemp("predict")
    return {exp: train(root, exp, "init_from=null", steps=2, val_every=2) for exp in ("0905", "0901")}


@pytest.mark.parametrize("exp", ["0905", "0901"])
def test_streamed_predict_equals_the_in_memory_path_and_reads_in_blocks(
    tiny_runs, tmp_path, monkeypatch, exp
):
    """Blocks of 2 sets (sets of 8), group tails read together across groups: every file equals, value for
    value, what the in-memory path wrote; no read asks for more than a block of cells."""
    import anndata as ad

    import tahoe_ft.prediction as prediction
    import tahoe_ft.prediction.plan as plan
    from tahoe_ft.data import CellCatalog

    monkeypatch.setattr(plan, "BLOCK_CELLS", 16)
    biggest = []
    for name in ("read_input", "read_expression"):
        orig = getattr(CellCatalog, name)

        def spy(self, rows, _orig=orig):
            biggest.append(len(rows))
            return _orig(self, rows)

        monkeypatch.setattr(CellCatalog, name, spy)
    ckpt = tiny_runs[exp] / "checkpoints" / "best-val.pt"
    out = prediction.predict(
        _config(ckpt, tmp_path / "streamed", device="cpu", shuffle=True, recentre_basal=False)
    )
    assert max(biggest) <= 16
    monkeypatch.undo()
    (tmp_path / "ref").mkdir()
    want = _in_memory_reference(ckpt, tmp_path / "ref", shuffle=True)
    assert set(want) == {"pred.h5ad", "real.h5ad", "pred_shuffled.h5ad"}
    for name, ref in want.items():
        got = ad.read_h5ad(out / name)
        assert got.X.dtype == np.float32 and not got.obs.empty
        np.testing.assert_array_equal(got.X, ref.X, err_msg=name)
        assert got.obs.equals(ref.obs) and list(got.var_names) == list(ref.var_names)
        read_back = ad.read_h5ad(tmp_path / "ref" / name)  # anndata reads both files alike
        assert type(read_back.X) is type(got.X) and read_back.obs.equals(got.obs)
    # several sets per forward pass: the same predictions up to float32 rounding (BLAS summation order)
    fast = prediction.predict(
        _config(ckpt, tmp_path / "fast", device="cpu", shuffle=False, sets_per_pass=3, recentre_basal=False)
    )
    np.testing.assert_allclose(ad.read_h5ad(fast / "pred.h5ad").X, want["pred.h5ad"].X, rtol=0, atol=1e-5)
    # bfloat16 autocast: the same cells, predictions close to float32 (bf16 keeps 8 bits of mantissa), not equal
    half = prediction.predict(
        _config(ckpt, tmp_path / "bf16", device="cpu", shuffle=False, precision="bf16", recentre_basal=False)
    )
    got = ad.read_h5ad(half / "pred.h5ad").X
    ref = want["pred.h5ad"].X
    assert got.shape == ref.shape and not np.array_equal(got, ref)
    assert np.abs(got - ref).max() < 0.05 * max(1.0, float(np.abs(ref).max()))
    with pytest.raises(UserError, match="precision='fp8'"):
        prediction.predict(_config(ckpt, tmp_path / "bad", device="cpu", precision="fp8"))


@pytest.mark.parametrize("exp", ["0905", "0901"])
def test_recentred_predict_moves_each_groups_basal_mean_onto_the_control_mean(tiny_runs, tmp_path, exp):
    """recentre_basal (the default): each group's basal draws keep their deviations and take the control
    pool's mean before the model sees them (the in-memory path, re-centred by hand); predict.json says so."""
    import anndata as ad

    import tahoe_ft.prediction as prediction
    from tahoe_ft.runs import PredictRecord

    ckpt = tiny_runs[exp] / "checkpoints" / "best-val.pt"
    out = prediction.predict(_config(ckpt, tmp_path / "on", device="cpu", shuffle=False))
    (tmp_path / "ref").mkdir()
    want = _in_memory_reference(ckpt, tmp_path / "ref", shuffle=False, recentre=True)
    got = ad.read_h5ad(out / "pred.h5ad").X
    np.testing.assert_allclose(got, want["pred.h5ad"].X, rtol=0, atol=1e-5)
    raw = _in_memory_reference(ckpt, tmp_path / "ref", shuffle=False, recentre=False)["pred.h5ad"].X
    assert np.abs(got - raw).max() > 1e-3  # the raw draws give other predictions
    assert PredictRecord.read(out).recentre_basal is True


def test_basal_shifts_put_each_groups_draw_mean_on_the_written_controls_mean(tiny_runs):
    from tahoe_ft.checkpoints.io import load_checkpoint
    from tahoe_ft.prediction.plan import basal_shifts, build_plan

    ckpt = tiny_runs["0905"] / "checkpoints" / "best-val.pt"
    loaded = load_checkpoint(ckpt)
    plan = build_plan(loaded, ckpt, ckpt.parent, PredictConfig(ckpt=str(ckpt), device="cpu"))
    shifts = basal_shifts(plan)
    assert shifts.shape == (len(plan.groups), plan.catalog.input_dim) and shifts.dtype == np.float32
    for g, (key, rows) in enumerate(zip(plan.groups, plan.basal_rows, strict=True)):
        raw = plan.catalog.read_input(rows).astype(np.float64)
        moved = raw + shifts[g]
        written = np.intersect1d(plan.ctrl_rows, plan.catalog.controls(key.dataset, key.cell_type))
        pool = plan.catalog.read_input(written).astype(np.float64)
        np.testing.assert_allclose(moved.mean(axis=0), pool.mean(axis=0), atol=1e-5)
        np.testing.assert_allclose(moved - moved.mean(axis=0), raw - raw.mean(axis=0), atol=1e-5)


def test_basal_shifts_read_each_control_cell_once(tiny_runs, monkeypatch):
    """The draws of a cell type repeat its control cells: each distinct row is read once for all its groups."""
    from tahoe_ft.checkpoints.io import load_checkpoint
    from tahoe_ft.prediction.plan import basal_shifts, build_plan

    ckpt = tiny_runs["0905"] / "checkpoints" / "best-val.pt"
    plan = build_plan(load_checkpoint(ckpt), ckpt, ckpt.parent, PredictConfig(ckpt=str(ckpt), device="cpu"))
    read: list[np.ndarray] = []
    original = plan.catalog.read_input
    monkeypatch.setattr(plan.catalog, "read_input", lambda rows: read.append(rows.copy()) or original(rows))
    basal_shifts(plan)
    got = np.concatenate(read)
    draws = np.concatenate(plan.basal_rows)
    assert draws.size > np.unique(draws).size  # the fixture's draws do repeat cells
    pools = {(k.dataset, k.cell_type) for k in plan.groups}
    written = np.concatenate([np.intersect1d(plan.ctrl_rows, plan.catalog.controls(*p)) for p in pools])
    want = np.unique(np.concatenate([draws, written]))
    assert np.array_equal(np.sort(got), want)  # every needed row, none twice


def test_prepacked_bf16_linears_give_the_numbers_of_bf16_nn_linear(tiny_runs):
    """predict precision=bf16 on a CPU with oneDNN's bf16 kernels prepacks every Linear weight once; each
    pass must give exactly what bf16 nn.Linear layers under autocast give (the path it replaced)."""
    import copy

    import tahoe_ft.prediction.forward as prediction
    from tahoe_ft.checkpoints.io import load_checkpoint

    cpu = torch.device("cpu")
    if not prediction._packs_bf16(cpu):
        pytest.skip("this CPU has no oneDNN bf16 kernels: predict keeps bf16 nn.Linear layers")
    model = load_checkpoint(tiny_runs["0905"] / "checkpoints" / "best-val.pt").model
    plain = copy.deepcopy(model)
    for mod in plain.modules():
        if isinstance(mod, torch.nn.Linear):
            mod.to(torch.bfloat16)
    packed = copy.deepcopy(model)
    prediction._bf16_linears(packed, cpu, rows=2 * int(model.hparams["cell_set_len"]))
    assert not any(isinstance(m, torch.nn.Linear) for m in packed.modules())
    assert sum(isinstance(m, prediction._PackedLinear) for m in packed.modules()) == sum(
        isinstance(m, torch.nn.Linear) for m in plain.modules()
    )
    g = torch.Generator().manual_seed(0)
    for n_sets, n_cells in [(2, int(model.hparams["cell_set_len"])), (1, 5)]:  # the hinted height, and not
        basal = torch.rand(n_sets, n_cells, model.input_dim, generator=g).numpy()
        pert = torch.eye(model.pert_dim)[:n_sets]
        ct = torch.zeros(
            n_sets, dtype=torch.int64
        )  # the sets' cell type (the model's feature prior reads it)
        want = prediction.predict_batch(plain, pert, basal, cpu, "bf16", cell_type=ct)
        got = prediction.predict_batch(packed, pert, basal, cpu, "bf16", cell_type=ct)
        np.testing.assert_array_equal(got, want)
        full = prediction.predict_batch(model, pert, basal, cpu, "32", cell_type=ct)
        assert 0 < np.abs(got - full).max() < 0.05 * max(1.0, float(np.abs(full).max()))


def test_a_failing_write_stops_predict_and_leaves_the_previous_files(tiny_runs, tmp_path, monkeypatch):
    """A write that fails on predict's writer thread (here: the third predicted block, as a full disk would)
    stops the command with that error; the files of the previous predict stay as they were, and no
    temp file is left."""
    import tahoe_ft.prediction as prediction
    import tahoe_ft.prediction.plan as plan
    import tahoe_ft.prediction.stream as stream

    monkeypatch.setattr(plan, "BLOCK_CELLS", 16)
    ckpt = tiny_runs["0905"] / "checkpoints" / "best-val.pt"
    out = tmp_path / "out"
    prediction.predict(_config(ckpt, out, device="cpu", shuffle=False))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert {"pred.h5ad", "real.h5ad", "predict.json"} <= set(before)
    calls = []
    write = stream._clip_and_write

    def failing(*args):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return write(*args)

    monkeypatch.setattr(stream, "_clip_and_write", failing)
    with pytest.raises(OSError, match="No space left"):
        prediction.predict(_config(ckpt, out, device="cpu", shuffle=False, seed=1))
    assert len(calls) == 3  # stopped at the failed block, not after predicting everything
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_model_with_a_batch_encoder_predicts_with_each_basal_cells_batch(tmp_path):
    import anndata as ad

    import tahoe_ft
    from conftest_train import train

    run = train(tmp_path, "0906", "init_from=null", "model.batch_encoder=true", "data.batch_col=batch",
                "model.head_skip=false", steps=2,
                val_every=2)  # fmt: skip
    ckpt = torch.load(run / "checkpoints" / "best-val.pt", map_location="cpu", weights_only=False)
    assert ckpt["hparams"]["batch_encoder"] and ckpt["hparams"]["batch_dim"] == 2
    first = ad.read_h5ad(tahoe_ft.predict(_config("best-val.pt", run, shuffle=False)) / "pred.h5ad").X.copy()
    # the batch matters (no head skip: a fresh skip head barely passes the hidden state on after 2 steps):
    # give the two batches very different embeddings and the prediction changes
    w = ckpt["state_dict"]["batch_encoder.weight"]
    ckpt["state_dict"]["batch_encoder.weight"] = torch.stack([w[0] + 5.0, w[1] - 5.0])
    torch.save(ckpt, run / "checkpoints" / "batches.pt")
    second = ad.read_h5ad(tahoe_ft.predict(_config("batches.pt", run, shuffle=False)) / "pred.h5ad").X
    n_pred = int((ad.read_h5ad(run / "pred.h5ad", backed="r").obs["target_gene"] != "non-targeting").sum())
    assert first.shape == second.shape
    assert np.abs(first[:n_pred] - second[:n_pred]).max() > 1e-3


def test_loading_a_checkpoint_draws_no_random_fills_and_keeps_the_files_weights(tiny_runs):
    """load_checkpoint builds the model without torch.nn.init's random fills (every parameter is replaced by
    the file's tensor): torch's random stream is where it was, every weight is the file's, and torch.nn.init
    is itself again afterwards."""
    from tahoe_ft.checkpoints.io import load_checkpoint, read_weights

    ckpt = tiny_runs["0905"] / "checkpoints" / "best-val.pt"
    fills = (torch.nn.init.kaiming_uniform_, torch.nn.init.uniform_, torch.nn.init.normal_)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    model = load_checkpoint(ckpt).model
    assert torch.equal(torch.get_rng_state(), before)  # the fills would have drawn from it
    state = read_weights(ckpt).state_dict
    own = model.state_dict()
    compared = [k for k in own if k in state]
    assert len(compared) == len(own)
    for k in compared:
        assert torch.equal(own[k], state[k].to(own[k].dtype)), k
    assert (torch.nn.init.kaiming_uniform_, torch.nn.init.uniform_, torch.nn.init.normal_) == fills
    layer = torch.nn.Linear(64, 64)  # a layer built afterwards is filled as usual
    assert layer.weight.abs().max() > 0 and not torch.equal(torch.get_rng_state(), before)


def _in_brk_heap(address: int) -> bool:
    with open("/proc/self/maps") as f:
        for line in f:
            if line.rstrip().endswith("[heap]"):
                lo, hi = (int(v, 16) for v in line.split()[0].split("-"))
                if lo <= address < hi:
                    return True
    return False


def test_large_buffers_come_from_the_reused_heap_only_while_predict_runs():
    """Inside predict, a 64 MiB buffer comes from glibc's heap (reused pass after pass) rather than a fresh
    mmap the kernel must zero; afterwards glibc is back to its defaults and maps such a buffer again."""
    import platform

    from tahoe_ft.prediction.stream import _reuse_large_blocks

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc's mallopt only")
    n = 16 << 20  # float32 elements: 64 MiB, above glibc's largest mmap threshold (32 MiB)
    with _reuse_large_blocks():
        inside = np.ones(n, dtype=np.float32)
        assert _in_brk_heap(inside.ctypes.data)
        del inside
    after = np.ones(n, dtype=np.float32)
    assert not _in_brk_heap(after.ctypes.data)


@pytest.mark.parametrize("content", [b"hello\nworld\n", bytes(range(256)) * 3], ids=["text", "bytes"])
def test_predict_from_a_file_that_is_not_a_checkpoint_is_one_line(tmp_path, capsys, monkeypatch, content):
    """`tahoe-ft predict ckpt=<not a checkpoint>`: exit 2 with one line naming the file, no traceback
    (torch's weights-only reader raises e.g. KeyError on a text file)."""
    from tahoe_ft import cli

    monkeypatch.delenv("TAHOE_FT_DEBUG", raising=False)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    path = tmp_path / "run" / "checkpoints" / "notes.pt"
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["predict", f"ckpt={path}", "device=cpu"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("error: ") and str(path) in err and "not a torch file" in err
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoints"]  # nothing written


# -- nothing lost (issue #31): predict never overwrites what another checkpoint made -------------------------


def _files(folder) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_predict_refuses_another_runs_checkpoint_and_redoing_a_run_retires_its_stale_outputs(
    tiny_runs, tmp_path
):
    import shutil

    from tahoe_ft import prediction
    from tahoe_ft.runs import PredictRecord

    run = tmp_path / "A"
    shutil.copytree(tiny_runs["0905"], run)
    own = run / "checkpoints" / "best-val.pt"
    prediction.predict(_config(own, run, device="cpu", shuffle=True))
    (run / "eval").mkdir()
    (run / "eval" / "score.json").write_text('{"avg_score": 0.5}\n')
    before = _files(run)
    assert {"pred.h5ad", "real.h5ad", "pred_shuffled.h5ad", "predict.json", "eval/score.json"} <= set(before)
    # another run's checkpoint into run A (what replaced A's prediction and left its eval/ beside it)
    other = tiny_runs["0901"] / "checkpoints" / "best-val.pt"
    with pytest.raises(UserError, match=r"ckpt=.*best-val.pt is not a checkpoint of run_dir=.*A \(") as err:
        prediction.predict(_config(other, run, device="cpu"))
    assert "\n" not in str(err.value) and "run_dir=<a new folder>" in str(err.value)
    assert _files(run) == before
    # the run's own checkpoint redoes its prediction: the shuffle and the scores of the old one are retired
    prediction.predict(_config(own, run, device="cpu", shuffle=False, seed=1))
    after = _files(run)
    assert after["pred.h5ad"] != before["pred.h5ad"] and PredictRecord.read(run).seed == 1
    assert "pred_shuffled.h5ad" not in after and "eval/score.json" not in after
    assert after["eval.superseded/score.json"] == before["eval/score.json"]


def test_predict_into_a_folder_refuses_to_replace_another_checkpoints_prediction(tiny_runs, tmp_path):
    from tahoe_ft import prediction

    out = tmp_path / "p"
    first = tiny_runs["0905"] / "checkpoints" / "best-val.pt"
    prediction.predict(_config(first, out, device="cpu", shuffle=False))
    before = _files(out)
    with pytest.raises(UserError, match=r"run_dir=.*p already holds a prediction of .*0905.*best-val.pt"):
        prediction.predict(_config(tiny_runs["0901"] / "checkpoints" / "best-val.pt", out, device="cpu"))
    assert _files(out) == before
    prediction.predict(_config(first, out, device="cpu", shuffle=False, seed=3))  # the same checkpoint again
    assert _files(out)["pred.h5ad"] != before["pred.h5ad"]
