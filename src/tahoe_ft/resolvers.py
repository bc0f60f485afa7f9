"""OmegaConf resolvers used in `configs/`: `${scaled:N}` and `${tahoe_demo:FILE}` / `${tahoe_data:NAME}`."""

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


def _demo(file: str, *, _root_) -> str:
    """Path of a file of the embedded demo data, generating the data on first use."""
    from tahoe_ft.datasets import demo_dir, ensure_demo
    from tahoe_ft.demo import DemoSpec

    data = _root_.get("data") or {}
    raw = data.get("demo") if hasattr(data, "get") else None
    spec_dict = OmegaConf.to_container(raw, resolve=True) if raw is not None else {}
    spec = DemoSpec(**spec_dict)
    cache = _cache_dir(_root_)
    ensure_demo(cache, spec)
    return str(demo_dir(cache, spec) / file)


def _data(name: str, *, _root_) -> str:
    """Path of a prepared embedded data set file (`papalexi`, `papalexi_split`)."""
    from tahoe_ft.datasets import ensure_papalexi

    paths = ensure_papalexi(_cache_dir(_root_))
    return str(paths[name])


def register() -> None:
    OmegaConf.register_new_resolver("scaled", _scaled, replace=True)
    OmegaConf.register_new_resolver("tahoe_demo", _demo, replace=True)
    OmegaConf.register_new_resolver("tahoe_data", _data, replace=True)
