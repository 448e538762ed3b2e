"""The version of this gateway, read once from the installed package's metadata.

The version is defined in one place, ``pyproject.toml``; ``sso-gateway --version``,
``/readyz``, the ``gateway_build_info`` metric and the startup log line all read it here.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

DISTRIBUTION = "sso-gateway"

try:
    VERSION = version(DISTRIBUTION)
except PackageNotFoundError:  # a source tree that was never installed
    VERSION = "0+unknown"
