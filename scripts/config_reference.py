#!/usr/bin/env python
"""Write the configuration reference in docs/configuration.md from the real configs, so it cannot drift.

Every key of every command's composed config (``msnet train``, ``evaluate``, ``transfer``,
``report``) with its type, default and meaning (the comment beside its field in
``msnet/config.py``), then every option of every config group with the keys it changes.
The text goes between the page's markers; ``tests/test_docs.py`` fails when the committed
page differs from what this prints.

    .venv/bin/python scripts/config_reference.py           # rewrite the section of docs/configuration.md
    .venv/bin/python scripts/config_reference.py --check   # exit 1 if the page is out of date
    .venv/bin/python scripts/config_reference.py --print   # print the section
"""

from __future__ import annotations

import argparse
import ast
import sys
from enum import Enum
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

from omegaconf import DictConfig, ListConfig, OmegaConf

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "configuration.md"
BEGIN, END = "<!-- config-reference:begin -->", "<!-- config-reference:end -->"
sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/_marked.py, also when a test loads this file by path
from _marked import MarkedSection  # noqa: E402

SECTION = MarkedSection(PAGE, BEGIN, END, "config_reference")
COMMANDS = ("train", "evaluate", "transfer", "report")
GROUPS = ("dataset", "model", "optimizer", "trainer", "logger", "pyramid", "depth", "experiment")
OPTIONAL_GROUPS = ("pyramid", "depth")  # not in train's defaults list: +pyramid=NAME


def field_comments() -> Dict[Tuple[str, str], str]:
    """``(class name, field name) -> the comment on the field's line`` in msnet/config.py."""
    import msnet.config as config

    source = Path(config.__file__).read_text()
    lines = source.splitlines()
    out: Dict[Tuple[str, str], str] = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    line = lines[item.lineno - 1]
                    if "  # " in line:
                        out[(node.name, item.target.id)] = line.split("  # ", 1)[1].strip()
    return out


def _comment(comments: Dict[Tuple[str, str], str], parent: Any, key: str) -> str:
    """The comment of ``key`` in the schema class of ``parent`` or one of its bases."""
    cls = OmegaConf.get_type(parent)
    if getattr(cls, "__name__", "") == "DatasetOverride":  # evaluate's dataset: every field of train's, or null
        return "null: the checkpoint's value; anything else replaces it"
    for base in getattr(cls, "__mro__", ()):
        if (base.__name__, key) in comments:
            return comments[(base.__name__, key)].replace("|", "\\|")
    return ""


def _type(node: Any) -> str:
    """A node's declared type as the reference shows it: int, float, bool, str, list, one of a|b, ...?"""
    meta = node._metadata
    ref = meta.ref_type
    if isinstance(ref, type) and issubclass(ref, Enum):
        name = " \\| ".join(m.value for m in ref)
    elif isinstance(node, ListConfig) or "List" in str(ref):
        name = "list"
    else:
        name = getattr(ref, "__name__", None) or "any"
        name = "any" if name == "Any" else name
    return name + (" or null" if meta.optional and name != "any" else "")


def _node_value(node: Any) -> str:
    if isinstance(node, ListConfig):
        return "null" if node._is_none() else _value(list(node))
    return _value(node._value())


def _value(value: Any) -> str:
    if isinstance(value, Enum):
        return str(value.value)
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, (list, ListConfig)):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    return str(value)


def leaves(cfg: DictConfig, prefix: str = "") -> Iterator[Tuple[str, Any, DictConfig, str]]:
    """``(dotted key, node, parent, key)`` for every leaf of ``cfg`` but ``hydra``, in the config's order."""
    for key in cfg.keys():
        if not prefix and key == "hydra":
            continue
        node = cfg._get_node(key)
        if isinstance(node, DictConfig) and not node._is_none():
            yield from leaves(node, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", node, cfg, str(key)


def command_table(name: str, comments: Dict[Tuple[str, str], str]) -> List[str]:
    """The rows of one command's keys: key, type, default, meaning."""
    from msnet.config import compose_config

    cfg = compose_config([], name)
    rows = [f"### `msnet {name}`", "", "| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for dotted, node, parent, key in leaves(cfg):
        rows.append(f"| `{dotted}` | {_type(node)} | `{_node_value(node)}` | {_comment(comments, parent, key)} |")
    return rows + [""]


def _flat(cfg: DictConfig) -> Dict[str, str]:
    return {dotted: _node_value(node) for dotted, node, _, _ in leaves(cfg)}


def group_tables() -> List[str]:
    """Every option of every config group, with the keys of ``msnet train`` it sets differently."""
    from msnet.config import compose_config

    base = _flat(compose_config([], "train"))
    rows = ["### Config groups: what each option changes", "",
            "Each option's keys that differ from plain `msnet train` (for `+pyramid=` and `+depth=`, every key "
            "of the group).", "", "| option | changes |", "| --- | --- |"]
    for group in GROUPS:
        for path in sorted((REPO / "conf" / group).glob("*.yaml")):
            typed = f"+{group}={path.stem}" if group in OPTIONAL_GROUPS else f"{group}={path.stem}"
            flat = _flat(compose_config([typed], "train"))
            changed = [f"`{k}={v}`" for k, v in flat.items() if base.get(k) != v and not k.startswith("hydra.")]
            rows.append(f"| `{typed}` | {', '.join(changed) if changed else '(the default)'} |")
    for path in sorted((REPO / "conf" / "hydra" / "launcher").glob("*.yaml")):
        keys = OmegaConf.to_container(OmegaConf.load(path), resolve=False)  # ${hydra.sweep.dir} stays as typed
        shown = [f"`hydra.launcher.{k}={_value(v)}`" for k, v in keys.items() if k not in ("defaults", "_target_")]
        rows.append(f"| `hydra/launcher={path.stem}` (with `-m`) | {', '.join(shown)} |")
    return rows + [""]


def reference() -> str:
    """The whole generated section (markdown, between the markers)."""
    comments = field_comments()
    lines = ["<!-- generated by scripts/config_reference.py; edit msnet/config.py or conf/, then rerun it -->", ""]
    for name in COMMANDS:
        lines += command_table(name, comments)
    lines += group_tables()
    return "\n".join(lines).rstrip() + "\n"


def page_section(text: str) -> str:
    """What stands between the markers of a page's text."""
    return SECTION.current(text)


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/configuration.md is out of date")
    parser.add_argument("--print", action="store_true", help="print the section instead of writing it")
    args = parser.parse_args(argv)
    new = reference()
    if args.print:
        sys.stdout.write(new)
        return 0
    return SECTION.update(new, args.check)


if __name__ == "__main__":
    raise SystemExit(main())
