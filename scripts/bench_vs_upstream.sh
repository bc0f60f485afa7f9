#!/usr/bin/env bash
# Whole training loop, tahoe-ft vs upstream `state tx train` (arc-state 0.11.1 + cell-load 0.10.4, the
# [parity] extra), on the same default demo screen (2,000 genes, raw expression in and out), the same
# architecture (Llama, hidden 64, 2 layers, 4 heads x 16, FFN 192, 4-layer MLPs), 32 sets x 32 cells per
# step, no DataLoader workers, no wandb, one validation at the end. Per-step time = (wall(N2) - wall(N1)) /
# (N2 - N1), so start-up and data generation cancel out. Run from the repo root:
#   bash scripts/bench_vs_upstream.sh
set -euo pipefail
cd "$(dirname "$0")/.."
N1=${N1:-50}; N2=${N2:-250}
W=$(mktemp -d)
PY=.venv/bin/python
$PY -m tahoe_ft.cli check paths.data_cache="$W/cache" >/dev/null   # generate the demo data once
SPLIT=$(ls "$W"/cache/demo-*/split.toml)
up() {  # $1 = steps
  .venv/bin/state tx train data.kwargs.toml_config_path="$SPLIT" data.kwargs.embed_key=null \
    data.kwargs.output_space=all data.kwargs.pert_col=target_gene data.kwargs.cell_type_key=cell_type \
    data.kwargs.control_pert=non-targeting data.kwargs.batch_col=batch data.kwargs.num_workers=0 \
    data.kwargs.pin_memory=false training.max_steps="$1" training.val_freq="$1" training.batch_size=32 \
    training.ckpt_every_n_steps=100000 model=state model.kwargs.cell_set_len=32 model.kwargs.hidden_dim=64 \
    model.kwargs.n_encoder_layers=4 model.kwargs.n_decoder_layers=4 \
    model.kwargs.transformer_backbone_kwargs.hidden_size=64 \
    model.kwargs.transformer_backbone_kwargs.num_hidden_layers=2 \
    model.kwargs.transformer_backbone_kwargs.num_attention_heads=4 \
    model.kwargs.transformer_backbone_kwargs.num_key_value_heads=4 \
    model.kwargs.transformer_backbone_kwargs.head_dim=16 \
    model.kwargs.transformer_backbone_kwargs.intermediate_size=192 \
    use_wandb=false output_dir="$W/up$1" name=bench >"$W/up$1.log" 2>&1
}
ours() {
  $PY -m tahoe_ft.cli train +experiment=0905 init_from=null paths.data_cache="$W/cache" runs_dir="$W/ours$1" \
    trainer.max_steps="$1" trainer.val_check_interval="$1" logger=csv trainer.enable_progress_bar=false \
    data.batch_size=32 model.cell_set_len=32 >"$W/ours$1.log" 2>&1
}
t() { local s e; s=$(date +%s.%N); "$@"; e=$(date +%s.%N); python3 -c "print($e - $s)"; }
u1=$(t up "$N1"); u2=$(t up "$N2"); o1=$(t ours "$N1"); o2=$(t ours "$N2")
python3 - "$N1" "$N2" "$u1" "$u2" "$o1" "$o2" <<'PY'
import sys
n1, n2, u1, u2, o1, o2 = map(float, sys.argv[1:])
up, us = (u2 - u1) / (n2 - n1), (o2 - o1) / (n2 - n1)
print(f"steps {int(n1)} and {int(n2)}; wall s: upstream {u1:.1f} / {u2:.1f}, tahoe-ft {o1:.1f} / {o2:.1f}")
print(f"per step: upstream {up*1e3:.0f} ms ({32*32/up:.0f} cells/s), tahoe-ft {us*1e3:.0f} ms ({32*32/us:.0f} cells/s)")
print(f"speed-up tahoe-ft / upstream: {up/us:.2f}x")
PY
rm -rf "$W"
