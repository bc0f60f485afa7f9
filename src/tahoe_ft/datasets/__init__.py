"""The embedded data sets: the synthetic demo screens and the real Papalexi 2021 screen.

Owns `demo` (the deterministic generator: `DemoSpec`, `generate_demo`), `embedded` (where each data set lives:
demo files generated on first use under the data cache, Papalexi prepared from `assets/`), and `demo_check`
(the oracles that check the demo's difficulty). `data/` reads any screen; this package only makes and finds
the two that ship with the tool.
"""

from tahoe_ft.datasets.embedded import ensure_demo, ensure_papalexi, prepare_papalexi

__all__ = ["ensure_demo", "ensure_papalexi", "prepare_papalexi"]
