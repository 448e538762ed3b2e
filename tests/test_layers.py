"""Imports point one way: the module table of docs/architecture.md is the whitelist.

Every module under ``gateway/`` must have a row; a module may import only the package
modules its row names (``pkg.*`` names every module of a package). Modules of
``devidp``, ``demo`` and ``selftest`` share one row per package and import each other
freely. Only ``gateway/saml/`` imports python3-saml (and the development IdP and the
self-test, which build SAML messages of their own).
"""

from __future__ import annotations

import ast
import fnmatch
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "gateway"
DOC = ROOT / "docs" / "architecture.md"
GROUPED = ("devidp", "demo", "selftest")
_ROW = re.compile(r"^\|\s*`([a-z0-9_.*]+)`\s*\|[^|]*\|\s*(.*?)\s*\|\s*$")


def whitelist() -> dict[str, set[str]]:
    """Module → the package modules it may import, from the architecture document."""
    rows: dict[str, set[str]] = {}
    for line in DOC.read_text().splitlines():
        match = _ROW.match(line)
        if match:
            names = set(re.findall(r"`([a-z0-9_.*]+)`", match.group(2)))
            rows[match.group(1)] = names
    return rows


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def row_for(module: str) -> str:
    top = module.split(".")[0]
    return f"{top}.*" if top in GROUPED else module


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node but those under ``if TYPE_CHECKING:`` (imports for annotations only)."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {id(n) for child in node.body for n in ast.walk(child)}
    return [n for n in ast.walk(tree) if id(n) not in skipped]


def imports(path: Path) -> tuple[set[str], set[str]]:
    """The package modules a file imports at run time, and the top-level names of the
    others. Imports under ``if TYPE_CHECKING:`` name types only and are not counted."""
    own: set[str] = set()
    other: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "gateway":
                own |= {a.name for a in node.names}
            elif node.module.startswith("gateway."):
                base = node.module.removeprefix("gateway.")
                folder = PACKAGE.joinpath(*base.split("."))
                # ``from gateway.routes import account`` imports the module routes.account
                subs = {a.name for a in node.names if (folder / f"{a.name}.py").exists()}
                own |= {f"{base}.{name}" for name in subs}
                if len(subs) < len(node.names):
                    own.add(base)
            else:
                other.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("gateway."):
                    own.add(alias.name.removeprefix("gateway."))
                else:
                    other.add(alias.name.split(".")[0])
    return own, other


def allowed(name: str, patterns: set[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def test_every_module_has_a_row_and_imports_only_what_it_allows() -> None:
    rows = whitelist()
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = module_name(path)
        if not module:
            continue
        row = row_for(module)
        if row not in rows:
            problems.append(f"{module}: no row in docs/architecture.md")
            continue
        own, _ = imports(path)
        top = module.split(".")[0]
        for name in sorted(own):
            if top in GROUPED and name.split(".")[0] == top:
                continue
            if not allowed(name, rows[row]):
                problems.append(f"{module} imports gateway.{name}, which its row does not allow")
    assert problems == []


def test_every_row_names_a_module() -> None:
    modules = {row_for(module_name(p)) for p in PACKAGE.rglob("*.py") if module_name(p)}
    assert sorted(set(whitelist()) - modules) == []


def test_only_the_saml_package_imports_python3_saml() -> None:
    offenders = [module_name(p) for p in PACKAGE.rglob("*.py")
                 if "onelogin" in imports(p)[1]
                 and not module_name(p).startswith(("saml", "devidp", "selftest"))]
    assert offenders == []


def test_the_whitelist_catches_a_breach() -> None:
    """The check itself can fail: a values module importing the config is refused."""
    rows = whitelist()
    assert "errors" in rows and not allowed("config", rows["errors"])
    assert not allowed("app", rows["policy"])
