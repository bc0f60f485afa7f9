"""Split TOMLs (issue #31): one module writes and reads them all (`tahoe_ft.data.split_file`), with quoted
keys and `"<dataset>.<cell type>"` keys read against the dataset names; and the splits they (or the config
lists) describe never share a perturbation between validation and test, or between a held-out group and
training, within a cell type."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from tahoe_ft.config import DataConfig
from tahoe_ft.data import CellCatalog, GroupKey
from tahoe_ft.data.inputs import SplitToml as ReExported
from tahoe_ft.data.split_file import (
    SplitToml,
    format_split_toml,
    parse_split_toml,
    split_key,
    split_toml_datasets,
    write_split_toml,
)
from tahoe_ft.errors import UserError

CTRL = "non-targeting"


def write_screen(path: Path, perts_of: dict[str, list[str]], *, n: int = 6, seed: int = 0) -> Path:
    """A tiny log1p screen: `n` cells of each listed perturbation and 2n controls per cell type."""
    rng = np.random.default_rng(seed)
    rows = [
        (p, ct)
        for ct, perts in perts_of.items()
        for p in [CTRL] * (2 * n) + [q for q in perts for _ in range(n)]
    ]
    obs = pd.DataFrame(rows, columns=["target_gene", "cell_type"], index=[f"c{i}" for i in range(len(rows))])
    X = np.log1p(rng.poisson(3.0, (len(rows), 12)) * rng.uniform(0.5, 1.5, (len(rows), 12))).astype(
        np.float32
    )
    ad.AnnData(X, obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(12)])).write_h5ad(path)
    return path


# -- the writer and the reader -------------------------------------------------------------------------------


def test_round_trip_with_dots_spaces_and_odd_names(tmp_path):
    files = {name: tmp_path / f"{name}.h5ad" for name in ("k562", "k562.v2", "k562 only")}
    for f in files.values():
        f.touch()
    fewshot = {
        ("k562.v2", "K562"): {"val": ['say "hi"', "back\\slash"], "test": ["é-ü", "TP53"]},
        ("k562 only", "K562"): {"val": [], "test": ["TP53"]},
        ("k562", "CD4.T cells"): {"val": ["A"], "test": []},  # a dot in the cell type: after the dataset
    }
    zeroshot = {("k562", "HepG2"): "test", ("k562.v2", "RPE1"): "val"}
    path = write_split_toml(
        tmp_path / "split.toml",
        {name: str(f) for name, f in files.items()},
        zeroshot=zeroshot,
        fewshot=fewshot,
        header="two lines\nof header",
    )
    text = path.read_text(encoding="utf-8")
    assert text.startswith("# two lines\n# of header\n[datasets]\n")
    assert '"k562.v2" = ' in text and '[fewshot."k562 only.K562"]' in text  # quoted keys
    parsed = parse_split_toml(path)
    assert parsed == SplitToml({n: [f] for n, f in files.items()}, zeroshot, fewshot)
    # written back from its entries (as the refit writes a split without its validation lists): the same split
    again = write_split_toml(tmp_path / "again.toml", **parsed.entries())
    assert parse_split_toml(again) == parsed
    assert parsed.path == path and ReExported is SplitToml  # still importable from data.inputs


def test_keys_are_read_against_the_longest_dataset_name(tmp_path):
    assert split_key("k562.v2.K562", ["k562", "k562.v2"]) == ("k562.v2", "K562")
    assert split_key("k562.CD4.T", ["k562", "k562.v2"]) == ("k562", "CD4.T")
    assert split_key("k562.", ["k562"]) is None and split_key("other.A", ["k562"]) is None
    # bare dotted keys, which TOML nests, read the same as the quoted ones
    f = tmp_path / "k562.v2.h5ad"
    f.touch()
    toml = tmp_path / "bare.toml"
    toml.write_text(
        f'[datasets]\nk562.v2 = "{f}"\n[zeroshot]\nk562.v2.HepG2 = "val"\n[fewshot.k562.v2.K562]\ntest = ["A"]\n'
    )
    parsed = parse_split_toml(toml)
    assert parsed.datasets == {"k562.v2": [f]}
    assert split_toml_datasets(toml) == ["k562.v2"]  # how `upstream_folder` counts them, without the files
    assert parsed.zeroshot == {("k562.v2", "HepG2"): "val"}
    assert parsed.fewshot == {("k562.v2", "K562"): {"val": [], "test": ["A"]}}


def test_the_writer_refuses_what_would_not_read_back(tmp_path):
    with pytest.raises(ValueError, match="not in \\[datasets\\]"):
        format_split_toml({"a": "a.h5ad"}, fewshot={("b", "A"): {"val": [], "test": []}})
    with pytest.raises(ValueError, match="read back as"):  # "a.v2" + "A" reads as dataset "a.v2"
        format_split_toml({"a": "x", "a.v2": "y"}, fewshot={("a", "v2.A"): {"test": []}})
    with pytest.raises(ValueError, match="not val or test"):
        format_split_toml({"a": "x"}, zeroshot={("a", "A"): "train"})


def test_a_path_with_glob_characters_is_that_file(tmp_path):
    f = tmp_path / "screen[1].h5ad"
    f.touch()
    (tmp_path / "screen1.h5ad").touch()  # what the glob `screen[1].h5ad` would match
    toml = write_split_toml(tmp_path / "s.toml", {"s": str(f)})
    assert parse_split_toml(toml).datasets == {"s": [f]}


def _old_fold_toml(i: int, k: int, files: dict, sections: list, val: list[str], test: list[str]) -> str:
    """study/folds.py `_toml` before issue #31 (bare [datasets] keys, every perturbation in every section)."""
    q = json.dumps
    lines = [f"# tahoe-ft fold {i} of {k} (tahoe_ft.study.folds.make_folds)", "[datasets]"]
    lines += [f"{ds} = [{', '.join(q(str(Path(f).resolve())) for f in fs)}]" for ds, fs in files.items()]
    lines += ["", "[training]", *[f'{ds} = "train"' for ds in files], ""]
    for ds, ct in sections:
        lines += [f"[fewshot.{q(f'{ds}.{ct}')}]", f"val = [{', '.join(map(q, val))}]",
                  f"test = [{', '.join(map(q, test))}]", ""]  # fmt: skip
    return "\n".join(lines)


def _old_demo_toml(dataset: str, path: Path, cell_types: list[str], val: list[str], test: list[str]) -> str:
    """datasets/demo.py `_split_toml` before issue #31."""
    lines = ["# demo", "[datasets]", f"{dataset} = {json.dumps(str(path))}", "", "[training]",
             f'{dataset} = "train"', ""]  # fmt: skip
    for ct in cell_types:
        lines += [f'[fewshot."{dataset}.{ct}"]', f"val = {json.dumps(val)}", f"test = {json.dumps(test)}", ""]
    return "\n".join(lines)


def _old_toml_text(doc: dict) -> str:
    """checkpoints/upstream_folder.py `_toml_text` before issue #31 (what export-state wrote)."""

    def q(s):
        return '"' + str(s).replace("\\", "\\\\").replace('"', '\\"') + '"'

    def val(v):
        return "[" + ", ".join(q(x) for x in v) + "]" if isinstance(v, list | tuple) else q(v)

    lines = []
    for section in ("datasets", "training", "zeroshot"):
        if doc.get(section):
            lines += [f"[{section}]", *[f"{q(k)} = {val(v)}" for k, v in doc[section].items()], ""]
    for key, table in (doc.get("fewshot") or {}).items():
        lines += [f"[fewshot.{q(key)}]", *[f"{s} = {val(table.get(s, []))}" for s in ("val", "test")], ""]
    return "\n".join(lines)


def test_every_writer_reads_back_as_its_old_text_did(tmp_path):
    from tahoe_ft.checkpoints.upstream_export import split_toml_of
    from tahoe_ft.datasets.demo import _split_toml

    a, b = tmp_path / "screen.h5ad", tmp_path / "other.h5ad"
    a.touch()
    b.touch()

    def same(old: str, new: str) -> SplitToml:
        (tmp_path / "old.toml").write_text(old)
        (tmp_path / "new.toml").write_text(new)
        parsed = parse_split_toml(tmp_path / "new.toml")
        assert parsed == parse_split_toml(tmp_path / "old.toml")
        return parsed

    # the demo's split
    parsed = same(_old_demo_toml("screen", a, ["CT0", "CT1"], ["G1", "G2"], ["G3"]),
                  _split_toml("screen", a, ["CT0", "CT1"], ["G1", "G2"], ["G3"]))  # fmt: skip
    assert parsed.fewshot[("screen", "CT1")] == {"val": ["G1", "G2"], "test": ["G3"]}
    # export-state's split: held-out groups of two datasets (one of two files)
    manifest = SimpleNamespace(
        datasets=["screen", "other", "other"], data_paths=[str(a), str(b), str(b)], cell_types=["A", "B"],
        held_out=[{"dataset": "screen", "cell_type": "A", "pert": "P2", "split": "test"},
                  {"dataset": "screen", "cell_type": "A", "pert": "P1", "split": "val"},
                  {"dataset": "other", "cell_type": "B", "pert": "P1", "split": "test"}],
        splits={"val": ["P1"], "test": ["P1", "P2"]},
    )  # fmt: skip
    doc = {
        "datasets": {"screen": str(a), "other": [str(b), str(b)]},
        "training": {"screen": "train", "other": "train"},
        "fewshot": {"other.B": {"val": [], "test": ["P1"]}, "screen.A": {"val": ["P1"], "test": ["P2"]}},
    }
    parsed = same(_old_toml_text(doc), split_toml_of(manifest))
    assert parsed.fewshot == {
        ("other", "B"): {"val": [], "test": ["P1"]},
        ("screen", "A"): {"val": ["P1"], "test": ["P2"]},
    }
    # a fold's TOML (the new dealer lists fewer perturbations; the writer alone reads back the same)
    from tahoe_ft.data.split_file import format_split_toml as fmt

    files, sections = {"screen": [str(a)]}, [("screen", "A"), ("screen", "B")]
    new = fmt(files, fewshot={s: {"val": ["P1"], "test": ["P2", "P3"]} for s in sections})
    same(_old_fold_toml(0, 2, files, sections, ["P1"], ["P2", "P3"]), new)


# -- disjoint splits -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_files(tmp_path_factory) -> dict[str, Path]:
    """x.h5ad and y.h5ad, both of cell type K, with P1..P3; y also has cell type H."""
    d = tmp_path_factory.mktemp("split-screens")
    return {
        "x": write_screen(d / "x.h5ad", {"K": ["P1", "P2", "P3"]}, seed=1),
        "y": write_screen(d / "y.h5ad", {"K": ["P1", "P2", "P3"], "H": ["P1", "P2"]}, seed=2),
        "dir": d,
    }


def _open(**cfg) -> CellCatalog:
    return CellCatalog.open(DataConfig(**cfg))


def test_config_lists_refuse_a_perturbation_in_val_and_test(two_files):
    with pytest.raises(UserError, match="'P2' is in both data.val_perts and data.test_perts"):
        _open(path=str(two_files["x"]), val_perts=["P1", "P2"], test_perts=["P2"])
    with pytest.raises(UserError, match="'H' is in both data.val_cell_types and data.test_cell_types"):
        _open(path=str(two_files["y"]), val_cell_types=["H"], test_cell_types=["H"])
    cat = _open(path=str(two_files["x"]), val_perts=["P1"], test_perts=["P2"])  # disjoint: fine
    assert list(cat.groups("test")) == [GroupKey("x", "K", "P2")]


def _toml(two_files, tmp_path, fewshot=None, zeroshot=None) -> str:
    files = {"x": str(two_files["x"]), "y": str(two_files["y"])}
    return str(
        write_split_toml(tmp_path / "split.toml", files, fewshot=fewshot or {}, zeroshot=zeroshot or {})
    )


def test_a_toml_refuses_val_and_test_overlap_per_cell_type(two_files, tmp_path):
    # in one table
    toml = _toml(
        two_files, tmp_path, {("x", "K"): {"val": ["P1"], "test": ["P1"]}, ("y", "K"): {"val": ["P1"]}}
    )
    with pytest.raises(UserError) as err:
        _open(split_toml=toml)
    assert str(err.value) == (
        f"split TOML {toml}: perturbation 'P1' of cell type 'K' is val in [fewshot.\"x.K\"] and test in "
        '[fewshot."x.K"]; list it in val or in test, not both'
    )
    # across the two datasets of one cell type
    toml = _toml(two_files, tmp_path, {("x", "K"): {"val": ["P1"]}, ("y", "K"): {"test": ["P1"]}})
    with pytest.raises(
        UserError,
        match=r"'P1' of cell type 'K' is val in \[fewshot.\"x.K\"\] and test in \[fewshot.\"y.K\"\]",
    ):
        _open(split_toml=toml)


def test_a_toml_refuses_a_held_out_group_that_trains_through_another_file(two_files, tmp_path):
    toml = _toml(two_files, tmp_path, {("x", "K"): {"test": ["P2"]}})
    with pytest.raises(
        UserError, match=r"'P2' of cell type 'K' is test in \[fewshot.\"x.K\"\] and trains in dataset 'y'"
    ):
        _open(split_toml=toml)
    toml = _toml(two_files, tmp_path, zeroshot={("y", "K"): "val"})  # x's K cells still train
    with pytest.raises(
        UserError, match=r"of cell type 'K' is val in \[zeroshot\] \"y.K\" and trains in dataset 'x'"
    ):
        _open(split_toml=toml)
    # held out in every dataset of K: fine, and H (y only) still trains P2
    held = {"val": ["P1"], "test": ["P2"]}
    toml = _toml(two_files, tmp_path, {("x", "K"): held, ("y", "K"): held})
    cat = _open(split_toml=toml)
    assert set(cat.groups("test")) == {GroupKey("x", "K", "P2"), GroupKey("y", "K", "P2")}
    assert GroupKey("y", "H", "P2") in cat.groups("train")
