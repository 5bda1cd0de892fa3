"""The ``wattmesh`` console script and ``python -m wattmesh``.

``wattmesh edge run SITE_FILE`` (the command a gateway runs for ever) goes straight to the lean
service path, :mod:`wattmesh.edge_service`, without importing the full command line (typer,
rich, simulators, the coordinator, cryptography); everything else, including any ``edge run``
the lean path is not sure to read exactly as the full command line would (``--help``, a
mistake), goes to :mod:`wattmesh.cli`.
"""

from __future__ import annotations

import sys

from wattmesh.edge_service import fast_edge_run


def main() -> None:
    """Run the ``wattmesh`` command line with ``sys.argv``."""
    code = fast_edge_run(sys.argv[1:])
    if code is not None:
        sys.exit(code)
    from wattmesh.cli import main as cli_main  # noqa: PLC0415 - the full command line

    cli_main()
