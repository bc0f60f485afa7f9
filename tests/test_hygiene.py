"""Code hygiene (issue #34): no module imports another module's private name (`from tahoe_ft.x import _y`);
importing a public name under a private alias (`import train as _train`) is fine."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def private_imports(text: str) -> list[str]:
    """`module._name` for every private name imported from a tahoe_ft module in `text`."""
    out = []
    for m in re.finditer(r"^\s*from (tahoe_ft[\w.]*) import (\([^)]*\)|[^\n]*)", text, flags=re.M):
        for item in m.group(2).strip("()").replace("\n", " ").split(","):
            name = item.split("#")[0].strip().split(" as ")[0].strip()
            if name.startswith("_") and not name.startswith("__"):
                out.append(f"{m.group(1)}.{name}")
    return out


def test_no_module_imports_a_private_name_of_another():
    problems = []
    for f in [*sorted((ROOT / "src").rglob("*.py")), *sorted((ROOT / "scripts").glob("*.py"))]:
        problems += [f"{f.relative_to(ROOT)}: {p}" for p in private_imports(f.read_text())]
    assert problems == []


def test_the_check_finds_a_private_import():
    text = "from tahoe_ft.prediction.plan import (\n    PredictionPlan,\n    _Set,\n)\nfrom tahoe_ft.x import a as _a\n"
    assert private_imports(text) == ["tahoe_ft.prediction.plan._Set"]
