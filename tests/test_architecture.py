"""docs/architecture.md is the map of the code: it names every module, and every module it names exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "architecture.md"


def _modules() -> set[str]:
    found = set()
    for package in ("controlpanel", "deployments"):
        for path in (ROOT / package).rglob("*.py"):
            rel = path.relative_to(ROOT).as_posix()
            if "/migrations/" in rel or path.name == "__init__.py":
                continue
            found.add(rel)
    return found


def _named() -> set[str]:
    """Paths the module map names: `dir/file.py`, and siblings listed after one as `other.py`."""
    named = set()
    for line in DOC.read_text().splitlines():
        if not line.startswith("- `"):
            continue
        head = line.split(" — ")[0]
        folder = None
        for item in re.findall(r"`([^`]+\.py)`", head):
            if "/" in item:
                folder = item.rsplit("/", 1)[0]
                named.add(item)
            elif folder:
                named.add(f"{folder}/{item}")
    return named


def test_every_module_is_on_the_map():
    missing = sorted(_modules() - _named())
    assert not missing, f"add these to the module map in docs/architecture.md: {missing}"


def test_every_module_on_the_map_exists():
    gone = sorted(p for p in _named() if not (ROOT / p).is_file())
    assert not gone, f"docs/architecture.md names modules that are not in the tree: {gone}"


def test_the_docs_link_only_files_inside_the_repository():
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", doc.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            resolved = (doc.parent / target).resolve()
            assert resolved.is_relative_to(ROOT), f"{doc.name} links outside the repository: {target}"
            assert resolved.exists(), f"{doc.name} links a missing file: {target}"
