"""Training-step throughput: tahoe-ft's ST model vs upstream arc-state's StateTransitionPerturbationModel.

Both models get the same hparams, the same weights (upstream's, minus its unused embedding table) and the same
batch; one step = forward, energy loss, backward, AdamW step. Prints the median cells/s of each and the ratio.
Needs arc-state in the same environment (a separate venv: it pulls transformers, peft, cell-load):

    python3 -m venv /tmp/up && /tmp/up/bin/pip install torch==2.13.0 && /tmp/up/bin/pip install arc-state==0.11.1
    PYTHONPATH=src /tmp/up/bin/python scripts/bench_train_step.py [--genes 2000] [--hidden 256] [--set 64]

Without arc-state it times tahoe-ft alone.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tahoe_ft.model.loss import energy_distance
from tahoe_ft.model.st import StateTransitionModel


def hparams(genes: int, hidden: int, set_len: int, pert_dim: int) -> dict:
    heads = max(hidden // 64, 1)
    return {
        "input_dim": genes, "output_dim": genes, "pert_dim": pert_dim, "hidden_dim": hidden, "gene_dim": None,
        "batch_dim": None, "n_encoder_layers": 4, "n_decoder_layers": 4, "dropout": 0.1, "activation": "gelu",
        "predict_residual": True, "use_basal_projection": True, "output_space": "all", "embed_key": None,
        "cell_set_len": set_len, "transformer_backbone_key": "llama", "decoder_cfg": None, "batch_encoder": False,
        "transformer_backbone_kwargs": {
            "hidden_size": hidden, "num_hidden_layers": 4, "num_attention_heads": heads, "num_key_value_heads": heads,
            "head_dim": hidden // heads, "intermediate_size": 3 * hidden, "rms_norm_eps": 1e-6,
            "attention_dropout": 0.0, "bidirectional_attention": True,
        },
    }  # fmt: skip


def time_steps(step, n: int) -> list[float]:
    step()  # warm-up
    out = []
    for _ in range(n):
        t = time.perf_counter()
        step()
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--genes", type=int, default=2000)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--set", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=15)
    a = ap.parse_args()
    torch.manual_seed(0)
    hp = hparams(a.genes, a.hidden, a.set, 32)
    b, s = a.batch, a.set
    pert = torch.randn(b * s, 32)
    basal = torch.rand(b * s, a.genes)
    target = torch.rand(b, s, a.genes)
    ours = StateTransitionModel(hp)

    results = {}
    try:
        from state.tx.models.state_transition import StateTransitionPerturbationModel

        up_hp = dict(
            hp,
            loss="energy",
            distributional_loss="energy",
            embed_key=None,
            gene_names=None,
            control_pert="non-targeting",
            batch_size=b,
            lr=1e-4,
        )
        upstream = StateTransitionPerturbationModel(**up_hp)
        sd = {k: v for k, v in upstream.state_dict().items() if "embed_tokens" not in k}
        ours.load_state_dict(sd, strict=True)
        opt_u = torch.optim.AdamW([p for p in upstream.parameters() if p.requires_grad], lr=1e-4)

        def step_up() -> None:
            opt_u.zero_grad(set_to_none=True)
            pred = upstream({"pert_emb": pert, "ctrl_cell_emb": basal}).reshape(b, s, -1)
            upstream.loss_fn(pred, target).nanmean().backward()
            opt_u.step()

        results["upstream arc-state 0.11.1"] = time_steps(step_up, a.steps)
    except ImportError:
        print("arc-state not importable: timing tahoe-ft only")

    opt = torch.optim.AdamW(ours.parameters(), lr=1e-4)

    def step_ours() -> None:
        opt.zero_grad(set_to_none=True)
        pred = ours.forward_sets(pert.reshape(b, s, -1), basal.reshape(b, s, -1))
        energy_distance(pred, target).nanmean().backward()
        opt.step()

    results["tahoe-ft"] = time_steps(step_ours, a.steps)
    cells = b * s
    print(
        f"threads {torch.get_num_threads()}, genes {a.genes}, hidden {a.hidden}, sets {b} x {s} cells, "
        f"{a.steps} steps each (median)"
    )
    for name, ts in results.items():
        med = statistics.median(ts)
        print(f"  {name:28s} {med * 1e3:8.1f} ms/step  {cells / med:10.0f} cells/s")
    if len(results) == 2:
        up, us = (statistics.median(v) for v in results.values())
        print(f"  ratio tahoe-ft / upstream cells/s: {up / us:.2f}x")


if __name__ == "__main__":
    main()
