"""Imports point one way (DESIGN.md): a small ast check keeps the layers true."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "gateway"

# module (or package) → gateway modules it must never import
FORBIDDEN = {
    "errors": {"*"},
    "principal": {"*"},
    "config_schema": {"*"},
    "config": {"app", "cli", "saml", "sessions", "policy", "proxy", "identity", "login", "devidp",
               "demo", "web"},
    "saml": {"app", "cli", "sessions", "policy", "proxy", "identity", "login", "devidp", "demo"},
    "sessions": {"app", "cli", "saml", "policy", "proxy", "identity", "login", "devidp", "demo"},
    "policy": {"app", "cli", "saml", "sessions", "proxy", "login", "devidp", "demo"},
    "identity": {"app", "cli", "saml", "sessions", "proxy", "login", "devidp", "demo"},
    "proxy_headers": {"*"},
    "proxy": {"app", "cli", "saml", "sessions", "policy", "login", "devidp", "demo"},
    "paths": {"app", "cli", "saml", "sessions", "policy", "proxy", "login", "devidp", "demo"},
    "login": {"app", "cli", "devidp", "demo"},
    "app": {"cli", "cli_admin", "devidp", "demo"},
    "web": {"app", "cli", "devidp", "demo"},
    # the self-test is a client of the gateway: nothing of the server side
    "selftest": {"app", "cli", "config", "config_schema", "saml", "sessions", "policy",
                 "proxy", "identity", "login", "routes", "web", "demo"},
}


def gateway_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gateway"):
            found.add(node.module.split(".")[1] if "." in node.module else "")
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("gateway.")}
    return found


def test_imports_point_one_way() -> None:
    problems = []
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        owner = parts[0]
        banned = FORBIDDEN.get(owner, set())
        for name in gateway_imports(path) - {owner}:
            if "*" in banned or name in banned:
                problems.append(f"{path.relative_to(PACKAGE)} imports gateway.{name}")
    assert problems == []
