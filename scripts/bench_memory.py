"""Training memory: the same `tahoe-ft train` run on a screen of N cells and on one of 10 N (same genes).

Writes both screens (CSR, density 0.1, log1p values; 18,080 genes by default; `bench_predict.write_screen`,
block by block), then runs the same command on each, timed and sampled by this script: raw expression in and
out, the issue's model (Llama 2 x 128, 4 heads x 32, FFN 512, sets of 64, `final_down_then_up`), batch 4
(256 cells per step), `data.num_workers` as given (default 0). Reports each run's peak memory (the process
tree's summed PSS, sampled from /proc every 0.1 s, and the exact peak RSS of the main process) beside the
floor `tahoe-ft train` prints at start-up (weights + gradients + AdamW state + batches in flight,
`tahoe_ft.training.memory`), and the 10 N / N ratio (flat = 1.0).

    PYTHONPATH=src .venv/bin/python scripts/bench_memory.py --quick    # 2,000 and 20,000 cells, 6 steps
    PYTHONPATH=src .venv/bin/python scripts/bench_memory.py            # 20,000 and 200,000 cells, 40 steps
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_predict import (  # noqa: E402 - the sibling script, found through the line above
    CELL_TYPE_COL,
    ISSUE_MODEL,
    PERT_COL,
    Measured,
    check,
    env_with_src,
    run_measured,
    tahoe_ft,
    write_screen,
    write_split,
)

# 10 perturbations x 2 cell types: ~90 cells per group at N = 2,000, enough for sets of 64
N_PERTS = 10
# --model st-tahoe: ST-Tahoe's backbone (hidden 1440, Llama 4 x 12 heads x 120, FFN 4416, sets of 512) with
# raw expression in and out, one set per step; ~256 M parameters, a floor of ~4 GiB
ST_TAHOE_MODEL = [
    "model.hidden_dim=1440", "model.cell_set_len=512", "model.backbone.num_hidden_layers=4",
    "model.backbone.num_attention_heads=12", "model.backbone.num_key_value_heads=12",
    "model.backbone.head_dim=120", "model.backbone.intermediate_size=4416", "model.head_skip=false",
]  # fmt: skip
MODELS = {"issue": (ISSUE_MODEL, 4), "st-tahoe": (ST_TAHOE_MODEL, 1)}  # model overrides, sets per step
FLOOR_LINE = re.compile(r"memory floor ([0-9.]+) GiB = (.*)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="N = 2,000 cells, 6 steps (default 20,000, 40)")
    ap.add_argument("--cells", type=int, default=None, help="N: cells of the smaller screen")
    ap.add_argument("--genes", type=int, default=18080)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--workers", type=int, default=0, help="data.num_workers of both runs")
    ap.add_argument("--threads", type=int, default=None, help="OMP/MKL threads of both runs")
    ap.add_argument(
        "--model",
        choices=sorted(MODELS),
        default="issue",
        help="issue: the issue's 87 M model, 4 sets of 64 per step (default); st-tahoe: ST-Tahoe's size, "
        "one set of 512 per step (use --cells 20000 or more: groups must hold sets of 512)",
    )
    ap.add_argument("--work", type=Path, default=None, help="keep the files here (default: a temp dir)")
    args = ap.parse_args(argv)
    args.cells = args.cells or (2000 if args.quick else 20000)
    args.steps = args.steps or (6 if args.quick else 40)
    return args


def train_command(work: Path, screen: Path, split: Path, args: argparse.Namespace) -> list[str]:
    return tahoe_ft(
        "train", "data=custom", f"data.path={screen}", f"data.split_toml={split}",
        f"data.num_workers={args.workers}", f"data.pert_col={PERT_COL}", f"data.cell_type_col={CELL_TYPE_COL}",
        f"data.batch_size={MODELS[args.model][1]}", "encoder=raw_expression", "init_from=null",
        *MODELS[args.model][0],
        f"trainer.max_steps={args.steps}", f"trainer.val_check_interval={args.steps}",
        "trainer.enable_progress_bar=false", "trainer.accelerator=cpu", "logger=csv", "checkpoint.save_last=false",
        f"runs_dir={work / 'runs'}",
    )  # fmt: skip


def floor_from_log(log: Path) -> tuple[float, str]:
    """The floor `tahoe-ft train` printed at start-up: (GiB, its parts)."""
    for line in log.read_text().splitlines():
        if m := FLOOR_LINE.search(line):
            return float(m.group(1)), m.group(2)
    raise SystemExit(f"no 'memory floor' line in {log}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_memory-"))
    work.mkdir(parents=True, exist_ok=True)
    env = env_with_src(args.threads)
    try:
        rows: list[tuple[int, Measured, float, str]] = []
        for n in (args.cells, 10 * args.cells):
            screen, split = work / f"screen-{n}.h5ad", work / f"split-{n}.toml"
            t0 = time.perf_counter()
            write_screen(screen, n, args.genes, n_perts=N_PERTS)
            write_split(split, screen, n_perts=N_PERTS)
            mib = screen.stat().st_size / 2**20
            print(
                f"screen: {n} cells x {args.genes} genes, {mib:.0f} MiB (written in {time.perf_counter() - t0:.0f} s)"
            )
            log = work / f"train-{n}.log"
            m = check(
                run_measured(train_command(work, screen, split, args), log, work, env), "tahoe-ft train", log
            )
            floor, parts = floor_from_log(log)
            rows.append((n, m, floor, parts))
            screen.unlink()  # the 10 N file can be large

        overrides, sets = MODELS[args.model]
        set_len = next(o for o in overrides if o.startswith("model.cell_set_len=")).split("=")[1]
        print(f"tahoe-ft train, model {args.model}, {args.steps} steps, batch {sets} x {set_len} cells, "
              f"data.num_workers={args.workers}, "
              f"threads {args.threads or 'torch default'}")  # fmt: skip
        print(
            f"{'cells':>8s} {'wall s':>7s} {'peak PSS GiB':>13s} {'peak RSS GiB':>13s} {'floor GiB':>10s} {'PSS / floor':>12s}"
        )
        for n, m, floor, _ in rows:
            print(f"{n:8d} {m.wall_s:7.1f} {m.peak_pss_gib:13.2f} {m.peak_rss_gib:13.2f} {floor:10.2f} "
                  f"{m.peak_pss_gib / floor:11.2f}x")  # fmt: skip
        print(f"floor: {rows[0][3]}")
        (_, small, _, _), (_, big, _, _) = rows
        print(f"10 N / N: peak PSS {big.peak_pss_gib / small.peak_pss_gib:.2f}x, "
              f"peak RSS {big.peak_rss_gib / small.peak_rss_gib:.2f}x")  # fmt: skip
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
