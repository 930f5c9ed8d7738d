"""The GpuBackend protocol: everything the daemon asks of the GPUs; locate_gpu, the GPU a
configured index or UUID names; and check_clock_settings, the control clocks the GPUs can take.

Reads may return None for a value the device does not report; writes raise a GpuError.
Setters clamp to the device's constraints and verify by reading back.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Protocol

from powerd.config import ConfigError, ControlConfig
from powerd.gpu.errors import GpuError
from powerd.model import GpuInfo, GpuReading
from powerd.wording import counted

POWER_LIMIT_TOLERANCE_MW = 1000
"""A power limit read back within 1 W of the one set is that one: a setter counts it as
applied (a driver that rounds the limit must not turn every write into an error and a
re-write), and a limit read within it of the one powerd left is powerd's, not someone else's."""

STALL_S = 5.0
"""A GPU that takes longer than this (s) to answer is taken for stalled: a healthy GPU answers
a call in milliseconds, one whose firmware hangs (Xid 119) in about 45 s, each call waiting out
the driver's RPC timeout. A reading, a write or a lookup that long makes the GPU lost, and
nothing more is called on it until that call returns; a restore so delays the other GPUs by
this long, not by one driver timeout per knob."""

WAIT_BESIDE_HANG_S = 1.0
"""How long (s) a GPU's call or open (other than a reading, which all GPUs share one wait for)
is waited for while another GPU or open hangs: a healthy GPU answers in milliseconds, and six GPUs
written one after another at STALL_S each would pass the unit's WatchdogSec=30."""


class GpuBackend(Protocol):
    @property
    def error_counts(self) -> Mapping[tuple[str, str], int]:
        """Errors since start by (operation, GpuError kind), for powerd_nvml_errors_total."""
        ...

    def devices(self, *, wait_s: float | None = None) -> list[GpuInfo]:
        """Every GPU the backend can see, in index order; each open waits the stall limit at
        most (`wait_s` when shorter)."""
        ...

    def unopened_indices(self) -> dict[int, str]:
        """GPUs the driver counted at the last devices() but that could not be opened (lost,
        no permission), by index, with why."""
        ...

    def describe(self, uuid: str) -> GpuInfo:
        """The GPU's description as known now: one whose power-limit range could not be read
        when it was described (a passing error) has it read again first; no driver call for
        the others. Raises GpuLost for a GPU never described."""
        ...

    def read(self, uuid: str) -> GpuReading:
        """One telemetry reading. Raises GpuLost when the device is gone."""
        ...

    def read_all(
        self, uuids: Sequence[str], *, wait_s: float | None = None
    ) -> dict[str, GpuReading | GpuError]:
        """One reading of each GPU, or the GpuError that stood in its way (GpuLost for a GPU
        gone or that did not answer within the stall limit, or within `wait_s` when shorter);
        the GPUs are waited for at once, so several that hang cost one wait, not one each."""
        ...

    def power_limit_mw(self, uuid: str) -> int | None:
        """The power limit now (one call; None when it cannot be read). Raises GpuLost.

        This, the setters, describe and compute_pids raise GpuLost, as a reading does, for a
        GPU that does not answer within the stall limit or has not since."""
        ...

    def set_locked_clocks(
        self, uuid: str, min_mhz: int, max_mhz: int, *, resend: bool = False
    ) -> tuple[int, int]:
        """Lock the SM clock into [min_mhz, max_mhz] after clamping; returns the applied range.
        A backend may skip a request for the range it set last, unless `resend`."""
        ...

    def reset_locked_clocks(self, uuid: str, *, resend: bool = False) -> None:
        """Unlock the SM clocks (the driver default). A backend may skip the call when it
        unlocked them last, unless `resend`."""
        ...

    def set_power_limit(self, uuid: str, power_limit_mw: int) -> int:
        """Set the power limit after clamping to the constraints; returns the limit read back."""
        ...

    def reset_power_limit(self, uuid: str) -> None:
        """Set the power limit back to the device's default limit."""
        ...

    def compute_pids(self, uuid: str) -> list[int]:
        """PIDs of processes with a compute context on the GPU (empty if unknown)."""
        ...

    def close(self) -> None:
        """Release NVML. Does not change any setting."""
        ...


def locate_gpu(
    key: str,
    server: str,
    gpu: int | str,
    by_index: Mapping[int, str],
    unopened: Collection[int],
) -> str | None:
    """The UUID of the GPU (an index or a UUID) that the config names at `key`
    ("servers[0].gpus[1]", of the server named `server`) among the GPUs `by_index` names; None
    when it may be one NVML counts but cannot open (its index is in `unopened`, or a UUID while
    any is).

    ConfigError when the node has no such GPU, naming the key, the server and the node's GPUs:
    the one wording of `powerd run` and `powerd check-config`."""
    uuid = by_index.get(gpu) if isinstance(gpu, int) else gpu
    if uuid is not None and uuid in by_index.values():
        return uuid
    if gpu in unopened if isinstance(gpu, int) else bool(unopened):
        return None
    raise ConfigError(
        f"{key} (server {server!r}): no GPU {gpu!r} on this node ({_node_gpus(by_index, unopened)})"
    )


def check_clock_settings(control: ControlConfig, infos: Collection[GpuInfo]) -> None:
    """ConfigError when control.min_clock_mhz is above the maximum SM clock of every GPU in
    `infos` (the controller would hold each at its maximum), or when the dither's swing, from
    control.dither_mhz below its base to as far above, is wider than a GPU's supported SM
    clocks span (the controller clamps both ends into them, so the dither would swing between
    the ends of the range; a GPU that lists a single clock has no range to dither in). The
    message names the key, the value and a GPU's supported SM clocks: the one wording of
    `powerd run` and `powerd check-config`."""
    if not infos:
        return
    floor_mhz = control.min_clock_mhz
    highest = max(infos, key=lambda info: info.sm_clock_max_mhz)
    if floor_mhz is not None and floor_mhz > highest.sm_clock_max_mhz:
        raise ConfigError(
            f"control.min_clock_mhz: {floor_mhz} MHz is above the SM clocks every GPU on this "
            f"node supports (the highest: GPU {highest.index}, {_clock_range(highest)}); every "
            "GPU would be held at its maximum"
        )
    ranged = [info for info in infos if info.sm_clock_max_mhz > info.sm_clock_min_mhz]
    if not ranged:
        return
    narrowest = min(ranged, key=lambda info: info.sm_clock_max_mhz - info.sm_clock_min_mhz)
    span_mhz = narrowest.sm_clock_max_mhz - narrowest.sm_clock_min_mhz
    if 2 * control.dither_mhz > span_mhz:
        raise ConfigError(
            f"control.dither_mhz: {control.dither_mhz} MHz does not fit within the SM clocks "
            f"GPU {narrowest.index} supports ({_clock_range(narrowest)}): the dither moves the "
            f"clock that far up and down, so it must be at most {span_mhz // 2} MHz"
        )


def _clock_range(info: GpuInfo) -> str:
    """The GPU's supported SM clocks, for a message: "345-1980 MHz"."""
    return f"{info.sm_clock_min_mhz}-{info.sm_clock_max_mhz} MHz"


def _node_gpus(by_index: Mapping[int, str], unopened: Collection[int]) -> str:
    """The node's GPUs, for a message: "it has 2 GPUs: 0 (GPU-a), 1 (cannot be opened)"."""
    described = {index: f"{index} ({uuid})" for index, uuid in by_index.items()}
    for index in unopened:
        described.setdefault(index, f"{index} (cannot be opened)")
    if not described:
        return "it has no GPU"
    listed = ", ".join(text for _, text in sorted(described.items()))
    return f"it has {counted(len(described), 'GPU')}: {listed}"
