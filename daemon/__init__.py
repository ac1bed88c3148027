"""yeastar-archiver: archive call recordings from a Yeastar P-Series PBX."""

from __future__ import annotations

# The import package's name, ``daemon``, is also PyPI's python-daemon's; the console script checks
# this marker before it imports anything else from here (see yeastar_archiver.py).
DISTRIBUTION = "yeastar-archiver"


def __getattr__(name: str) -> str:
    # The version has one source, the distribution's metadata (pyproject.toml); looked up only when
    # asked for, so that a plain `import daemon` stays cheap for `health` and `status`.
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version
        try:
            return version(DISTRIBUTION)
        except PackageNotFoundError:
            return "0+unknown"  # a checkout that was never installed
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
