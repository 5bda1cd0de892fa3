"""The ``broker`` package's exceptions: one small tree, each message naming the file or port."""

from __future__ import annotations


class BrokerError(Exception):
    """Base of every error raised by the ``broker`` package's plumbing."""


class BrokerConfigError(BrokerError):
    """A broker configuration cannot be written, read or used as it stands."""


class MosquittoNotFoundError(BrokerConfigError):
    """The ``mosquitto`` binary is not installed (on PATH or in /usr/sbin)."""


class BrokerProcessError(BrokerError):
    """A Mosquitto process did not start, or exited while it was expected to run."""


class BusUnavailable(BrokerError):
    """The broker cannot be reached now (not connected, or the link broke mid-call)."""
