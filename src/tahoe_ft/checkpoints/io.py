"""Checkpoints: atomic writes, safe loads, and weights-only initialisation with a report (SPEC §4.3).

- `best-val.pt` / `step-N.pt`: plain dicts of tensors and python values (`FORMAT`), loadable with
  `torch.load(weights_only=True)`; the architecture is rebuilt from their `hparams`, never from defaults.
- `last.ckpt`: Lightning's full training state, used only by `resume=true`. `init_from` may also read
  the weights out of one (the `model.` prefix is stripped), never its optimizer or schedule.
- Upstream `state tx train` checkpoints, alone or as their run folder (`tahoe_ft.checkpoints.upstream_folder`): the folder's
  checkpoint (best, else final, else the newest) and its perturbation vocabulary, so `init_from` maps the
  perturbation encoder's one-hot columns by name.
- What a read returns is typed: `read_weights` -> `CheckpointWeights` (the tensors, the hparams, the file's
  other values, the upstream `RunFolder` when there is one); `load_checkpoint` -> `LoadedCheckpoint` (the model
  in eval mode beside what the file says about it). Nothing is attached to the model.
- Imports: this module reads run folders (`upstream_folder`); writing one (`upstream_export`) imports this
  module, never the other way round.
- Every file is written to a temp name in the same folder, flushed and renamed: a kill during a save
  never leaves a broken file under a final name.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import threading
import zipfile
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tahoe_ft.checkpoints.upstream_folder import RunFolder
from tahoe_ft.checkpoints.upstream_hparams import is_upstream, translate_hparams
from tahoe_ft.errors import UserError
from tahoe_ft.fileio import atomic_path
from tahoe_ft.model.st import DROPPED_UPSTREAM_KEYS, StateTransitionModel, module_of

log = logging.getLogger(__name__)

FORMAT = "tahoe-ft/st/1"


def atomic_torch_save(obj: Any, path: Path) -> None:
    """`torch.save` through a temp file + fsync + rename in the destination folder."""
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(obj, tmp)


def weights_payload(
    model: StateTransitionModel,
    *,
    manifest: dict[str, Any],
    step: int,
    val_loss: float | None,
    experiment: str,
    config: dict[str, Any] | None,
) -> dict[str, Any]:
    state = {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}
    return {
        "format": FORMAT,
        "state_dict": state,
        "hparams": model.hparams,
        "manifest": manifest,
        "step": int(step),
        "val_loss": None if val_loss is None else float(val_loss),
        "experiment": experiment,
        "config": config,
    }


# Classes a Lightning checkpoint's hyper_parameters may hold: OmegaConf nodes (upstream `state` saves Hydra
# config values) and the `loss_fn=nn.MSELoss()` default that upstream's base class records in every checkpoint.
# Allow-listed for torch's weights-only unpickler: they restore containers and a parameter-free module, nothing
# else. Any other global is refused.
_CONFIG_GLOBALS = {
    "omegaconf.dictconfig.DictConfig", "omegaconf.listconfig.ListConfig", "omegaconf.base.ContainerMetadata",
    "omegaconf.base.Metadata", "omegaconf.nodes.AnyNode", "omegaconf.nodes.StringNode", "omegaconf.nodes.IntegerNode",
    "omegaconf.nodes.FloatNode", "omegaconf.nodes.BooleanNode", "omegaconf.nodes.EnumNode", "typing.Any",
    "builtins.int", "builtins.float", "builtins.str", "builtins.bool", "builtins.dict", "builtins.list",
    "builtins.tuple", "collections.defaultdict", "collections.OrderedDict", "torch.nn.modules.loss.MSELoss",
}  # fmt: skip
# numpy scalars: `state tx train` takes input_dim, output_dim, gene_dim, pert_dim and the decoder's dims from
# cell-load's var_dims, which are numpy.int64, so they land in hyper_parameters as numpy scalars. Their pickle
# is `scalar(dtype, raw bytes)` and `dtype(code, align, copy)` + a state tuple: both rebuild a value from bytes
# and run no code (an object-dtype scalar would need its payload unpickled, which the same rules then judge).
# numpy >= 2 names the module numpy._core, numpy 1.x numpy.core.
_NUMPY_GLOBALS = {"numpy._core.multiarray.scalar", "numpy.core.multiarray.scalar", "numpy.dtype"}
_ALLOWED_GLOBALS = _CONFIG_GLOBALS | _NUMPY_GLOBALS
_NUMPY_DTYPE_CODES = "?bBhHiIlLqQefdgFDG"  # bool, (unsigned) integers, floats, complex


def _config_globals(names: list[str]) -> list:
    import builtins
    import collections
    import typing

    import numpy
    import omegaconf
    import torch.nn.modules.loss as torch_loss
    from omegaconf import base, dictconfig, listconfig, nodes

    mods = {
        "torch.nn.modules.loss": torch_loss,
        "omegaconf.dictconfig": dictconfig,
        "omegaconf.listconfig": listconfig,
        "omegaconf.base": base,
        "omegaconf.nodes": nodes,
        "typing": typing,
        "builtins": builtins,
        "collections": collections,
        "omegaconf": omegaconf,
        "numpy": numpy,
        "numpy._core.multiarray": _numpy_multiarray(),
        "numpy.core.multiarray": _numpy_multiarray(),
    }
    out = []
    for name in names:
        mod, _, attr = name.rpartition(".")
        out.append((getattr(mods[mod], attr), name))
    if "numpy.dtype" in names:
        # a dtype's pickle state is applied to an instance of its numpy.dtypes class (numpy.dtypes.Int64DType,
        # ...): allow the classes of numeric and boolean dtypes, nothing else (no object, string or void dtype)
        out += [type(numpy.dtype(code)) for code in _NUMPY_DTYPE_CODES]
    return out


def _numpy_multiarray():
    """numpy's multiarray module under either of its names (numpy._core >= 2.0, numpy.core before)."""
    import importlib

    try:
        return importlib.import_module("numpy._core.multiarray")
    except ImportError:  # numpy 1.x
        return importlib.import_module("numpy.core.multiarray")


def _plain(obj: Any) -> Any:
    """OmegaConf containers (from upstream hyper_parameters) -> plain dicts and lists; numpy scalars -> python
    numbers; modules -> their name."""
    import numpy as np
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(obj, torch.nn.Module):
        return type(obj).__name__
    if isinstance(obj, np.generic):  # numpy.int64 dims from cell-load's var_dims -> plain int
        return obj.item()
    if isinstance(obj, DictConfig | ListConfig):
        return OmegaConf.to_container(obj, resolve=True)
    if isinstance(obj, dict):
        return {_plain(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_plain(v) for v in obj)
    return obj


def _torch_load(path: Path) -> Any:
    """`torch.load(weights_only=True)`; a file that names classes beyond torch's own weights-only set is
    loaded again with the allow-listed ones (`_ALLOWED_GLOBALS`) only, and refused if it names any other."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        extra = sorted(set(unsafe) - _ALLOWED_GLOBALS)
        if extra:
            raise UserError(
                f"checkpoint {path} needs arbitrary unpickling ({', '.join(extra[:3])}), which is refused; "
                "re-save it as tensors + plain python values"
            ) from None
        with torch.serialization.safe_globals(_config_globals(unsafe)):
            return _plain(torch.load(path, map_location="cpu", weights_only=True))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def safe_load(path: str | Path) -> dict[str, Any]:
    """`torch.load(weights_only=True)` with one clear error for anything that is not a safe checkpoint.

    Only tensors, plain python values and (for upstream Lightning checkpoints) OmegaConf containers are
    unpickled; a file that needs any other class is refused. Any file torch cannot read (a text file, random
    bytes, a truncated download) is a `UserError` of one line, whatever torch's reader raised.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}; check the path or run:EXPERIMENT/best-val.pt")
    try:
        obj = _torch_load(path)
    except UserError:
        raise
    except pickle.UnpicklingError as exc:
        raise UserError(
            f"checkpoint {path} needs arbitrary unpickling, which is refused ({_first_line(exc)}); "
            "re-save it as tensors + plain python values"
        ) from None
    except (EOFError, RuntimeError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise UserError(
            f"checkpoint {path} is truncated or not a torch file ({_first_line(exc)}); use another checkpoint"
        ) from None
    except Exception as exc:  # noqa: BLE001 - torch's legacy reader fails on foreign bytes with KeyError, ...
        raise UserError(
            f"checkpoint {path} is not a torch file ({type(exc).__name__}: {_first_line(exc)}); "
            "give a tahoe-ft checkpoint (best-val.pt), an upstream .ckpt or a state tx train run folder"
        ) from None
    if not isinstance(obj, dict):
        raise UserError(f"checkpoint {path} holds a {type(obj).__name__}, not a checkpoint dict")
    return obj


@dataclass(frozen=True)
class CheckpointWeights:
    """What `read_weights` read: the weights with upstream names, the model hparams (None when the file has
    none), the whole file dict, the file read, and the upstream `RunFolder` it belongs to (or None)."""

    state_dict: dict[str, torch.Tensor]
    hparams: dict[str, Any] | None
    file: dict[str, Any]
    path: Path
    run_folder: RunFolder | None = None

    @property
    def manifest(self) -> dict[str, Any] | None:
        """The tahoe-ft data manifest (a dict) the file carries, or None (upstream files have none)."""
        return self.file.get("manifest") or (self.file.get("hyper_parameters") or {}).get("manifest")


def read_weights(path: str | Path) -> CheckpointWeights:
    """The weights, hparams and file of any supported checkpoint.

    `path` may also be an upstream run folder (its checkpoint is chosen by `pick_checkpoint`); for it, or for
    a `.ckpt` inside one's `checkpoints/`, the result carries the `RunFolder`.
    """
    path = Path(path)
    if path.is_dir():
        folder: RunFolder | None = RunFolder.open(path)
        path = folder.checkpoint
        log.info("upstream run folder %s: using %s", folder.path, path)
    else:
        folder = RunFolder.of_checkpoint(path) if path.suffix == ".ckpt" else None
    obj = safe_load(path)
    if obj.get("format") == FORMAT:
        state, hparams = obj["state_dict"], obj["hparams"]
    elif "state_dict" in obj:  # a Lightning checkpoint: ours (last.ckpt) or upstream's
        state = obj["state_dict"]
        hp = obj.get("hyper_parameters") or {}
        if any(k.startswith("model.") for k in state):
            state = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
            hparams = hp.get("model")
        elif is_upstream(obj):  # a `state tx train` checkpoint: architecture from its own hyper_parameters
            hparams = translate_hparams(hp, str(path))
        else:
            hparams = None
    else:
        raise UserError(
            f"checkpoint {path} has no weights (no 'state_dict'); is it a tahoe-ft or ST checkpoint?"
        )
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise UserError(
            f"checkpoint {path} has non-tensor weights (e.g. {bad[0]}); it is not a model checkpoint"
        )
    return CheckpointWeights(state, hparams, obj, path, folder)


# torch.nn.init's in-place fills, which every layer's constructor calls (Linear: kaiming_uniform_ + uniform_)
_INIT_FILLS = (
    "uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "orthogonal_",
    "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_", "xavier_normal_",
)  # fmt: skip
_INIT_LOCK = threading.Lock()


@contextlib.contextmanager
def _no_init_fills() -> Iterator[None]:
    """Build a model whose every parameter a strict `load_state_dict(assign=True)` will replace, without the
    random fills of `torch.nn.init` (at 87 M parameters 0.8-1.0 s of one core's RNG, measured; the fills
    are lost anyway). The parameters hold uninitialised memory until the load; buffers that are not in the
    state dict are computed by their modules, not filled. Process-wide while the block runs, as
    transformers' `no_init_weights` (a model built by another thread meanwhile would be left unfilled too);
    the lock keeps two loads from restoring each other's patch. (The meta device would do the same, but
    `torch.device("meta")` imports torch._dynamo: 2.7 s.)"""
    with _INIT_LOCK:
        saved = {name: getattr(torch.nn.init, name) for name in _INIT_FILLS}
        try:
            for name in _INIT_FILLS:
                setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
            yield
        finally:
            for name, fn in saved.items():
                setattr(torch.nn.init, name, fn)


def model_from_weights(
    state: dict[str, torch.Tensor], hparams: dict[str, Any] | None, path: str | Path
) -> StateTransitionModel:
    """The model of `hparams` with exactly `state` (upstream's dropped keys aside), in eval mode."""
    if hparams is None:
        raise UserError(
            f"checkpoint {path} carries no tahoe-ft hparams; import upstream checkpoints with init_from"
        )
    # the file's tensors become the parameters (assign): no second copy of the weights is kept, and the
    # random fills of construction are skipped (`_no_init_fills`), since every one of them is replaced
    with _no_init_fills():
        model = StateTransitionModel(hparams)
    want = model.state_dict()
    state = {
        k: v.to(want[k].dtype) if k in want else v for k, v in state.items() if k not in DROPPED_UPSTREAM_KEYS
    }
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise UserError(
            f"checkpoint {path} does not match its own hparams: {str(exc).splitlines()[0]}"
        ) from None
    return model.eval()


@dataclass(frozen=True)
class LoadedCheckpoint:
    """A checkpoint loaded for use: the model (eval mode) and what the file says about it.

    `manifest`: the tahoe-ft data manifest as stored (a dict; None for upstream files, whose vocabulary is in
    `run_folder`); `step`, `val_loss`, `experiment`: as the file recorded them (None when it did not);
    `checkpoint_path`: the file read (a run folder's chosen `.ckpt`); `run_folder`: the upstream `state tx
    train` folder the file belongs to, else None.
    """

    model: StateTransitionModel
    manifest: dict[str, Any] | None
    step: int | None
    val_loss: float | None
    experiment: str | None
    checkpoint_path: Path
    run_folder: RunFolder | None = None


def load_checkpoint(path: str | Path) -> LoadedCheckpoint:
    """Load a tahoe-ft or upstream checkpoint (or an upstream run folder): the model in eval mode and its
    record. The architecture comes from the file's `hparams`; the weights must match it exactly."""
    weights = read_weights(path)
    file = weights.file
    return LoadedCheckpoint(
        model=model_from_weights(weights.state_dict, weights.hparams, path),
        manifest=weights.manifest,
        step=file.get("step"),
        val_loss=file.get("val_loss"),
        experiment=file.get("experiment"),
        checkpoint_path=weights.path,
        run_folder=weights.run_folder,
    )


PERT_LAYER = "pert_encoder.0.weight"  # [H, P]: one column per one-hot perturbation


def pert_vocabulary(source: CheckpointWeights | dict[str, Any] | None) -> list[str] | None:
    """Perturbation names in one-hot column order of a checkpoint (its upstream run folder, or its tahoe-ft
    manifest) or of a manifest dict; None when unknown or when the features are not one-hot."""
    if isinstance(source, CheckpointWeights):
        if source.run_folder is not None:
            return list(source.run_folder.pert_names) if source.run_folder.onehot else None
        source = source.manifest
    if not source or (source.get("pert_features") or {}).get("source") != "onehot":
        return None
    names = [str(p) for p in source["pert_names"]]
    mat = torch.as_tensor(source["pert_matrix"], dtype=torch.float32)
    return (
        names if mat.shape == (len(names), len(names)) and torch.equal(mat, torch.eye(len(names))) else None
    )


def _map_pert_columns(
    own: torch.Tensor, theirs: torch.Tensor, child: list[str], parent: list[str]
) -> tuple[torch.Tensor, dict[str, list[str]]]:
    """`own` [H, P_child] with the columns of perturbations the parent knows copied from `theirs` [H, P_parent]."""
    index = {p: i for i, p in enumerate(parent)}
    out = own.detach().clone()
    for j, name in enumerate(child):
        if name in index:
            out[:, j] = theirs[:, index[name]]
    known = set(child)
    return out, {
        "mapped": [p for p in child if p in index],
        "new": [p for p in child if p not in index],
        "parent_only": [p for p in parent if p not in known],
    }


def _map_pert_layer(
    own: dict[str, torch.Tensor],
    state: dict[str, torch.Tensor],
    parent: CheckpointWeights | None,
    manifest: dict[str, Any] | None,
) -> tuple[dict[str, torch.Tensor], dict[str, list[str]] | None, list[dict[str, Any]], list[int] | None]:
    """`state` with the parent's perturbation columns mapped by name onto the child's (when both one-hot
    vocabularies are known and the layer fits): (state, columns report or None, partially loaded entries,
    the parent layer's shape or None)."""
    parent_vocab, child_vocab = pert_vocabulary(parent), pert_vocabulary(manifest)
    if not (
        parent_vocab is not None
        and child_vocab is not None
        and PERT_LAYER in state
        and PERT_LAYER in own
        and tuple(state[PERT_LAYER].shape) == (own[PERT_LAYER].shape[0], len(parent_vocab))
        and own[PERT_LAYER].shape[1] == len(child_vocab)
    ):
        return state, None, [], None
    parent_shape = list(state[PERT_LAYER].shape)
    weight, columns = _map_pert_columns(own[PERT_LAYER], state[PERT_LAYER], child_vocab, parent_vocab)
    partial = []
    if columns["new"] and columns["mapped"]:
        partial.append(
            {"name": PERT_LAYER, "mapped_columns": len(columns["mapped"]), "new_columns": len(columns["new"])}
        )
    state = {**state, PERT_LAYER: weight}  # the layer now has the child's shape
    return state, columns, partial, parent_shape


def _count_by_module(
    loaded: list[str], partial: list[dict], skipped: list[dict], missing: list[str], unexpected: list[str]
) -> dict[str, dict[str, int]]:
    by_module: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for kind, names in (
        ("loaded", loaded),
        ("partially_loaded", [p["name"] for p in partial]),
        ("skipped_shape", [s["name"] for s in skipped]),
        ("missing", missing),
        ("unexpected", unexpected),
    ):
        for k in names:
            by_module[module_of(k)][kind] += 1
    return {m: dict(c) for m, c in sorted(by_module.items())}


def init_from_weights(
    model: StateTransitionModel,
    state: dict[str, torch.Tensor],
    source: str,
    *,
    parent: CheckpointWeights | None = None,
    manifest: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Load matching tensors into `model` (weights only) and return the init report.

    Tensors whose name and shape match are loaded; shape mismatches are skipped (both shapes reported) and keep
    their fresh initialisation, as do tensors missing from the checkpoint; unexpected ones are listed. The
    transformer backbone must load completely: a backbone that does not fit cannot be re-initialised usefully.

    Perturbation columns: when the parent's one-hot vocabulary is known (`parent`, what `read_weights` read:
    an upstream run folder or a tahoe-ft manifest) and the child's features are one-hot too (`manifest`, the
    child's data manifest), `pert_encoder.0.weight` is mapped by name: the columns of shared perturbations are
    copied, the others keep their fresh initialisation (report: `pert_columns`, `partially_loaded`), whether
    or not the widths differ.
    """
    own = model.state_dict()
    loaded, skipped, unexpected, dropped = [], [], [], []
    to_load = {}
    state, columns, partial, parent_shape = _map_pert_layer(own, state, parent, manifest)
    for k, v in state.items():
        if k in DROPPED_UPSTREAM_KEYS:
            dropped.append(k)
        elif k not in own:
            unexpected.append(k)
        elif tuple(v.shape) != tuple(own[k].shape):
            skipped.append({"name": k, "checkpoint_shape": list(v.shape), "model_shape": list(own[k].shape)})
        elif columns is not None and k == PERT_LAYER and not columns["mapped"]:  # no shared perturbation
            skipped.append({"name": k, "checkpoint_shape": parent_shape, "model_shape": list(own[k].shape)})
        else:
            to_load[k] = v
            if not (partial and k == PERT_LAYER):
                loaded.append(k)
    missing = [k for k in own if k not in state]
    bad_backbone = [s["name"] for s in skipped if module_of(s["name"]) == "transformer_backbone"]
    bad_backbone += [k for k in missing if module_of(k) == "transformer_backbone"]
    if bad_backbone:
        raise UserError(
            f"init_from {source}: the transformer backbone does not fit ({bad_backbone[0]} "
            f"{'has another shape' if bad_backbone[0] not in missing else 'is missing'}); "
            "the parent must have the same backbone architecture (hidden size, layers, heads)"
        )
    model.load_state_dict(to_load, strict=False)
    reinit = sorted({s["name"] for s in skipped} | set(missing))
    reinit_modules = sorted({module_of(k) for k in reinit} | {module_of(p["name"]) for p in partial})
    folder = parent.run_folder if parent is not None else None
    return {
        "source": source,
        "checkpoint": str(folder.checkpoint) if folder is not None else source,
        "loaded": loaded,
        "partially_loaded": partial,
        "skipped_shape": skipped,
        "missing": missing,
        "unexpected": unexpected,
        "dropped": dropped,
        "reinitialised": reinit,
        "reinitialised_modules": reinit_modules,
        "pert_columns": columns,
        "by_module": _count_by_module(loaded, partial, skipped, missing, unexpected),
    }


def format_report(report: dict[str, Any]) -> str:
    """A few human lines for the console."""
    lines = [f"init_from {report['source']}: {len(report['loaded'])} tensors loaded"]
    if report.get("checkpoint") not in (None, report["source"]):
        lines[0] += f" (checkpoint {report['checkpoint']})"
    for m, c in report["by_module"].items():
        lines.append("  " + m + ": " + ", ".join(f"{k} {v}" for k, v in sorted(c.items())))
    for s in report["skipped_shape"]:
        lines.append(
            f"  re-initialised {s['name']}: checkpoint {s['checkpoint_shape']} vs model {s['model_shape']}"
        )
    cols = report.get("pert_columns")
    if cols is not None:
        lines.append(
            f"  {PERT_LAYER}: {len(cols['mapped'])} perturbation columns mapped by name, {len(cols['new'])} new "
            f"(re-initialised: {', '.join(cols['new'][:8])}{' ...' if len(cols['new']) > 8 else ''})"
        )
    if report["unexpected"]:
        lines.append(f"  unexpected (not in this model, ignored): {len(report['unexpected'])} tensors")
    return "\n".join(lines)
