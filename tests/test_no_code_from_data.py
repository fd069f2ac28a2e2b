"""Nothing in the product executes code that comes from data (issue 13, item 1).

Scans every .py file of the product directories (schemas/, pipeline/, flows/, trainer/) by its
syntax tree, so comments, docstrings and ``model.eval()`` do not count, and fails on:

* ``weights_only=False`` (any call) and ``torch.load(...)`` without ``weights_only=True``;
* importing ``pickle`` / ``cPickle`` / ``_pickle`` / ``dill`` / ``cloudpickle`` / ``shelve`` /
  ``marshal`` / ``jsonpickle`` / ``joblib``, or calling ``pandas.read_pickle``;
* calls of the builtins ``eval`` / ``exec`` (``compile`` too);
* ``yaml.load(...)`` / ``yaml.load_all(...)`` without a safe loader, and ``yaml.unsafe_load`` /
  ``yaml.full_load``;
* ``trust_remote_code=True`` and ``allow_pickle=True``;
* numba's ``cache=`` on a compiled function (its on-disk cache is pickled machine code).

``test_scanner_catches_planted_code`` feeds the scanner each forbidden form, so the test can
fail; the product test then asserts a clean tree.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PRODUCT_DIRS = ("schemas", "pipeline", "flows", "trainer")
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "shelve", "marshal", "jsonpickle", "joblib"}
SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader", "BaseLoader", "CBaseLoader"}


def _name(node: ast.AST) -> str:
    """Dotted name of a call target: ``torch.load``, ``eval``, ``x.y.z``; '' if not a plain name."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = _name(node.value)
        return f"{inner}.{node.attr}" if inner else ""
    return ""


def _kw(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_const(node: ast.expr | None, value: object) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def findings(source: str, filename: str = "<string>") -> list[str]:
    """Every forbidden construct in ``source`` as 'file:line: what'."""
    tree = ast.parse(source, filename=filename)
    out: list[str] = []

    def hit(node: ast.AST, what: str) -> None:
        out.append(f"{filename}:{getattr(node, 'lineno', 0)}: {what}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in PICKLE_MODULES:
                    hit(node, f"imports {a.name}")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PICKLE_MODULES:
            hit(node, f"imports from {node.module}")
        elif isinstance(node, ast.Call):
            name = _name(node.func)
            last = name.rsplit(".", 1)[-1]
            if name in ("eval", "exec", "compile", "builtins.eval", "builtins.exec", "__import__"):
                hit(node, f"calls {name}()")
            if _is_const(_kw(node, "weights_only"), False):
                hit(node, "weights_only=False")
            if name == "torch.load" and not _is_const(_kw(node, "weights_only"), True):
                hit(node, "torch.load without weights_only=True")
            if _is_const(_kw(node, "trust_remote_code"), True):
                hit(node, "trust_remote_code=True")
            if _is_const(_kw(node, "allow_pickle"), True):
                hit(node, "allow_pickle=True")
            if last in ("jit", "njit", "vectorize", "guvectorize", "cfunc") and not _is_const(_kw(node, "cache"), False) \
                    and _kw(node, "cache") is not None:
                hit(node, f"{name}(cache=...): numba's cache is pickled machine code")
            if last == "read_pickle":
                hit(node, f"calls {name}()")
            if name in ("yaml.unsafe_load", "yaml.full_load", "yaml.unsafe_load_all", "yaml.full_load_all"):
                hit(node, f"calls {name}()")
            if name in ("yaml.load", "yaml.load_all"):
                loader = _kw(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
                if loader is None or _name(loader).rsplit(".", 1)[-1] not in SAFE_YAML_LOADERS:
                    hit(node, f"{name} without a safe Loader")
    return out


def product_files() -> list[Path]:
    return sorted(p for d in PRODUCT_DIRS for p in (ROOT / d).rglob("*.py") if ".venv" not in p.parts)


PLANTED = {
    "import pickle\n": "imports pickle",
    "from pickle import loads\n": "imports from pickle",
    "import cloudpickle as cp\n": "imports cloudpickle",
    "import torch\nstate = torch.load(p, weights_only=False)\n": "weights_only=False",
    "import torch\nstate = torch.load(p)\n": "torch.load without weights_only=True",
    "x = eval(text)\n": "calls eval()",
    "exec(code, {})\n": "calls exec()",
    "import yaml\ncfg = yaml.load(fh)\n": "yaml.load without a safe Loader",
    "import yaml\ncfg = yaml.load(fh, Loader=yaml.Loader)\n": "yaml.load without a safe Loader",
    "import yaml\ncfg = yaml.unsafe_load(fh)\n": "calls yaml.unsafe_load()",
    "m = AutoModel.from_pretrained(p, trust_remote_code=True)\n": "trust_remote_code=True",
    "a = np.load(p, allow_pickle=True)\n": "allow_pickle=True",
    "df = pd.read_pickle(p)\n": "calls pd.read_pickle()",
    "@numba.njit(nogil=True, cache=True)\ndef k(x):\n    return x\n": "numba's cache",
}
ALLOWED = (
    "model.eval()\n"
    "import yaml\ncfg = yaml.safe_load(fh)\ncfg = yaml.load(fh, Loader=yaml.SafeLoader)\n"
    "import torch\nstate = torch.load(p, map_location='cpu', weights_only=True)\n"
    "a = np.load(p, allow_pickle=False)\n"
    "@njit(nogil=True)\ndef k(x):\n    return x\n"
    "# import pickle; eval(x); weights_only=False (a comment)\n"
    "'''docstring: torch.load(p, weights_only=False), trust_remote_code=True'''\n"
)


@pytest.mark.parametrize("source,expected", sorted(PLANTED.items()))
def test_scanner_catches_planted_code(source, expected):
    found = findings(source, "planted.py")
    assert found and any(expected in f for f in found), found


def test_scanner_allows_the_safe_forms():
    assert findings(ALLOWED, "allowed.py") == []


def test_scanner_catches_a_planted_file(tmp_path):
    planted = tmp_path / "trainer" / "evil.py"
    planted.parent.mkdir()
    planted.write_text("import torch\n\ndef load(p):\n    return torch.load(p, weights_only=False)\n")
    assert findings(planted.read_text(), str(planted)) == [f"{planted}:4: weights_only=False",
                                                           f"{planted}:4: torch.load without weights_only=True"]


def test_product_executes_no_code_from_data():
    files = product_files()
    assert len(files) > 20 and any(f.parent.name == "trainer" for f in files)
    problems = [f for p in files for f in findings(p.read_text(encoding="utf-8"), str(p.relative_to(ROOT)))]
    assert problems == [], "code from data:\n" + "\n".join(problems)
