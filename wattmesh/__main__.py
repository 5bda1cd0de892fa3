"""``python -m wattmesh``."""

from wattmesh.entry import main

main()
