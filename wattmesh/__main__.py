"""``python -m wattmesh``."""

from wattmesh.cli import main

main()
