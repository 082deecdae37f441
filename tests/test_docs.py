"""The README and docs/ cannot drift from the code: links resolve, commands compose, references are generated."""

from __future__ import annotations

import importlib.util
import re
import shlex
import sys
import unicodedata
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

import pytest
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted(p for p in (ROOT / "docs").rglob("*.md") if "_incoming" not in p.parts)]
"""The README and the docs pages; docs/_incoming/ holds helpers' drafts for the lead to place, not pages."""
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
SETUP_COMMANDS = ("./scripts/setup.sh && .venv/bin/msnet train", "./scripts/setup.sh && .venv/bin/python -m pytest -q")


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _prose(text: str) -> Iterator[str]:
    """The lines of a markdown text outside fenced code blocks."""
    fence = False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fence = not fence
            continue
        if not fence:
            yield line


def _code_blocks(text: str, language: str) -> Iterator[str]:
    """The lines of the fenced code blocks that open with ```language."""
    inside = False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("```"):
            inside = not inside and stripped == f"```{language}"
            continue
        if inside:
            yield line


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but hyphens and underscores dropped, spaces to hyphens."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    text = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return text.replace(" ", "-")


def anchors(path: Path) -> Set[str]:
    found: Set[str] = set()
    for line in _prose(path.read_text()):
        if re.match(r"^#{1,6} ", line):
            base = slug(line.lstrip("#"))
            name, n = base, 1
            while name in found:
                name, n = f"{base}-{n}", n + 1
            found.add(name)
    return found


def links(path: Path) -> List[Tuple[str, Path, str]]:
    """``(link as written, target file, anchor)`` for every relative link of a page, outside code blocks."""
    out = []
    for line in _prose(path.read_text()):
        for target in LINK.findall(line):
            if re.match(r"^[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            out.append((target, (path.parent / file).resolve() if file else path, anchor))
    return out


def test_readme_is_short_and_keeps_the_two_set_up_commands():
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    for command in SETUP_COMMANDS:
        assert f"```bash\n{command}\n```" in text, command
    assert SETUP_COMMANDS[1] in (ROOT / ".ci" / "run").read_text()  # CI runs the README's test command


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    assert links(page) or page.name != "README.md"
    for target, file, anchor in links(page):
        assert file.exists(), f"{page.relative_to(ROOT)}: {target} -> {file} does not exist"
        if anchor and file.suffix == ".md":
            assert anchor in anchors(file), f"{page.relative_to(ROOT)}: {target}: no heading #{anchor} in {file.name}"


def test_the_slug_is_githubs():
    assert slug("MG/OPT: does it pay?") == "mgopt-does-it-pay"
    assert slug("Shallow-to-deep: the paper's Figure 2") == "shallow-to-deep-the-papers-figure-2"
    assert slug("`msnet train`") == "msnet-train"


def test_every_page_is_within_two_clicks_of_the_readme():
    reach: Dict[Path, int] = {README.resolve(): 0}
    frontier = [README.resolve()]
    for clicks in (1, 2):
        nxt = []
        for page in frontier:
            for _, file, _ in links(page):
                if file.suffix == ".md" and file.exists() and file not in reach:
                    reach[file] = clicks
                    nxt.append(file)
        frontier = nxt
    far = [p.relative_to(ROOT) for p in PAGES if p.resolve() not in reach]
    assert not far, f"more than two clicks from the README: {far}"


def doc_commands() -> List[Tuple[str, str]]:
    """``(page, command line)`` for every ``msnet COMMAND ...`` line of the bash blocks, continuations joined."""
    out = []
    for page in PAGES:
        joined = ""
        for line in _code_blocks(page.read_text(), "bash"):
            joined = joined + " " + line.strip() if joined else line.strip()
            if joined.endswith("\\"):
                joined = joined[:-1].rstrip()
                continue
            command, joined = joined.split(" #")[0].strip(), ""
            words = command.split()
            if len(words) > 1 and words[0] == "msnet" and not words[1].startswith("-") and "..." not in command:
                out.append((str(page.relative_to(ROOT)), command))
    return out


COMMANDS = doc_commands()


def test_the_docs_show_commands():
    assert len(COMMANDS) > 40 and any(c.startswith("msnet transfer") for _, c in COMMANDS)


@pytest.mark.filterwarnings("ignore:(?s).*is validated against ConfigStore schema")  # as msnet.commands does
@pytest.mark.parametrize("page,command", COMMANDS, ids=[f"{p}:{c[:60]}" for p, c in COMMANDS])
def test_every_documented_command_composes(page, command):
    """``msnet ... --cfg job`` for each command line of the docs, through the dispatcher's own argv rewrite."""
    from hydra.core.override_parser.types import IntervalSweep

    from msnet.cli import rewrite
    from msnet.config import register_configs

    words = shlex.split(command)
    name, args = words[1], rewrite(words[1], words[2:])
    overrides, skip = [], False
    for arg in args:
        if skip or arg in ("-m", "--multirun", "--help", "-h"):
            skip = False
            continue
        if arg in ("--cfg", "-c"):
            skip = True
            continue
        assert not arg.startswith("-"), f"{page}: {command}: flag {arg} not understood by this test"
        parsed = OverridesParser.create().parse_override(arg)
        if parsed.is_sweep_override():  # a -m sweep: compose its first job (an Optuna interval: its lower end)
            value = parsed.value()
            first = value.start if isinstance(value, IntervalSweep) else next(iter(parsed.sweep_string_iterator()))
            arg = f"{parsed.get_key_element()}={first}"
        overrides.append(arg)
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="msnet.conf", version_base="1.3"):
        cfg = compose(config_name=name, overrides=overrides, return_hydra_config=True)
    assert cfg.hydra.job.name == name


def test_configuration_reference_is_generated_from_the_configs():
    ref = _script("config_reference")
    text = ref.PAGE.read_text()
    assert ref.page_section(text) == ref.reference(), "docs/configuration.md is stale: run scripts/config_reference.py"
    from msnet.config import compose_config

    for dotted, *_ in ref.leaves(compose_config([], "train")):  # every key of the composed train config
        assert f"| `{dotted}` |" in text, dotted


def test_error_reference_is_generated_from_the_code():
    ref = _script("error_reference")
    assert ref.page_section(ref.PAGE.read_text()) == ref.reference(), (
        "docs/troubleshooting.md is stale: run scripts/error_reference.py")
    assert len(ref.messages()) > 100


# Lines msnet prints that are not MsnetError messages: the template and the file that builds it.
OTHER_ERRORS = [
    ("<override>: <key> takes <type>, e.g. <example>", "msnet/commands/__init__.py", ["takes ", ", e.g. "]),
    ("<override>: <parent> has no key <key>; did you mean <keys>?", "msnet/config.py", ["has no key ", "did you mean "]),
    ("<override>: the group <group> has no option <option>; choose one of <options>", "msnet/commands/__init__.py",
     ["has no option ", "; choose one of "]),
    ("<override>: <group> is not in the defaults list; add it with a plus: <plus>", "msnet/commands/__init__.py",
     ["is not in the defaults list; add it with a plus: +"]),
    ("<override>: the group <group> is off, so its keys cannot be set; select it first, e.g. <example>",
     "msnet/commands/__init__.py", ["is off, so its keys cannot be set; select it first, ", "e.g. +{group}="]),
    ("unknown command <command>; choose one of: <commands> (msnet --help)", "msnet/cli.py", ["unknown command ", "(msnet --help)"]),
]


def test_every_quoted_error_line_is_real():
    """Each ``error: ...`` line the troubleshooting page quotes is a message msnet's code prints."""
    ref = _script("error_reference")
    templates = [text for _, _, text in ref.messages()]
    for template, source, fragments in OTHER_ERRORS:
        code = (ROOT / source).read_text()
        assert all(f in code for f in fragments), (template, source)
        templates.append(template)
    matchers = [ref.matcher(t) for t in templates]
    quoted = [line[len("error: "):] for line in _code_blocks((ROOT / "docs" / "troubleshooting.md").read_text(), "")
              if line.startswith("error: ")]
    assert len(quoted) >= 10
    for line in quoted:
        assert any(m.match(line) for m in matchers), f"no message in the code prints: {line}"
