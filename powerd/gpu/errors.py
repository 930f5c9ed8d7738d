"""The GPU error hierarchy. NVML's many error codes are mapped into it once, in gpu/nvml.py."""

from __future__ import annotations


class GpuError(Exception):
    """A GPU operation failed. `operation` names the call, `uuid` the device (if any)."""

    kind = "error"

    def __init__(
        self,
        message: str,
        *,
        operation: str = "",
        uuid: str | None = None,
    ) -> None:
        super().__init__(message)
        self.operation = operation
        self.uuid = uuid


class NotSupported(GpuError):
    """The device lacks this feature (for example locked clocks on an old GPU)."""

    kind = "not_supported"


class NoPermission(GpuError):
    """The caller may not change this setting (needs root or CAP_SYS_ADMIN)."""

    kind = "no_permission"


class GpuLost(GpuError):
    """The GPU fell off the bus or stopped answering."""

    kind = "gpu_lost"


class InvalidArgument(GpuError):
    """A value outside the device's constraints."""

    kind = "invalid_argument"


class GpuUnavailable(GpuError):
    """NVML cannot be used at all: no driver, no library, or initialisation failed."""

    kind = "unavailable"
