"""The documentation: README.md stays short, every relative link of README.md and docs/ resolves (file and
heading), and docs/flags.md names every flag of every command."""

import importlib.util
import os
import re

import pytest
from conftest import ROOT

import localize
import parser as selavpr_parser
import reproduce

DOC_FILES = ["README.md"] + sorted(
    os.path.join("docs", name) for name in os.listdir(os.path.join(ROOT, "docs")) if name.endswith(".md")
)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: str) -> set:
    with open(path, encoding="utf-8") as f:
        text = re.sub(r"```.*?```", "", f.read(), flags=re.S)  # headings inside code blocks are not headings
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, flags=re.M)}


def _links(name: str):
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        text = re.sub(r"```.*?```", "", f.read(), flags=re.S)
    return [m.group(1) for m in LINK.finditer(text) if not re.match(r"[a-z]+:", m.group(1))]


def test_readme_is_short():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        assert len(f.readlines()) <= 200, "README.md is for a newcomer's five minutes: details belong in docs/"


@pytest.mark.parametrize("name", DOC_FILES)
def test_relative_links_resolve(name):
    broken = []
    for link in _links(name):
        target, _, anchor = link.partition("#")
        path = (
            os.path.normpath(os.path.join(ROOT, os.path.dirname(name), target)) if target else os.path.join(ROOT, name)
        )
        if not os.path.exists(path):
            broken.append(f"{link}: no file {os.path.relpath(path, ROOT)}")
        elif anchor and path.endswith(".md") and anchor not in _anchors(path):
            broken.append(f"{link}: no heading #{anchor} in {os.path.relpath(path, ROOT)}")
    assert not broken, f"{name}: " + "; ".join(broken)


def test_every_page_is_linked_from_the_readme():
    linked = {os.path.normpath(link.partition("#")[0]) for link in _links("README.md")}
    assert {name for name in DOC_FILES if name != "README.md"} <= linked


def _load_tool(name):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_flags_page_names_every_flag_of_every_command():
    parsers = {
        "train.py / eval.py": selavpr_parser.build_parser(),
        "localize.py": localize.build_localize_parser(),
        "reproduce.py": reproduce.build_parser(),
        "tools/draw_matches.py": _load_tool("draw_matches").build_argument_parser(),
        "tools/heatmap.py": _load_tool("heatmap").build_argument_parser(),
    }
    with open(os.path.join(ROOT, "docs", "flags.md"), encoding="utf-8") as f:
        rows = [line for line in f if line.startswith("| `--")]
    missing = []
    for command, p in parsers.items():
        for action in p._actions:
            flags = [s for s in action.option_strings if s.startswith("--") and s != "--help"]
            if flags and not any(row.startswith(f"| `{flags[-1]}`") and command in row for row in rows):
                missing.append(f"{command} {flags[-1]}")
    assert not missing, "docs/flags.md lacks a row (with the command) for: " + ", ".join(missing)
