"""The one writer and reader of cell-load style split TOMLs.

A split TOML names the screens (`[datasets]`: a file, a list, a folder or a glob with `{a,b}` braces), which
of them train (`[training]`), whole cell types held out (`[zeroshot]`, `"<dataset>.<cell type>" = "val"`) and
perturbations held out in one dataset's cell type (`[fewshot."<dataset>.<cell type>"]`, `val = [...]`,
`test = [...]`). Everything tahoe-ft writes (the demo's splits, the folds of `reproduce`/`sweep`, an exported
run folder's split) goes through `format_split_toml`, and everything it reads through `parse_split_toml`:

- every key is a quoted TOML string, so a dataset named after a file stem with dots or spaces
  (`k562.v2.h5ad` -> `k562.v2`) stays one key;
- a `"<dataset>.<cell type>"` key is read against the dataset names of `[datasets]`: the longest name that
  is followed by `.` is the dataset, the rest the cell type (cell types may hold dots too). Bare dotted keys
  (`[fewshot.k562.K562]`, which TOML nests) are read the same way.
"""

from __future__ import annotations

import glob
import json
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tahoe_ft.errors import UserError
from tahoe_ft.fileio import atomic_path

Key = tuple[str, str]  # (dataset, cell type)
SECTIONS = ("datasets", "training", "zeroshot", "fewshot")
HELD_OUT = ("val", "test")


@dataclass
class SplitToml:
    """A cell-load style split TOML, parsed: dataset -> files, zeroshot and fewshot entries."""

    datasets: dict[str, list[Path]]
    zeroshot: dict[Key, str]
    fewshot: dict[Key, dict[str, list[str]]]
    path: Path | None = field(default=None, compare=False)  # the file read, for messages

    def entries(self) -> dict[str, Any]:
        """`format_split_toml`'s arguments for this split (files as absolute paths), to write it back changed:
        `write_split_toml(out, **{**split.entries(), "fewshot": {...}})`."""
        return {
            "datasets": {ds: [str(f.resolve()) for f in files] for ds, files in self.datasets.items()},
            "zeroshot": dict(self.zeroshot),
            "fewshot": {key: {s: list(v) for s, v in table.items()} for key, table in self.fewshot.items()},
        }


# -- writing ---------------------------------------------------------------------------------------------


def toml_string(s: Any) -> str:
    """`s` as a TOML basic string: JSON's escapes are TOML's; non-ASCII stays as it is (JSON's `\\ud83d`
    surrogate pairs are not valid TOML) and DEL, the one control character JSON leaves raw, is escaped."""
    return json.dumps(str(s), ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml_list(names: Iterable[Any]) -> str:
    return "[" + ", ".join(toml_string(n) for n in names) + "]"


def format_split_toml(
    datasets: Mapping[str, str | os.PathLike | Sequence[str | os.PathLike]],
    *,
    training: Mapping[str, str] | None = None,
    zeroshot: Mapping[Key, str] | None = None,
    fewshot: Mapping[Key, Mapping[str, Sequence[str]]] | None = None,
    header: str | None = None,
) -> str:
    """A split TOML's text; `parse_split_toml` reads it back to the same entries.

    `datasets`: name -> one path or a list (written as given: a relative path stays relative); `training`:
    name -> "train" (default: every dataset trains); `zeroshot`: (dataset, cell type) -> "val" | "test";
    `fewshot`: (dataset, cell type) -> {"val": [...], "test": [...]} (a missing list is written empty);
    `header`: comment lines at the top. Raises ValueError on entries that would not read back as given (an
    unknown dataset, a split other than val/test, a key the longest-dataset rule would read differently).
    """
    names = [str(d) for d in datasets]
    training = {d: "train" for d in names} if training is None else dict(training)
    zeroshot, fewshot = dict(zeroshot or {}), dict(fewshot or {})
    for section, keys in (
        ("training", [(d, "") for d in training]),
        ("zeroshot", zeroshot),
        ("fewshot", fewshot),
    ):
        for ds, ct in keys:
            if ds not in datasets:
                raise ValueError(f"split TOML [{section}] names dataset {ds!r}, which is not in [datasets]")
            if section != "training" and split_key(f"{ds}.{ct}", names) != (ds, ct):
                raise ValueError(
                    f"split TOML key {ds}.{ct} would read back as {split_key(f'{ds}.{ct}', names)}"
                )
    for key, split in zeroshot.items():
        if split not in HELD_OUT:
            raise ValueError(f"split TOML [zeroshot] {key}: {split!r} is not val or test")
    for key, table in fewshot.items():
        if set(table) - set(HELD_OUT):
            raise ValueError(f"split TOML [fewshot] {key}: only val and test lists, not {sorted(table)}")
    lines = [f"# {line}" for line in (header.splitlines() if header else [])]
    lines.append("[datasets]")
    for ds, spec in datasets.items():
        value = _toml_list(spec) if isinstance(spec, list | tuple) else toml_string(spec)
        lines.append(f"{toml_string(ds)} = {value}")
    lines += ["", "[training]", *[f"{toml_string(d)} = {toml_string(v)}" for d, v in training.items()], ""]
    if zeroshot:
        lines.append("[zeroshot]")
        lines += [f"{toml_string(f'{ds}.{ct}')} = {toml_string(s)}" for (ds, ct), s in zeroshot.items()]
        lines.append("")
    for (ds, ct), table in fewshot.items():
        lines.append(f"[fewshot.{toml_string(f'{ds}.{ct}')}]")
        lines += [f"{s} = {_toml_list(table.get(s, []))}" for s in HELD_OUT]
        lines.append("")
    return "\n".join(lines)


def write_split_toml(
    path: str | os.PathLike,
    datasets: Mapping[str, str | os.PathLike | Sequence[str | os.PathLike]],
    **entries: Any,
) -> Path:
    """`format_split_toml(datasets, **entries)` written to `path` atomically (UTF-8); returns the path."""
    text = format_split_toml(datasets, **entries)
    with atomic_path(path) as tmp:  # UTF-8 whatever the locale: TOML files are UTF-8
        Path(tmp).write_text(text, encoding="utf-8")
    return Path(path)


# -- reading ---------------------------------------------------------------------------------------------


def split_key(key: str, datasets: Iterable[str]) -> Key | None:
    """("dataset", "cell type") of a `"<dataset>.<cell type>"` key: the longest of `datasets` that the key
    starts with, followed by a dot and a non-empty cell type; None when no dataset fits."""
    best = None
    for ds in datasets:
        if key.startswith(ds + ".") and len(key) > len(ds) + 1 and (best is None or len(ds) > len(best)):
            best = ds
    return None if best is None else (best, key[len(best) + 1 :])


def _flatten(table: dict, is_leaf: Callable[[Any], bool], prefix: str = "") -> dict[str, Any]:
    """`{"a.b": leaf}` of a section that TOML nested from bare dotted keys (`a.b = ...`, `[fewshot.a.b]`)."""
    out: dict[str, Any] = {}
    for k, v in table.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and not is_leaf(v):
            out.update(_flatten(v, is_leaf, key))
        else:
            out[key] = v
    return out


def _expand_braces(pattern: str) -> list[str]:
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    out: list[str] = []
    for alt in m.group(1).split(","):
        out.extend(_expand_braces(pattern[: m.start()] + alt + pattern[m.end() :]))
    return out


def _dataset_files(name: str, spec: Any, toml_path: Path) -> list[Path]:
    """cell-load's [datasets] entry: a directory, a file, or a glob with {a,b} braces."""
    specs = spec if isinstance(spec, list) else [spec]
    files: list[Path] = []
    for s in specs:
        if not isinstance(s, str):
            raise UserError(
                f"split TOML {toml_path}: dataset '{name}' = {s!r} is not a path; "
                'write name = "path" or name = ["path", ...] in [datasets]'
            )
        # a path that exists as written is that file, even with [ ] { } * in its name
        for pat in [s] if _existing(s, toml_path) else _expand_braces(s):
            # relative paths: the current directory first (as cell-load does), then the TOML's folder
            bases = [Path(pat)] if Path(pat).is_absolute() else [Path(pat), toml_path.parent / pat]
            found: list[Path] = []
            for cand in bases:
                if cand.is_dir():
                    found = sorted(q for q in cand.iterdir() if q.suffix in (".h5", ".h5ad"))
                elif cand.is_file():
                    found = [cand]
                elif glob.has_magic(str(cand)):
                    found = sorted(Path(q) for q in glob.glob(str(cand)))
                if found:
                    break
            if not found:
                raise UserError(
                    f"split TOML {toml_path}: dataset '{name}' path '{pat}' matches no file; "
                    "fix the path in [datasets] (relative paths are tried from the current directory, "
                    "then from the TOML's folder)"
                )
            files.extend(found)
    return files


def _existing(spec: str, toml_path: Path) -> bool:
    p = Path(spec)
    return p.exists() or (not p.is_absolute() and (toml_path.parent / p).exists())


def _never(v: Any) -> bool:
    return False


def _is_fewshot_table(v: Any) -> bool:
    return isinstance(v, dict) and not any(isinstance(x, dict) for x in v.values())


def _read_toml(p: Path) -> dict[str, Any]:
    if not p.is_file():
        raise UserError(f"split TOML not found: {p}; check data.split_toml")
    try:
        with p.open("rb") as fh:
            return tomllib.load(fh)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot parse split TOML {p} ({exc}); fix its syntax") from None


def split_toml_datasets(path: str | os.PathLike) -> list[str]:
    """The dataset names of a split TOML's `[datasets]` table, without resolving their files."""
    raw = _read_toml(Path(path)).get("datasets", {})
    return list(_flatten(raw, _never)) if isinstance(raw, dict) else []


def parse_split_toml(
    path: str | os.PathLike, *, files: Mapping[str, Sequence[str | os.PathLike]] | None = None
) -> SplitToml:
    """Read and check a split TOML; `[datasets]` entries are resolved to files (see `_dataset_files`).

    `files`: dataset -> the files to use instead of the TOML's own paths (which may be on another machine);
    each must exist. The `"<dataset>.<cell type>"` keys are read as the module docstring says.
    """
    p = Path(path)
    doc = _read_toml(p)
    unknown = set(doc) - set(SECTIONS)
    if unknown:
        raise UserError(
            f"split TOML {p} has unknown sections {sorted(unknown)}; "
            'use [datasets], [training], [zeroshot], [fewshot."<dataset>.<cell type>"]'
        )
    for section in SECTIONS[1:]:
        if not isinstance(doc.get(section, {}), dict):
            raise UserError(f"split TOML {p}: {section} is not a table; write it as [{section}]")
    raw_ds = doc.get("datasets", {})
    if not isinstance(raw_ds, dict) or not raw_ds:
        raise UserError(f'split TOML {p} has no [datasets] table; add name = "path" entries')
    raw_ds = _flatten(raw_ds, _never)
    datasets = {}
    for name, spec in raw_ds.items():
        if files is not None and name in files:
            given = [Path(f) for f in files[name]]
            for f in given:
                if not f.is_file():
                    raise UserError(f"data file {f} not found; check data_path=")
            datasets[name] = given
        else:
            datasets[name] = _dataset_files(name, spec, p)

    def key_of(section: str, key: str) -> Key:
        found = split_key(key, datasets)
        if found is None:
            raise UserError(
                f"split TOML {p}: [{section}] key '{key}' is not '<dataset>.<cell type>' with a dataset from "
                f"[datasets] ({', '.join(datasets)}); fix the key"
            )
        return found

    for ds in _flatten(doc.get("training", {}), _never):
        if ds not in datasets:
            raise UserError(f"split TOML {p}: [training] names unknown dataset '{ds}'; add it to [datasets]")
    zeroshot = {}
    for key, split in _flatten(doc.get("zeroshot", {}), _never).items():
        if split not in HELD_OUT:
            raise UserError(f"split TOML {p}: [zeroshot] '{key}' = '{split}'; use \"val\" or \"test\"")
        zeroshot[key_of("zeroshot", key)] = split
    fewshot = {}
    for key, table in _flatten(doc.get("fewshot", {}), _is_fewshot_table).items():
        if not isinstance(table, dict) or set(table) - set(HELD_OUT):
            raise UserError(f'split TOML {p}: [fewshot."{key}"] may only hold val = [...] and test = [...]')
        lists = {s: table.get(s, []) for s in HELD_OUT}
        if not all(isinstance(v, list) for v in lists.values()):
            raise UserError(f'split TOML {p}: [fewshot."{key}"] val and test must be lists of names')
        fewshot[key_of("fewshot", key)] = {s: [str(x) for x in v] for s, v in lists.items()}
    return SplitToml(datasets, zeroshot, fewshot, p)
