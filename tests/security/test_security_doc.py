"""docs/security.md names a test for each protection; every one it names exists."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "security.md"
REFERENCE = re.compile(r"`(tests/[\w/.-]+\.py)::(\w+)`")


def test_every_test_the_security_doc_names_exists():
    references = REFERENCE.findall(DOC.read_text())
    assert len(references) > 20
    missing = [
        f"{path}::{name}"
        for path, name in references
        if not (ROOT / path).is_file() or not re.search(rf"^(async )?def {name}\(", (ROOT / path).read_text(), re.M)
    ]
    assert not missing, f"docs/security.md names tests that do not exist: {missing}"
