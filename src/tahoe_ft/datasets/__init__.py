"""The embedded data sets: the synthetic demo screens and two real ones, the Papalexi 2021 screen and PerturBench's
four-cell-line development screen (`data=devel`).

Owns `spec` (`DemoSpec`: the demo's size and seed, also the `data.demo` config schema), `demo` (the
deterministic generator: `generate_demo`), `embedded` (where each data set lives: demo files generated on first
use under the data cache, Papalexi and devel unpacked from `assets/`; `ensure_files(data)`, called where a data set is
opened, makes them: composing a config only derives their paths), and `demo_check` (the oracles that check the demo's
difficulty). `data/` reads any screen; this package only makes and finds the ones that ship with the tool.

The generator is imported on first use, so `tahoe_ft.config` can import `spec` without numpy or pandas.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ensure_demo", "ensure_devel", "ensure_files", "ensure_papalexi", "prepare_papalexi"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from tahoe_ft.datasets import embedded

        return getattr(embedded, name)
    raise AttributeError(f"module 'tahoe_ft.datasets' has no attribute {name!r}")
