"""Real upstream run folders, written by arc-state 0.11.1's own `state tx train` (not hand-made fixtures).

`state tx train` takes `input_dim`, `pert_dim`, ... from cell-load's `var_dims` (numpy.int64), so its
checkpoints carry numpy scalars in `hyper_parameters`, and it writes `config.yaml`, `var_dims.pkl` and
`pert_onehot_map.pt` beside `checkpoints/`. Tests that need such folders call `state_tx_train_many(...)`: one
process runs `state tx train` once per configuration through upstream's own CLI entry point
(`state.__main__.main` with the command line in `sys.argv`, exactly what the `state` console script does), so
the ~10 s import of arc-state is paid once, not per configuration.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from tahoe_ft.datasets.demo import DemoSpec
from tahoe_ft.datasets.embedded import ensure_demo

TINY_SPEC = dict(
    n_genes=60, n_cell_types=2, n_batches=2, n_perts=8, cells_per_pert=20, n_ctrl=60, n_programs=4,
    state_dim=16, pert_feature_dim=8, n_drugs=6, pretrain_cells_per_drug=20, pretrain_ctrl=60,
    n_pretrain_cell_types=2, n_val_perts=2, n_test_perts=2,
)  # fmt: skip
# the tiny ST of tests/conftest_train.py (hidden 32, 2 Llama layers, 4 heads x 8, 2 kv heads, FFN 48)
TINY_UPSTREAM_MODEL = [
    "model=state", "model.kwargs.cell_set_len=8", "model.kwargs.hidden_dim=32",
    "model.kwargs.n_encoder_layers=2", "model.kwargs.n_decoder_layers=2",
    "model.kwargs.transformer_backbone_kwargs.hidden_size=32",
    "model.kwargs.transformer_backbone_kwargs.num_hidden_layers=2",
    "model.kwargs.transformer_backbone_kwargs.num_attention_heads=4",
    "model.kwargs.transformer_backbone_kwargs.num_key_value_heads=2",
    "model.kwargs.transformer_backbone_kwargs.head_dim=8",
    "model.kwargs.transformer_backbone_kwargs.intermediate_size=48",
    "+model.kwargs.decoder_hidden_dims=[32,32]",  # upstream's default decoder is 1024-1024-512
]  # fmt: skip
# The differential suite's configurations (model/data overrides on top of the tiny model and data).
CONFIGS: dict[str, list[str]] = {
    # raw expression in and out (output_space all): final_down_then_up and the input-space residual
    "raw_all": [],
    # SE-like embedding input (obsm X_state, 16-d) with a gene decoder onto X's 60 genes
    "x_state_decoder": ["data.kwargs.embed_key=X_state"],
    # basal encoder = one Linear instead of an MLP
    "no_basal_projection": ["+model.kwargs.use_basal_projection=false"],
    # nn.Embedding over the 2 batches added to every cell's token
    "batch_encoder": ["model.kwargs.batch_encoder=true"],
}


def state_cli() -> Path | None:
    exe = Path(sys.executable).parent / "state"
    return exe if exe.is_file() else (Path(p) if (p := shutil.which("state")) else None)


def demo_files(root: Path) -> dict[str, Path]:
    """The tiny demo screen (the same spec as tests/conftest_train.TINY_DEMO)."""
    return ensure_demo(root / "cache", DemoSpec.from_dict(TINY_SPEC))


def train_argv(root: Path, name: str, extra: list[str], steps: int = 4) -> list[str]:
    """`state tx train` arguments for one run folder `<root>/out/<name>` on the tiny demo screen."""
    files = demo_files(root)
    return [
        f"data.kwargs.toml_config_path={files['split']}", "data.kwargs.embed_key=null",
        "data.kwargs.output_space=all", "data.kwargs.pert_col=target_gene", "data.kwargs.cell_type_key=cell_type",
        "data.kwargs.control_pert=non-targeting", "data.kwargs.batch_col=batch", "data.kwargs.num_workers=0",
        "data.kwargs.pin_memory=false", f"training.max_steps={steps}", f"training.val_freq={steps}",
        "training.batch_size=4", f"training.ckpt_every_n_steps={steps}", *TINY_UPSTREAM_MODEL,
        "use_wandb=false", f"output_dir={root / 'out'}", f"name={name}", *extra,
    ]  # fmt: skip


def state_tx_train(root: Path, *extra: str, steps: int = 4) -> Path:
    """Run the `state tx train` console script once on the tiny demo screen; return `<root>/out/run`."""
    cmd = [str(state_cli()), "tx", "train", *train_argv(root, "run", list(extra), steps)]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"state tx train failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return root / "out" / "run"


def state_tx_train_many(root: Path, configs: dict[str, list[str]], steps: int = 4) -> dict[str, Path]:
    """`state tx train` once per configuration (name -> extra overrides) in one process; name -> run folder."""
    root.mkdir(parents=True, exist_ok=True)
    spec = {name: train_argv(root, name, list(extra), steps) for name, extra in configs.items()}
    (root / "runs.json").write_text(json.dumps(spec))
    proc = subprocess.run(
        [sys.executable, __file__, str(root / "runs.json")],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"state tx train failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return {name: root / "out" / name for name in configs}


def _main(spec_path: str) -> None:
    """Each run exactly as the `state` console script runs it: `state.__main__.main()` on its command line."""
    from state.__main__ import main

    for name, argv in json.loads(Path(spec_path).read_text()).items():
        sys.argv = ["state", "tx", "train", *argv]
        main()
        print(f"== state tx train {name}: done", file=sys.stderr)


if __name__ == "__main__":
    _main(sys.argv[1])
