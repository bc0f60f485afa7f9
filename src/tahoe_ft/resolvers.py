"""OmegaConf resolvers used in `configs/`: `${scaled:N}` and `${tahoe_demo:FILE}` / `${tahoe_data:NAME}`.

They compute values and paths only: composing a config writes nothing. The embedded data sets are generated or
prepared where a data set is opened (`tahoe_ft.datasets.ensure_files`)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf


def _scaled(n, *, _root_) -> int:
    """A step count of the case study times `step_scale` (at least 1)."""
    scale = float(_root_.get("step_scale", 1.0))
    return max(1, int(round(float(n) * scale)))


def _cache_dir(root) -> Path:
    paths = root.get("paths") or {}
    return Path(paths.get("data_cache", "data_cache")).expanduser().resolve()


def _demo_spec(root):
    from tahoe_ft.datasets.demo import DemoSpec

    data = root.get("data") or {}
    raw = data.get("demo") if hasattr(data, "get") else None
    return DemoSpec.from_dict(OmegaConf.to_container(raw, resolve=True) if raw is not None else {})


def _demo(file: str, *, _root_) -> str:
    """Path of a file of the embedded demo data. No side effects (Hydra may resolve mid-composition, and
    composing writes nothing): `tahoe_ft.datasets.ensure_files` generates the data where it is opened."""
    from tahoe_ft.datasets.embedded import derived_demo_dir

    return str(derived_demo_dir(_cache_dir(_root_), _demo_spec(_root_)) / file)


def _data(name: str, *, _root_) -> str:
    """Path of a file of a prepared embedded data set (`papalexi`, `papalexi_split`, `papalexi_gene_names`,
    `devel`); prepared where it is opened (`tahoe_ft.datasets.ensure_files`)."""
    from tahoe_ft.datasets.embedded import devel_outputs, papalexi_outputs

    cache = _cache_dir(_root_)
    return str({**papalexi_outputs(cache), **devel_outputs(cache)}[name])


def register() -> None:
    OmegaConf.register_new_resolver("scaled", _scaled, replace=True)
    OmegaConf.register_new_resolver("tahoe_demo", _demo, replace=True)
    OmegaConf.register_new_resolver("tahoe_data", _data, replace=True)
