"""The docs match the code: the README's module table, and every project path the docs name exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "docs" / "benchmarks.md", ROOT / "pyproject.toml",
        ROOT / "daemon" / "config.example.yaml"]
# A backticked (or quoted) path inside the project: `daemon/x.py`, tests/faults/, bench/soak.py ...
PATH = re.compile(r"(?<![\w/.-])((?:daemon|tests|bench|docs|systemd|spec|\.ci)/[\w./@-]*[\w/])")


def _module_table() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Layout of the code", 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("|")]


def test_every_module_is_one_row_of_the_readme_s_module_table() -> None:
    rows = _module_table()[2:]  # after the header and its rule
    # A glued row ("... | demo || `daemon/service.py` | ...") has more than three bars.
    assert [r for r in rows if r.count("|") != 3] == []
    named = [m.group(1) for r in rows if (m := re.match(r"\| `([^`]+)` \|", r))]
    modules = sorted(f"daemon/{p.name}" for p in (ROOT / "daemon").glob("*.py")
                     if p.name not in ("__init__.py", "__main__.py"))
    assert sorted(n for n in named if n.startswith("daemon/")) == modules
    assert len(named) == len(set(named))


def test_every_project_path_the_docs_name_exists() -> None:
    missing = []
    for doc in DOCS:
        for m in PATH.finditer(doc.read_text()):
            path = m.group(1).rstrip(".")
            if not (ROOT / path).exists() and not list(ROOT.glob(path)):
                missing.append(f"{doc.name}: {path}")
    assert missing == []
