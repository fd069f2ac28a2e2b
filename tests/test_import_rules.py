"""The import directions of ../shared/design.md hold (import-linter; contracts in pyproject.toml)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import ROOT

LINT = str(Path(sys.executable).parent / "lint-imports")


def test_import_contracts_are_kept():
    res = subprocess.run([LINT], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "4 kept, 0 broken" in res.stdout


def test_a_broken_contract_is_reported(tmp_path):
    """The checker can fail: flows/ does import pipeline/, so forbidding it must break."""
    cfg = tmp_path / "contracts.ini"
    cfg.write_text("[importlinter]\nroot_packages =\n    pipeline\n    flows\n\n"
                   "[importlinter:contract:1]\nname = flows must not import pipeline\ntype = forbidden\n"
                   "source_modules =\n    flows\nforbidden_modules =\n    pipeline\n")
    res = subprocess.run([LINT, "--config", str(cfg)], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 1 and "BROKEN" in res.stdout


def test_one_code_version_is_hashed_in_one_place():
    """The trainer's runs record the one code version (schemas/version.py) of its sources; no
    package hashes its sources on its own (issue 14: "one code_version")."""
    import re

    import schemas.version as version
    from trainer.runs import code_version

    assert code_version()["version"] == version.code_version(("trainer", "schemas"))
    hashing = [p.relative_to(ROOT).as_posix() for sub in ("pipeline", "trainer", "flows", "schemas")
               for p in sorted((ROOT / sub).rglob("*.py")) if re.search(r"rglob\(\"\*\.py\"\)", p.read_text())]
    assert hashing == ["schemas/version.py"]
