"""Training speed at the VCC's size (18,080 genes): upstream `state tx train` vs `tahoe-ft train`, in one run.

One synthetic VCC-style screen (CSR h5ad, 18,080 genes, density 0.1, cells sorted by cell type and
perturbation so that upstream's consecutive loading accepts it) and one model: ST with Llama 2 layers x hidden
128, 4 heads x 32, FFN 512, 4-layer MLPs, sets of 64 cells, 4 sets per step (256 cells), raw expression in and
out through `final_down_then_up` (87 M parameters; upstream's untrained gene decoder is switched off with
`gene_decoder_bool=false`, so both sides hold the same weights). Every command runs under the same outside
timer:

  (a) upstream `state tx train`, its default loader (cell-load, 2 workers on this 2-core box)
  (b) upstream at its best setting: `data.kwargs.use_consecutive_loading=true data.kwargs.num_workers=0`
  (c) `tahoe-ft train data=custom ...` with its defaults (data=custom: 0 workers, chosen by this benchmark)
  (d) the same with `data.num_workers=0`
  (f) the same with `trainer.precision=bf16-mixed` (upstream's CLI calls
      torch.set_float32_matmul_precision("medium"), which on a CPU with AMX runs its fp32 matmuls in bf16;
      this is tahoe-ft's way to lower the precision)

and then (e), the model-only step in this process: forward + energy loss + backward + AdamW on batches made in
memory beforehand, for upstream's module and for tahoe-ft's, same weights, the variants interleaved (tahoe-ft
before and after its energy-loss and fused-AdamW changes, and the energy loss alone before and after).

Per-step time is the median interval between train-batch ends, dropping every interval that holds a
validation or a checkpoint save; beside it the CPU time (user + sys of the process tree) over the same
intervals, which a busy machine inflates less than wall time. `--repeat 2` runs the commands twice, the second
round in reverse order, and pools the intervals. Neither CLI can add a callback from its options, so the same
small Lightning callback is put into both processes through a `sitecustomize` on PYTHONPATH (it appends to
`Trainer(callbacks=...)` and writes a timestamp per event; nothing else changes). Memory is the peak of the
summed PSS of the command's process tree (psutil, sampled every 0.5 s). Ratios are to upstream's best (b) of
the same run, and for (e) to upstream's module step at fp32.

    .venv/bin/python scripts/bench_vcc_train.py --quick     # 3,000 cells, 12 steps: ~12 min on 2 shared cores
    .venv/bin/python scripts/bench_vcc_train.py --quick --repeat 2 --profile   # BENCHMARKS.md's, ~25 min
    .venv/bin/python scripts/bench_vcc_train.py             # 20,000 cells, 40 steps (the issue's run)

Needs the [parity] extra (arc-state 0.11.1, cell-load 0.10.4) in the same venv as tahoe-ft.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

VENV_BIN = Path(sys.executable).parent
GENES = 18080
DENSITY = 0.1
HIDDEN, LAYERS, HEADS, HEAD_DIM, FFN, MLP_LAYERS = 128, 2, 4, 32, 512, 4
SET_LEN, SETS_PER_STEP = 64, 4
CELL_TYPES = ("CT0", "CT1")
# ~100 cells per (cell type, perturbation) at 3,000 cells, so that sets of 64 fit in every group
CELLS_PER_GROUP = 100
MAX_PERTS = 40
DATASET = "vcc_synth"

# The step clock: one Lightning callback appended to every Trainer, timestamps to $BENCH_STEP_LOG.
STEP_HOOK = """
import os
if os.environ.get("BENCH_STEP_LOG"):
    import time
    import lightning.pytorch as _pl
    import psutil

    def _tree_cpu():
        me = psutil.Process()
        total = 0.0
        for p in [me, *me.children(recursive=True)]:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        return total

    class _StepClock(_pl.Callback):
        def _mark(self, what, trainer):
            with open(os.environ["BENCH_STEP_LOG"], "a") as fh:
                fh.write(f"{time.time():.6f} {_tree_cpu():.4f} {what} {trainer.global_step}\\n")

        def on_train_batch_end(self, trainer, *args):
            self._mark("end", trainer)

        def on_validation_start(self, trainer, *args):
            self._mark("val_start", trainer)

        def on_validation_end(self, trainer, *args):
            self._mark("val_end", trainer)

        def on_save_checkpoint(self, trainer, *args):
            self._mark("ckpt", trainer)

    _init = _pl.Trainer.__init__

    def _patched(self, *args, callbacks=None, **kwargs):
        cbs = [callbacks] if isinstance(callbacks, _pl.Callback) else list(callbacks or [])
        _init(self, *args, callbacks=[*cbs, _StepClock()], **kwargs)

    _pl.Trainer.__init__ = _patched
"""


# ------------------------------------------------------------------------------------------------------------
# the screen


def n_screen_perts(n_cells: int) -> int:
    """40 perturbations at 20,000 cells (200 cells per group), 12 at 3,000 (100 per group)."""
    return int(np.clip(n_cells * 0.8 / len(CELL_TYPES) / CELLS_PER_GROUP, 12, MAX_PERTS))


def write_screen(out: Path, n_cells: int, n_genes: int, seed: int = 0) -> tuple[Path, Path]:
    """A CSR h5ad (log1p values, density 0.1) and its cell-load split TOML; cells sorted by (cell type,
    perturbation)."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    n_perts = n_screen_perts(n_cells)
    perts = ["non-targeting"] + [f"G{i:05d}" for i in range(n_perts)]
    share = np.r_[0.2, np.full(n_perts, 0.8 / n_perts)]  # a fifth of the cells are controls
    per_ct = rng.multinomial(n_cells // len(CELL_TYPES), share)
    ct_idx = np.concatenate([np.full(per_ct.sum(), c) for c in range(len(CELL_TYPES))])
    pert_idx = np.concatenate([np.repeat(np.arange(len(perts)), per_ct) for _ in CELL_TYPES])
    n = ct_idx.size
    gene_mean = rng.gamma(1.0, 2.0, n_genes).astype(np.float32)
    effect = rng.normal(0.0, 0.5, (len(perts), n_genes)).astype(np.float32)  # log fold changes
    effect[0] = 0.0  # controls
    blocks = []
    for r0 in range(0, n, 1000):
        r1 = min(r0 + 1000, n)
        mask = rng.random((r1 - r0, n_genes), dtype=np.float32) < DENSITY
        rows, cols = np.nonzero(mask)
        lam = gene_mean[cols] * np.exp(effect[pert_idx[r0 + rows], cols])
        vals = np.log1p(1.0 + rng.poisson(lam)).astype(np.float32)
        blocks.append(sp.csr_matrix((vals, (rows, cols)), shape=(r1 - r0, n_genes), dtype=np.float32))
    x = sp.vstack(blocks, format="csr")
    obs = pd.DataFrame(
        {
            "target_gene": pd.Categorical.from_codes(pert_idx, categories=perts),
            "cell_type": pd.Categorical.from_codes(ct_idx, categories=list(CELL_TYPES)),
            "batch": pd.Categorical.from_codes(rng.integers(0, 2, n), categories=["b0", "b1"]),
        },
        index=pd.Index([f"cell{i:07d}" for i in range(n)]),
    )
    for col in ("target_gene", "cell_type", "batch"):
        obs[col] = obs[col].cat.reorder_categories(sorted(obs[col].cat.categories))
    genes = [f"G{i:05d}" for i in range(n_genes)]
    h5 = out / "screen.h5ad"
    ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=pd.Index(genes))).write_h5ad(h5)
    k = max(2, n_perts // 10)  # held-out perturbations each for val and test
    val, test = perts[1 : 1 + k], perts[1 + k : 1 + 2 * k]
    lines = ["[datasets]", f"{DATASET} = {json.dumps(str(h5))}", "", "[training]", f'{DATASET} = "train"', ""]
    for ct in CELL_TYPES:
        lines += [f'[fewshot."{DATASET}.{ct}"]', f"val = {json.dumps(val)}", f"test = {json.dumps(test)}", ""]
    toml = out / "split.toml"
    toml.write_text("\n".join(lines))
    return h5, toml


# ------------------------------------------------------------------------------------------------------------
# the CLI runs


def upstream_cmd(toml: Path, out: Path, name: str, steps: int, val_every: int, extra: list[str]) -> list[str]:
    return [
        str(VENV_BIN / "state"), "tx", "train",
        f"data.kwargs.toml_config_path={toml}", "data.kwargs.embed_key=null", "data.kwargs.output_space=all",
        "data.kwargs.pert_col=target_gene", "data.kwargs.cell_type_key=cell_type",
        "data.kwargs.control_pert=non-targeting", "data.kwargs.batch_col=batch",
        f"training.max_steps={steps}", f"training.val_freq={val_every}", f"training.batch_size={SETS_PER_STEP}",
        f"training.ckpt_every_n_steps={val_every}", "model=state", f"model.kwargs.cell_set_len={SET_LEN}",
        f"model.kwargs.hidden_dim={HIDDEN}", f"model.kwargs.n_encoder_layers={MLP_LAYERS}",
        f"model.kwargs.n_decoder_layers={MLP_LAYERS}", "+model.kwargs.gene_decoder_bool=false",
        f"model.kwargs.transformer_backbone_kwargs.hidden_size={HIDDEN}",
        f"model.kwargs.transformer_backbone_kwargs.num_hidden_layers={LAYERS}",
        f"model.kwargs.transformer_backbone_kwargs.num_attention_heads={HEADS}",
        f"model.kwargs.transformer_backbone_kwargs.num_key_value_heads={HEADS}",
        f"model.kwargs.transformer_backbone_kwargs.head_dim={HEAD_DIM}",
        f"model.kwargs.transformer_backbone_kwargs.intermediate_size={FFN}",
        "use_wandb=false", f"output_dir={out}", f"name={name}", *extra,
    ]  # fmt: skip


def tahoe_cmd(h5: Path, toml: Path, out: Path, steps: int, val_every: int, extra: list[str]) -> list[str]:
    return [
        str(VENV_BIN / "tahoe-ft"), "train", "data=custom", f"data.path={h5}", f"data.split_toml={toml}",
        "data.batch_col=batch", "pretrained=null", f"runs_dir={out}", "logger=csv",
        "trainer.enable_progress_bar=false", f"trainer.max_steps={steps}", f"trainer.val_check_interval={val_every}",
        f"data.batch_size={SETS_PER_STEP}", f"model.cell_set_len={SET_LEN}", f"model.hidden_dim={HIDDEN}",
        f"model.n_encoder_layers={MLP_LAYERS}", f"model.n_decoder_layers={MLP_LAYERS}",
        f"model.backbone.num_hidden_layers={LAYERS}", f"model.backbone.num_attention_heads={HEADS}",
        f"model.backbone.num_key_value_heads={HEADS}", f"model.backbone.head_dim={HEAD_DIM}",
        f"model.backbone.intermediate_size={FFN}", *extra,
    ]  # fmt: skip


def _tree_pss(root) -> int:
    import psutil

    total = 0
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    for p in procs:
        try:
            total += p.memory_full_info().pss
        except psutil.Error:
            pass
    return total


def run_measured(cmd: list[str], log: Path, hook_dir: Path, timeout: float) -> dict:
    """Run `cmd`; wall time, peak summed PSS of its process tree, and the median step from the step clock."""
    import psutil

    events = log.with_suffix(".steps")
    env = dict(os.environ, BENCH_STEP_LOG=str(events), PYTHONPATH=str(hook_dir), WANDB_MODE="disabled")
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=log.parent)
        root, peak, stop = psutil.Process(proc.pid), [0], threading.Event()

        def sample() -> None:
            while not stop.wait(0.5):
                peak[0] = max(peak[0], _tree_pss(root))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        stop.set()
        sampler.join()
    wall = time.perf_counter() - t0
    if rc != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"{' '.join(cmd[:3])} failed (rc {rc}); log {log}:\n{tail}")
    steps, cpu = step_intervals(events)
    return {"step_s": steps, "step_cpu_s": cpu, "pss_gb": peak[0] / 1e9, "wall_s": wall}


def pooled(runs: list[dict]) -> dict:
    """One row from repeated runs of a command: medians over all their clean step intervals, the highest peak
    PSS, the median whole-command wall time."""
    return {
        "s_per_step": statistics.median(x for r in runs for x in r["step_s"]),
        "cpu_s_per_step": statistics.median(x for r in runs for x in r["step_cpu_s"]),
        "n_intervals": sum(len(r["step_s"]) for r in runs),
        "per_run_s_per_step": [statistics.median(r["step_s"]) for r in runs],
        "pss_gb": max(r["pss_gb"] for r in runs),
        "wall_s": statistics.median(r["wall_s"] for r in runs),
        "runs": runs,
    }


def step_intervals(events: Path) -> tuple[list[float], list[float]]:
    """Wall and CPU (process tree, user + sys) intervals between train-batch ends with no validation or
    checkpoint event in between."""
    wall, cpu, last, clean = [], [], None, True
    for line in events.read_text().splitlines():
        t, c, what, _ = line.split()
        if what != "end":
            clean = False
            continue
        if last is not None and clean:
            wall.append(float(t) - last[0])
            cpu.append(float(c) - last[1])
        last, clean = (float(t), float(c)), True
    if not wall:
        raise RuntimeError(f"no clean step intervals in {events}")
    return wall, cpu


# ------------------------------------------------------------------------------------------------------------
# the model-only step


def energy_geomloss_formula(x, y):
    """The energy distance exactly as tahoe-ft computed it before (geomloss's formula, term by term): the
    "before" of the model-only comparison."""
    import torch

    def double_grad(t):
        return t + (t - t.detach())

    def dist(a, b):
        sq = (
            (a * a).sum(-1).unsqueeze(2)
            - 2 * torch.matmul(a, b.permute(0, 2, 1))
            + (b * b).sum(-1).unsqueeze(1)
        )
        return torch.sqrt(torch.clamp_min(sq, 1e-8))

    B, N, M = x.shape[0], x.shape[1], y.shape[1]
    a = torch.full((B, N), 1.0 / N, dtype=x.dtype)
    b = torch.full((B, M), 1.0 / M, dtype=y.dtype)
    k_xx = -dist(double_grad(x), x.detach())
    k_yy = -dist(double_grad(y), y.detach())
    k_xy = -dist(x, y)
    a_x = (k_xx @ a.unsqueeze(-1)).squeeze(-1)
    b_y = (k_yy @ b.unsqueeze(-1)).squeeze(-1)
    b_x = (k_xy @ b.unsqueeze(-1)).squeeze(-1)
    return 0.5 * (a * a_x).sum(1) + 0.5 * (b * b_y).sum(1) - (a * b_x).sum(1)


def model_hparams(n_genes: int, pert_dim: int) -> dict:
    return {
        "input_dim": n_genes, "output_dim": n_genes, "pert_dim": pert_dim, "hidden_dim": HIDDEN, "gene_dim": None,
        "batch_dim": None, "n_encoder_layers": MLP_LAYERS, "n_decoder_layers": MLP_LAYERS, "dropout": 0.1,
        "activation": "gelu", "predict_residual": True, "use_basal_projection": True, "output_space": "all",
        "embed_key": None, "cell_set_len": SET_LEN, "transformer_backbone_key": "llama", "decoder_cfg": None,
        "batch_encoder": False,
        "transformer_backbone_kwargs": {
            "hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
            "num_key_value_heads": HEADS, "head_dim": HEAD_DIM, "intermediate_size": FFN, "rms_norm_eps": 1e-6,
            "attention_dropout": 0.0, "bidirectional_attention": True,
        },
    }  # fmt: skip


BEFORE = "tahoe-ft before: geomloss's energy formula, torch's default AdamW loop, fp32"
NOW = "tahoe-ft now: new energy loss, fused AdamW (the fp32 training default), fp32"


def model_only(n_genes: int, steps: int, seed: int = 0) -> tuple[dict[str, float], dict[str, float]]:
    """Median s/step of each variant (interleaved, so a busy box slows them alike) and agreement figures."""
    import torch

    from tahoe_ft.model.loss import energy_distance
    from tahoe_ft.model.st import StateTransitionModel

    torch.manual_seed(seed)
    pert_dim, b, s = MAX_PERTS + 1, SETS_PER_STEP, SET_LEN
    hp = model_hparams(n_genes, pert_dim)
    g = torch.Generator().manual_seed(seed)

    def cells(*shape):
        return torch.log1p(1 + torch.poisson(torch.full(shape, 2.0), generator=g)) * (
            torch.rand(shape, generator=g) < DENSITY
        )

    batches = [
        (
            torch.eye(pert_dim)[torch.randint(0, pert_dim, (b, s), generator=g)],
            cells(b, s, n_genes),
            cells(b, s, n_genes),
        )
        for _ in range(3)
    ]  # fmt: skip
    ours = StateTransitionModel(hp)
    variants: dict[str, Callable[[int], None]] = {}
    figures: dict[str, float] = {}

    from state.tx.models.state_transition import StateTransitionPerturbationModel

    up_hp = dict(
        hp, loss="energy", distributional_loss="energy", gene_names=None, control_pert="non-targeting"
    )
    with contextlib.redirect_stdout(io.StringIO()):  # upstream prints the whole module
        upstream = StateTransitionPerturbationModel(**up_hp, batch_size=b, lr=1e-4)
    ours.load_state_dict(
        {k: v for k, v in upstream.state_dict().items() if "embed_tokens" not in k}, strict=True
    )
    upstream.eval()
    ours.eval()
    with torch.no_grad():
        p, x, _ = batches[0]
        got = ours.forward_sets(p, x)
        want = upstream({"pert_emb": p.reshape(b * s, -1), "ctrl_cell_emb": x.reshape(b * s, -1)}).reshape(
            b, s, -1
        )
        figures["forward max abs diff (eval)"] = float((got - want).abs().max())
        y = batches[0][2]
        ref = energy_geomloss_formula(got.double(), y.double())
        figures["energy rel err vs float64, geomloss formula (fp32)"] = float(
            ((energy_geomloss_formula(got, y).double() - ref).abs() / ref.abs()).max()
        )
        figures["energy rel err vs float64, tahoe-ft (fp32)"] = float(
            ((energy_distance(got, y).double() - ref).abs() / ref.abs()).max()
        )
    upstream.train()
    ours.train()
    torch.set_float32_matmul_precision("highest")
    opt_up = torch.optim.AdamW([p for p in upstream.parameters() if p.requires_grad], lr=1e-5)
    opt = torch.optim.AdamW(ours.parameters(), lr=1e-5)
    opt_fused = torch.optim.AdamW(ours.parameters(), lr=1e-5, fused=True)

    def up_step(i: int) -> None:
        p, x, y = batches[i % len(batches)]
        opt_up.zero_grad(set_to_none=True)
        pred = upstream({"pert_emb": p.reshape(b * s, -1), "ctrl_cell_emb": x.reshape(b * s, -1)})
        upstream.loss_fn(pred.reshape(b, s, -1), y).nanmean().backward()
        opt_up.step()

    def our_step(loss_fn, optimizer, bf16: bool = False) -> Callable[[int], None]:
        def step(i: int) -> None:
            p, x, y = batches[i % len(batches)]
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                pred = ours.forward_sets(p, x)
            loss_fn(pred.float(), y).nanmean().backward()  # the loss in float32, as STLightningModule does
            optimizer.step()

        return step

    def medium(step: Callable[[int], None]) -> Callable[[int], None]:
        def run(i: int) -> None:
            torch.set_float32_matmul_precision("medium")
            try:
                step(i)
            finally:
                torch.set_float32_matmul_precision("highest")

        return run

    variants["upstream module, fp32"] = up_step
    variants["upstream module, matmul precision medium (as `state tx train` sets it)"] = medium(up_step)
    variants[BEFORE] = our_step(energy_geomloss_formula, opt)
    variants["tahoe-ft, new energy loss, torch's default AdamW loop, fp32"] = our_step(energy_distance, opt)
    variants[NOW] = our_step(energy_distance, opt_fused)
    variants["tahoe-ft, trainer.precision=bf16-mixed (bf16 autocast, the AdamW loop)"] = our_step(
        energy_distance, opt, True
    )
    for step in variants.values():  # warm-up (allocations, the optimizers' first state)
        step(0)
    medians = interleaved(variants, steps)

    # the energy loss alone (forward + backward on the model's output size), the part this change touched
    x = batches[0][1].clone().requires_grad_()
    y = batches[0][2]

    def loss_step(fn: Callable) -> Callable[[int], None]:
        def run(i: int) -> None:
            x.grad = None
            fn(x, y).nanmean().backward()

        return run

    medians.update(
        interleaved(
            {
                "energy loss alone, before (geomloss formula)": loss_step(energy_geomloss_formula),
                "energy loss alone, now": loss_step(energy_distance),
            },
            4 * steps,
        )
    )
    return medians, figures


def interleaved(variants: dict[str, Callable[[int], None]], steps: int) -> dict[str, tuple[float, float]]:
    """Median (wall s, CPU s of this process) per call of each variant, called in turn `steps` times."""
    wall: dict[str, list[float]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    for i in range(steps):
        for name, step in variants.items():
            t, c = time.perf_counter(), time.process_time()
            step(i + 1)
            wall[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
    return {k: (statistics.median(wall[k]), statistics.median(cpu[k])) for k in variants}


def matmul_precision(n_genes: int, reps: int = 3) -> dict[str, tuple[float, float]]:
    """final_down_then_up's first product (256 cells x D by D x D/8) at torch's fp32 matmul precisions: precision
    name -> (median s, relative error against float64). "medium" is what `state tx train` sets."""
    import torch

    g = torch.Generator().manual_seed(0)
    a = torch.randn(SET_LEN * SETS_PER_STEP, n_genes, generator=g)
    w = torch.randn(n_genes // 8, n_genes, generator=g)
    ref = a.double() @ w.double().T
    out = {}
    try:
        for prec in ("highest", "medium"):
            torch.set_float32_matmul_precision(prec)
            times = []
            for _ in range(reps):
                t = time.perf_counter()
                c = a @ w.T
                times.append(time.perf_counter() - t)
            out[prec] = (statistics.median(times), float((c.double() - ref).norm() / ref.norm()))
    finally:
        torch.set_float32_matmul_precision("highest")
    return out


def profile_step(n_genes: int, steps: int) -> str:
    """torch.profiler table of tahoe-ft's model-only step (forward, energy loss, backward, fused AdamW as
    `tahoe-ft train` runs it at fp32)."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from tahoe_ft.model.loss import energy_distance
    from tahoe_ft.model.st import StateTransitionModel

    torch.manual_seed(0)
    model = StateTransitionModel(model_hparams(n_genes, MAX_PERTS + 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    p = torch.randn(SETS_PER_STEP, SET_LEN, MAX_PERTS + 1)
    x = torch.rand(SETS_PER_STEP, SET_LEN, n_genes) * (torch.rand(SETS_PER_STEP, SET_LEN, n_genes) < DENSITY)
    y = torch.rand(SETS_PER_STEP, SET_LEN, n_genes) * (torch.rand(SETS_PER_STEP, SET_LEN, n_genes) < DENSITY)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with record_function("forward"):
            pred = model.forward_sets(p, x)
        with record_function("energy loss"):
            loss = energy_distance(pred, y).nanmean()
        with record_function("backward"):
            loss.backward()
        with record_function("AdamW"):
            opt.step()

    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    return prof.key_averages().table(sort_by="cpu_time_total", row_limit=25)


# ------------------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--quick", action="store_true", help="3,000 cells, 12 steps, 5 model-only steps per variant"
    )
    ap.add_argument("--cells", type=int, default=None, help="default 20,000 (--quick: 3,000)")
    ap.add_argument(
        "--steps", type=int, default=None, help="training steps per CLI run (default 40, --quick 12)"
    )
    ap.add_argument("--model-steps", type=int, default=None, help="model-only steps per variant (default 15)")
    ap.add_argument(
        "--genes", type=int, default=GENES, help="only to smoke-test the script; the figures are 18,080"
    )
    ap.add_argument(
        "--only", default="abcdfem", help="parts to run: e = the model-only step, m = matmul precisions"
    )
    ap.add_argument("--repeat", type=int, default=1, help="run the CLI commands this many rounds (pooled)")
    ap.add_argument("--profile", action="store_true", help="also print torch.profiler's table of the step")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the data and run folders here")
    ap.add_argument(
        "--keep-runs", action="store_true", help="keep each run's folder (checkpoints: ~3 GB a run)"
    )
    ap.add_argument("--json", type=Path, default=None, help="also write the figures as JSON")
    a = ap.parse_args()
    n_cells = a.cells or (3000 if a.quick else 20000)
    steps = a.steps or (12 if a.quick else 40)
    val_every = steps // 2
    model_steps = a.model_steps or (5 if a.quick else 15)
    work = a.workdir or Path(tempfile.mkdtemp(prefix="bench_vcc_"))
    work.mkdir(parents=True, exist_ok=True)
    hook = work / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(STEP_HOOK)
    import torch

    print(
        f"{n_cells:,} cells x {a.genes:,} genes (CSR, density {DENSITY}); ST Llama {LAYERS} x {HIDDEN}, {HEADS} heads x "
        f"{HEAD_DIM}, FFN {FFN}, sets of {SET_LEN} x {SETS_PER_STEP}; {steps} steps, validation and checkpoint every "
        f"{val_every}; torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    results: dict[str, dict] = {}
    runs = {
        "a": ("upstream `state tx train`, default loader (2 workers)", "up", ["data.kwargs.num_workers=2"]),
        "b": (
            "upstream, consecutive loading, 0 workers (its best)",
            "up",
            ["data.kwargs.use_consecutive_loading=true", "data.kwargs.num_workers=0"],
        ),
        "c": ("`tahoe-ft train data=custom` (its defaults: 0 workers)", "ours", []),
        "d": ("same, `data.num_workers=0`", "ours", ["data.num_workers=0"]),
        "f": (
            "same, `data.num_workers=0 trainer.precision=bf16-mixed`", "ours",
            ["data.num_workers=0", "trainer.precision=bf16-mixed"],
        ),
    }  # fmt: skip
    if any(k in a.only for k in runs):
        t = time.perf_counter()
        h5, toml = write_screen(work, n_cells, a.genes)
        print(
            f"screen written in {time.perf_counter() - t:.0f} s: {h5} ({h5.stat().st_size / 1e6:.0f} MB)",
            flush=True,
        )
        keys = [k for k in runs if k in a.only]
        done: dict[str, list[dict]] = {k: [] for k in keys}
        for rep in range(a.repeat):  # every other round in reverse order, so no command always runs first
            for key in keys if rep % 2 == 0 else keys[::-1]:
                label, side, extra = runs[key]
                out = work / f"run_{key}_{rep}"
                out.mkdir(exist_ok=True)
                if side == "up":
                    cmd = upstream_cmd(toml, out, "bench", steps, val_every, extra)
                else:
                    cmd = tahoe_cmd(h5, toml, out, steps, val_every, extra)
                r = run_measured(cmd, out / "command.log", hook, timeout=3600)
                done[key].append(r)
                if not a.keep_runs:  # each run's checkpoints hold ~1 GB of weights and optimizer state
                    for child in out.iterdir():
                        if child.name not in ("command.log", "command.steps"):
                            shutil.rmtree(child) if child.is_dir() else child.unlink()
                print(
                    f"({key}) {label}, round {rep + 1}: {statistics.median(r['step_s']):.2f} s/step, CPU "
                    f"{statistics.median(r['step_cpu_s']):.2f} s/step ({len(r['step_s'])} intervals), peak PSS "
                    f"{r['pss_gb']:.2f} GB, wall {r['wall_s']:.0f} s",
                    flush=True,
                )
        for key in keys:
            r = results[key] = pooled(done[key])
            r["label"] = runs[key][0]
            r["command"] = " ".join(
                upstream_cmd(toml, Path("OUT"), "bench", steps, val_every, runs[key][2])
                if runs[key][1] == "up"
                else tahoe_cmd(h5, toml, Path("OUT"), steps, val_every, runs[key][2])
            )
            print(
                f"({key}) {r['label']}: {r['s_per_step']:.2f} s/step pooled over {a.repeat} round(s) "
                f"(per round {', '.join(f'{x:.2f}' for x in r['per_run_s_per_step'])})",
                flush=True,
            )
    model, figures = ({}, {})
    if "e" in a.only:
        model, figures = model_only(a.genes, model_steps)
    if a.profile:
        print(profile_step(a.genes, 2))
    precisions = matmul_precision(a.genes) if "m" in a.only else {}

    print(f"\nload average at the end {os.getloadavg()[0]:.1f}\n")
    cli = [k for k in runs if k in results]
    if cli:
        best = results.get("b")
        print(
            "| run | s/step | ÷ best | CPU s/step | ÷ best | peak summed PSS | ÷ best | whole command | ÷ best |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for k in cli:
            r = results[k]

            def ratio(f: str, r: dict = r) -> str:
                return f"{r[f] / best[f]:.2f}" if best else "—"

            per_round = r["per_run_s_per_step"]
            rounds = f" ({' / '.join(f'{x:.2f}' for x in per_round)})" if len(per_round) > 1 else ""

            print(
                f"| ({k}) {r['label']} | {r['s_per_step']:.2f}{rounds} | {ratio('s_per_step')} | {r['cpu_s_per_step']:.2f} | "
                f"{ratio('cpu_s_per_step')} | {r['pss_gb']:.1f} GB | {ratio('pss_gb')} | {r['wall_s']:.0f} s | "
                f"{ratio('wall_s')} |"
            )
    if model:
        anchor = model["upstream module, fp32"]
        print(f"\n(e) model-only step, {model_steps} steps per variant, interleaved (median):\n")
        print("| variant | ms/step | ÷ upstream module fp32 | CPU ms/step | ÷ upstream module fp32 |")
        print("|---|---|---|---|---|")
        for k, (w, c) in model.items():
            if k.startswith("energy loss alone"):
                continue
            print(f"| {k} | {w * 1e3:.0f} | {w / anchor[0]:.2f} | {c * 1e3:.0f} | {c / anchor[1]:.2f} |")
        for what, before, now in [
            ("model-only step", BEFORE, NOW),
            (
                "model-only step, the energy-loss change alone (AdamW loop on both)",
                BEFORE,
                "tahoe-ft, new energy loss, torch's default AdamW loop, fp32",
            ),
            ("energy loss alone", "energy loss alone, before (geomloss formula)", "energy loss alone, now"),
        ]:
            (wb, cb), (wn, cn) = model[before], model[now]
            print(
                f"\ntahoe-ft {what}, now / before: wall {wn * 1e3:.0f} / {wb * 1e3:.0f} ms = {wn / wb:.3f}, "
                f"CPU {cn * 1e3:.0f} / {cb * 1e3:.0f} ms = {cn / cb:.3f}"
            )
        for k, v in figures.items():
            print(f"- {k}: {v:.2g}")
    if precisions:
        n = SET_LEN * SETS_PER_STEP
        print(f"\n(m) one {n} x {a.genes:,} by {a.genes:,} x {a.genes // 8:,} fp32 product (median of 3):\n")
        for prec, (t, err) in precisions.items():
            print(f"- matmul precision {prec!r}: {t * 1e3:.0f} ms, relative error vs float64 {err:.1e}")
        print(f"- highest / medium: {precisions['highest'][0] / precisions['medium'][0]:.2f}x the time")
    if a.json:
        a.json.write_text(
            json.dumps(
                {"cli": results, "model_only_s": model, "figures": figures, "matmul_precision": precisions},
                indent=1,
            )
        )
    if a.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
