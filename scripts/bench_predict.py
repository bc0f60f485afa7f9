"""Prediction at scale: `tahoe-ft predict` vs upstream `state tx infer`, same checkpoint, same file, one run.

Writes a synthetic VCC-style screen (CSR, density 0.1, log1p values; 18,080 genes by default), trains the
issue's model size (Llama 2 x 128, 4 heads x 32, FFN 512, sets of 64, raw expression in and out with
`final_down_then_up`) for a couple of steps with `tahoe-ft train`, exports the checkpoint as an upstream run
folder with `tahoe-ft export-state`, then runs, each as its own command timed by this script:

  * `tahoe-ft predict ckpt=<folder> data_path=<file> split_toml=<split>`: predicts the held-out (test)
    perturbed cells, writes pred.h5ad / real.h5ad (`--shuffle`: also pred_shuffled.h5ad);
  * `state tx infer --model-dir <folder> --adata <file>`: predicts every cell of the file (controls too),
    writes one h5ad.

Nearly every perturbation is held out as test, so both predict (nearly) the same cells. cells/s = cells that
went through the model / wall time of the whole command (start-up included); peak memory = the process tree's
summed PSS, sampled from /proc every 0.1 s, and the exact peak RSS of the command's process (wait4).

    PYTHONPATH=src .venv/bin/python scripts/bench_predict.py --quick     # 4,000 cells, 2 runs each: ~4 min
    PYTHONPATH=src .venv/bin/python scripts/bench_predict.py             # 20,000 cells x 18,080 genes, 3 runs

On a shared, loaded box add `--threads 1`: two OpenMP threads competing with other jobs for 2 cores make every
forward pass many times slower, for both commands alike.

Needs arc-state (the [parity] extra) for `state tx infer`; without it only tahoe-ft is timed.
`scripts/bench_memory.py` reuses the file writer and the measured-command runner from here.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
CONTROL = "non-targeting"
PERT_COL, CELL_TYPE_COL, BATCH_COL = "target_gene", "cell_type", "gem_group"
# the issue's table: Llama 2 x 128, 4 heads x 32, FFN 512, sets of 64 (87 M parameters at 18,080 genes)
ISSUE_MODEL = [
    "model.hidden_dim=128", "model.cell_set_len=64", "model.backbone.num_hidden_layers=2",
    "model.backbone.num_attention_heads=4", "model.backbone.num_key_value_heads=4", "model.backbone.head_dim=32",
    "model.backbone.intermediate_size=512",
    "model.head_skip=false",  # upstream's head: export-state writes only what state tx infer can run
]  # fmt: skip
SAMPLE_SECONDS = 0.1
FAST_SETS_PER_PASS = 16


# -- the screen -------------------------------------------------------------------------------------------


def write_screen(
    path: Path,
    n_cells: int,
    n_genes: int,
    *,
    n_perts: int = 20,
    n_cell_types: int = 2,
    ctrl_frac: float = 0.1,
    density: float = 0.1,
    seed: int = 0,
    block_rows: int = 2000,
) -> None:
    """A CSR `.h5ad` (log1p-like values in (0, 7)) written block by block: never more than `block_rows` rows
    in memory, so a 10x file costs the writer no more memory than a 1x one. The first `n_genes` positions of
    the random stream fix the genes, so files of different sizes share genes; rows depend on the seed."""
    import anndata as ad
    import h5py
    import pandas as pd

    rng = np.random.default_rng(seed)
    perts = np.array([CONTROL] + [f"P{i:03d}" for i in range(n_perts)])
    is_ctrl = rng.random(n_cells) < ctrl_frac
    pert = np.where(is_ctrl, CONTROL, perts[1 + rng.integers(0, n_perts, n_cells)])
    obs = pd.DataFrame(
        {
            PERT_COL: pert,
            CELL_TYPE_COL: np.array([f"CT{i}" for i in range(n_cell_types)])[
                rng.integers(0, n_cell_types, n_cells)
            ],
            BATCH_COL: rng.choice(["g1", "g2"], n_cells),
        },
        index=[f"c{i:07d}" for i in range(n_cells)],
    )
    var = pd.DataFrame(index=[f"GENE{i:05d}" for i in range(n_genes)])
    adata = ad.AnnData(obs=obs, var=var)
    adata.strings_to_categoricals()
    adata.write_h5ad(path)  # obs and var; X is added below in blocks

    nnz_row = rng.binomial(n_genes, density, n_cells)
    indptr = np.concatenate([[0], np.cumsum(nnz_row)]).astype(np.int64)
    with h5py.File(path, "a") as f:
        g = f.create_group("X")
        g.attrs.update(
            {"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": (n_cells, n_genes)}
        )
        data = g.create_dataset("data", shape=(int(indptr[-1]),), dtype=np.float32)
        indices = g.create_dataset("indices", shape=(int(indptr[-1]),), dtype=np.int32)
        g.create_dataset("indptr", data=indptr)
        for r0 in range(0, n_cells, block_rows):
            r1 = min(r0 + block_rows, n_cells)
            a, b = int(indptr[r0]), int(indptr[r1])
            cols = [np.sort(rng.choice(n_genes, k, replace=False)) for k in nnz_row[r0:r1].tolist()]
            indices[a:b] = np.concatenate(cols).astype(np.int32) if b > a else np.zeros(0, np.int32)
            data[a:b] = np.log1p(rng.gamma(0.8, 4.0, b - a)).astype(np.float32) + np.float32(0.01)


def write_split(path: Path, screen: Path, n_perts: int = 20, n_cell_types: int = 2, n_train: int = 4) -> None:
    """cell-load split TOML: per cell type, `n_train` perturbations train, one val, the rest test."""
    perts = [f"P{i:03d}" for i in range(n_perts)]
    val, test = perts[n_train : n_train + 1], perts[n_train + 1 :]
    lines = ["[datasets]", f"bench = {json.dumps(str(screen))}", "", "[training]", 'bench = "train"', ""]
    for ct in range(n_cell_types):
        lines += [f'[fewshot."bench.CT{ct}"]', f"val = {json.dumps(val)}", f"test = {json.dumps(test)}", ""]
    path.write_text("\n".join(lines))


# -- measured commands ------------------------------------------------------------------------------------


def _tree(pid: int) -> list[int]:
    """pid and every descendant (from /proc/<pid>/task/*/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as fh:
                    todo += [int(c) for c in fh.read().split()]
        except OSError:
            pass
    return out


def _rss_pss_kib(pid: int) -> tuple[int, int]:
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1])
    except OSError:
        pass
    return rss, pss


@dataclass
class Measured:
    wall_s: float
    peak_pss_gib: float  # the process tree's summed PSS, sampled
    peak_rss_gib: float  # the command's own process, exact (wait4's ru_maxrss)
    returncode: int


def run_measured(cmd: list[str], log_path: Path, cwd: Path, env: dict[str, str] | None = None) -> Measured:
    """Run `cmd`, stdout+stderr to `log_path`; wall time from this process's clock, memory from /proc."""
    peak = [0]
    done = threading.Event()
    with open(log_path, "w") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], sum(_rss_pss_kib(p)[1] for p in _tree(proc.pid)))
                done.wait(SAMPLE_SECONDS)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        done.set()
        sampler.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
    gib = 1 << 20  # KiB per GiB
    return Measured(wall, peak[0] / gib, usage.ru_maxrss / gib, proc.returncode)


def check(m: Measured, what: str, log_path: Path) -> Measured:
    if m.returncode != 0:
        tail = log_path.read_text()[-3000:]
        raise SystemExit(f"{what} failed (exit {m.returncode}); the end of {log_path}:\n{tail}")
    return m


def tahoe_ft(*args: str) -> list[str]:
    return [PY, "-m", "tahoe_ft.cli", *args]


def env_with_src(threads: int | None = None) -> dict[str, str]:
    """This environment with src/ on PYTHONPATH and, if given, `threads` intra-op threads for torch/BLAS."""
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def train_checkpoint(
    work: Path, screen: Path, split: Path, steps: int, model: list[str], threads: int | None = None
) -> Path:
    """`tahoe-ft train` for a few steps on the screen (0 workers), then `export-state`; the run folder."""
    log = work / "train.log"
    cmd = tahoe_ft(
        "train", "data=custom", f"data.path={screen}", f"data.split_toml={split}", "data.num_workers=0",
        f"data.pert_col={PERT_COL}", f"data.cell_type_col={CELL_TYPE_COL}", "data.batch_size=4",
        "encoder=raw_expression", "init_from=null", *model, f"trainer.max_steps={steps}",
        f"trainer.val_check_interval={steps}", "trainer.enable_progress_bar=false", "trainer.accelerator=cpu",
        "logger=csv", "sched.warmup_steps=1", f"runs_dir={work / 'runs'}",
    )  # fmt: skip
    check(run_measured(cmd, log, work, env_with_src(threads)), "tahoe-ft train", log)
    best = next((work / "runs").glob("*/*/checkpoints/best-val.pt"))
    folder = work / "state-folder"
    log = work / "export.log"
    cmd = tahoe_ft("export-state", f"ckpt={best}", f"out={folder}")
    check(run_measured(cmd, log, work, env_with_src(threads)), "tahoe-ft export-state", log)
    return folder


def state_cli() -> Path | None:
    exe = Path(PY).parent / "state"
    return exe if exe.is_file() else (Path(p) if (p := shutil.which("state")) else None)


# -- the benchmark ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="4,000 cells, 2 repeats (default 20,000 cells, 3)")
    ap.add_argument("--cells", type=int, default=None, help="cells in the screen")
    ap.add_argument("--genes", type=int, default=18080)
    ap.add_argument("--repeats", type=int, default=None, help="runs of each command, alternating")
    ap.add_argument("--train-steps", type=int, default=2, help="steps of the checkpoint's training")
    ap.add_argument("--shuffle", action="store_true", help="tahoe-ft also writes pred_shuffled.h5ad")
    ap.add_argument("--threads", type=int, default=None, help="OMP/MKL threads of every command")
    ap.add_argument("--work", type=Path, default=None, help="keep the files here (default: a temp dir)")
    ap.add_argument(
        "--fast", action="store_true",
        help="also time `tahoe-ft predict precision=bf16 sets_per_pass=16` in the same run",
    )  # fmt: skip
    ap.add_argument(
        "--raw-basal", action="store_true",
        help="also time `tahoe-ft predict recentre_basal=false` (the basal draws as drawn; bf16 too with --fast)",
    )  # fmt: skip
    ap.add_argument("--no-upstream", action="store_true", help="skip `state tx infer`")
    args = ap.parse_args(argv)
    args.cells = args.cells or (4000 if args.quick else 20000)
    args.repeats = args.repeats or (2 if args.quick else 3)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_predict-"))
    work.mkdir(parents=True, exist_ok=True)
    env = env_with_src(args.threads)
    try:
        screen, split = work / "screen.h5ad", work / "split.toml"
        t0 = time.perf_counter()
        write_screen(screen, args.cells, args.genes)
        write_split(split, screen)
        mib = screen.stat().st_size / 2**20
        print(f"screen: {args.cells} cells x {args.genes} genes, CSR density 0.1, {mib:.0f} MiB "
              f"(written in {time.perf_counter() - t0:.0f} s); threads: {args.threads or 'torch default'}")  # fmt: skip
        folder = train_checkpoint(work, screen, split, args.train_steps, ISSUE_MODEL, args.threads)

        exe = state_cli()
        predict = [
            "predict", f"ckpt={folder}", f"data_path={screen}", f"split_toml={split}", "device=cpu",
            f"shuffle={str(args.shuffle).lower()}",
        ]  # fmt: skip
        commands = {"tahoe-ft predict": tahoe_ft(*predict, f"run_dir={work / 'tahoe-pred'}")}
        if args.fast:  # the same command, bf16 and 16 sets per forward pass (its own output folder)
            commands["tahoe-ft predict bf16"] = tahoe_ft(
                *predict,
                f"run_dir={work / 'tahoe-pred-bf16'}",
                "precision=bf16",
                f"sets_per_pass={FAST_SETS_PER_PASS}",
            )
        if args.raw_basal:  # the default's re-centring of each group's basal draws, off: what it costs
            commands["tahoe-ft predict raw draws"] = tahoe_ft(
                *predict, f"run_dir={work / 'tahoe-pred-raw'}", "recentre_basal=false"
            )
            if args.fast:
                commands["tahoe-ft predict bf16 raw draws"] = tahoe_ft(
                    *predict,
                    f"run_dir={work / 'tahoe-pred-bf16-raw'}",
                    "precision=bf16",
                    f"sets_per_pass={FAST_SETS_PER_PASS}",
                    "recentre_basal=false",
                )
        if args.no_upstream:
            print("state tx infer skipped (--no-upstream)")
        elif exe is None:
            print("state (arc-state) is not installed: state tx infer skipped")
        else:
            commands["state tx infer"] = [
                str(exe), "tx", "infer", "--model-dir", str(folder), "--adata", str(screen), "--pert-col", PERT_COL,
                "--celltype-col", CELL_TYPE_COL, "--output", str(work / "inferred.h5ad"), "--quiet",
            ]  # fmt: skip
        runs: dict[str, list[Measured]] = {name: [] for name in commands}
        for r in range(args.repeats):  # alternating, so a change in the machine's load hits both sides
            for name, cmd in commands.items():
                log = work / f"{name.replace(' ', '_')}-{r}.log"
                runs[name].append(check(run_measured(cmd, log, work, env), name, log))
        info = json.loads((work / "tahoe-pred" / "predict.json").read_text())
        n_tahoe = info["n_pred_cells"] * (2 if info["shuffle"] else 1)
        cells = {name: n_tahoe for name in commands} | {"state tx infer": args.cells}

        print(
            f"{args.repeats} runs of each, alternating; medians (cells/s = cells through the model / wall s)"
        )
        print(
            f"{'command':22s} {'cells':>7s} {'wall s':>8s} {'cells/s':>9s} {'peak PSS GiB':>13s} {'peak RSS GiB':>13s}"
        )
        rate, pss = {}, {}
        for name, ms in runs.items():
            wall = statistics.median([m.wall_s for m in ms])
            rate[name], pss[name] = cells[name] / wall, statistics.median([m.peak_pss_gib for m in ms])
            rss = statistics.median([m.peak_rss_gib for m in ms])
            print(f"{name:22s} {cells[name]:7d} {wall:8.1f} {rate[name]:9.1f} {pss[name]:13.2f} {rss:13.2f}")
            print(f"{'':22s} walls: {', '.join(f'{m.wall_s:.1f}' for m in ms)}")
        b = "state tx infer"
        for a in (a for a in runs if a != b and b in runs):
            print(f"{a} / {b}: {rate[a] / rate[b]:.2f}x cells/s, {pss[a] / pss[b]:.2f}x peak PSS")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
