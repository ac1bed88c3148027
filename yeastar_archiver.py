"""The ``yeastar-archiver`` console script: checks that ``daemon`` is this distribution's package, then runs it.

The import package is ``daemon/`` (the project's layout), a name PyPI's python-daemon uses too. In an
environment that holds both, the other one may be the ``daemon`` Python finds; this module's name is
unique, so it can still start and say so plainly, instead of dying on an ImportError.
"""

from __future__ import annotations

import sys

DISTRIBUTION = "yeastar-archiver"
EXIT_SHADOWED = 2  # like a configuration error: fix the installation; systemd does not restart it


def shadowed() -> str | None:
    """Why the importable ``daemon`` is not ours, or None when it is."""
    try:
        import daemon
    except ImportError as exc:
        return f"no package 'daemon' can be imported ({exc})"
    if getattr(daemon, "DISTRIBUTION", None) == DISTRIBUTION:
        return None
    where = getattr(daemon, "__file__", None) or ", ".join(getattr(daemon, "__path__", None) or []) or "?"
    return f"the package 'daemon' that Python imports ({where}) is not yeastar-archiver's"


def main() -> int:
    problem = shadowed()
    if problem is not None:
        print(f"yeastar-archiver: {problem}. Another distribution installs a package named 'daemon' "
              "(python-daemon does): install yeastar-archiver in a virtual environment of its own.",
              file=sys.stderr)
        return EXIT_SHADOWED
    from daemon.cli import main as cli_main
    return cli_main()


if __name__ == "__main__":
    raise SystemExit(main())
