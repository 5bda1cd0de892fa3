"""The drivers package's exception tree. Library errors are translated into these once."""

from __future__ import annotations

from typing import ClassVar


class DriverError(Exception):
    """Base of every error raised by ``drivers``."""


class DeviceUnavailable(DriverError):
    """The device did not answer (no connection, timeout, garbled frame) after all retries."""


class GatewayUnavailable(DeviceUnavailable):
    """A Modbus gateway kept answering that it could not reach the device (exception 10, 11)."""


class ModbusException(DriverError):
    """The device answered with a Modbus exception response."""

    NAMES: ClassVar[dict[int, str]] = {
        1: "illegal function",
        2: "illegal data address",
        3: "illegal data value",
        4: "server device failure",
        5: "acknowledge",
        6: "server device busy",
        8: "memory parity error",
        10: "gateway path unavailable",
        11: "gateway target device failed to respond",
    }

    #: What each code tells the user to do about it.
    HINTS: ClassVar[dict[int, str]] = {
        2: "the device does not serve (some of) these registers",
        6: "the device is busy: try again later",
        10: "a gateway has no path to the device (check the gateway's routing/unit id)",
        11: "a gateway got no answer from the device behind it (check its wiring and unit id)",
    }

    def __init__(
        self, code: int, function_code: int, address: int, count: int, note: str = ""
    ) -> None:
        self.code = code
        self.function_code = function_code
        self.address = address
        self.count = count
        name = self.NAMES.get(code, "unknown")
        hint = self.HINTS.get(code)
        super().__init__(
            f"Modbus exception {code} ({name}) for function {function_code} "
            f"at address {address}, count {count}"
            + (f": {hint}" if hint else "")
            + (f" ({note})" if note else "")
        )


class RegisterMapError(DriverError):
    """A register-map data file is wrong; the message names the file and the field."""


class SunSpecError(DriverError):
    """A device does not speak SunSpec, or its model chain is malformed."""


class SetpointRejected(DriverError):
    """A setpoint lies outside the device's own limits; nothing was written."""


class WriteNotConfirmed(DriverError):
    """A write was accepted by the device but reading it back gave another value."""
