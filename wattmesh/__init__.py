"""The ``wattmesh`` command line, composing the other packages."""

__version__ = "0.1.0"
