"""A real upstream run folder, written by arc-state 0.11.1's own `state tx train` (not a hand-made fixture).

`state tx train` takes `input_dim`, `pert_dim`, ... from cell-load's `var_dims` (numpy.int64), so its
checkpoints carry numpy scalars in `hyper_parameters`, and it writes `config.yaml`, `var_dims.pkl` and
`pert_onehot_map.pt` beside `checkpoints/`. Tests that need such a folder call `state_tx_train(...)`.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tahoe_ft.datasets import ensure_demo
from tahoe_ft.demo import DemoSpec

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
]  # fmt: skip


def state_cli() -> Path | None:
    exe = Path(sys.executable).parent / "state"
    return exe if exe.is_file() else (Path(p) if (p := shutil.which("state")) else None)


def state_tx_train(root: Path, *extra: str, steps: int = 4) -> Path:
    """Run `state tx train` on the tiny demo screen; return the run folder (`<root>/out/run`)."""
    files = ensure_demo(root / "cache", DemoSpec.from_dict(TINY_SPEC))
    out = root / "out"
    cmd = [
        str(state_cli()), "tx", "train",
        f"data.kwargs.toml_config_path={files['split']}", "data.kwargs.embed_key=null",
        "data.kwargs.output_space=all", "data.kwargs.pert_col=target_gene", "data.kwargs.cell_type_key=cell_type",
        "data.kwargs.control_pert=non-targeting", "data.kwargs.batch_col=batch", "data.kwargs.num_workers=0",
        "data.kwargs.pin_memory=false", f"training.max_steps={steps}", f"training.val_freq={steps}",
        "training.batch_size=4", f"training.ckpt_every_n_steps={steps}", *TINY_UPSTREAM_MODEL,
        "use_wandb=false", f"output_dir={out}", "name=run", *extra,
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"state tx train failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return out / "run"
