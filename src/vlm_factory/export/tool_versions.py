"""The versions of the tools an export used, for its report (None for a package that is not installed)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def package_versions(*packages: str) -> dict[str, str | None]:
    versions = {}
    for package in packages:
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    return versions
