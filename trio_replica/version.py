"""The installed version of trio_replica (from the package metadata)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("trio_replica")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"
