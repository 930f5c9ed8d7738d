"""What the exporter's tests publish: a small node of two H100s, one vLLM server and one group
over two ticks, and a snapshot with every optional field set."""

from __future__ import annotations

from dataclasses import replace

from powerd.config import MetricsConfig
from powerd.exporter import Exporter
from powerd.model import (
    REASON_APPLICATIONS_CLOCKS,
    REASON_SW_POWER_CAP,
    GpuInfo,
    GpuReading,
    GpuStatus,
    GridSignalStatus,
    GroupStatus,
    ServerSample,
    Snapshot,
)

BUILD_INFO = {"version": "0.0.0-test", "python": "3.x"}
UUIDS = (
    "GPU-22dbdd79-f55a-92a8-aa39-322198e72ed6",
    "GPU-5b1a3c1e-0f3e-4a8e-9d0c-6c1f0e2b7a11",
)


def gpu_info(index: int) -> GpuInfo:
    return GpuInfo(
        index=index,
        uuid=UUIDS[index],
        name="NVIDIA H100 80GB HBM3",
        power_limit_min_mw=200_000,
        power_limit_max_mw=700_000,
        power_limit_default_mw=700_000,
        sm_clock_min_mhz=345,
        sm_clock_max_mhz=1980,
        supported_sm_clocks_mhz=tuple(range(345, 1981, 15)),
    )


def gpu_status(
    index: int,
    *,
    timestamp_s: float,
    power_mw: int | None,
    energy_mj: int | None,
    lock_mhz: int | None,
    configured_mw: int | None,
    reasons: int | None = REASON_APPLICATIONS_CLOCKS,
    observe_only: bool = False,
    observe_only_reason: str = "",
) -> GpuStatus:
    reading = GpuReading(
        uuid=UUIDS[index],
        index=index,
        timestamp_s=timestamp_s,
        power_mw=power_mw,
        energy_mj=energy_mj,
        sm_clock_mhz=1605 if lock_mhz is not None else 1980,
        power_limit_mw=configured_mw if configured_mw is not None else 700_000,
        enforced_power_limit_mw=configured_mw if configured_mw is not None else 700_000,
        clock_event_reasons=reasons,
        temperature_c=61 + index,
    )
    return GpuStatus(
        reading=reading,
        info=gpu_info(index),
        configured_power_limit_mw=configured_mw,
        sm_clock_lock_max_mhz=lock_mhz,
        observe_only=observe_only,
        observe_only_reason=observe_only_reason,
    )


def server_sample(timestamp_s: float, **overrides: object) -> ServerSample:
    fields: dict[str, object] = {
        "server": "llama",
        "kind": "vllm",
        "model_name": "meta-llama/Llama-3.1-8B-Instruct",
        "up": True,
        "timestamp_s": timestamp_s,
        "scrape_duration_s": 0.004,
        "realtime": True,
        "generation_tokens_per_s": 2400.0,
        "prompt_tokens_per_s": 5100.0,
        "running": 48.0,
        "waiting": 2.0,
        "ttft_q_s": 0.35,
        "itl_q_s": 0.042,
        "exports_ttft": True,
        "exports_prompt_lengths": True,
    }
    fields.update(overrides)
    return ServerSample(**fields)  # type: ignore[arg-type]


def group_status(**overrides: object) -> GroupStatus:
    fields: dict[str, object] = {
        "group": "llama",
        "server": "llama",
        "model_name": "meta-llama/Llama-3.1-8B-Instruct",
        "gpu_uuids": UUIDS,
        "mode": "efficiency",
        "sm_clock_max_mhz": 1605,
        "power_limit_mw": None,
        "tokens_per_joule": 3.75,
        "energy_per_token_j": 0.26666666666666666,
        "generation_tokens_per_s": 2400.0,
        "power_w": 640.0,
        "ttft_q_s": 0.35,
        "itl_q_s": 0.042,
        "ttft_slo_s": 2.0,
        "itl_slo_s": 0.1,
        "slo_met": True,
        "slo_attainment": 0.98,
        "slo_quantile": 0.95,
    }
    fields.update(overrides)
    return GroupStatus(**fields)  # type: ignore[arg-type]


def small_snapshots() -> tuple[Snapshot, Snapshot]:
    """Two consecutive ticks of a node with two GPUs, one server and one group."""
    snapshots = []
    for tick, timestamp_s in enumerate((1_700_000_000.0, 1_700_000_001.0), start=1):
        gpus = (
            gpu_status(
                0,
                timestamp_s=timestamp_s,
                power_mw=321_500 + tick * 1000,
                energy_mj=9_000_000_000 + tick * 322_000,
                lock_mhz=1605,
                configured_mw=None,
            ),
            gpu_status(
                1,
                timestamp_s=timestamp_s,
                power_mw=317_250 + tick * 1000,
                energy_mj=8_500_000_000 + tick * 318_000,
                lock_mhz=1605,
                configured_mw=650_000,
                reasons=REASON_APPLICATIONS_CLOCKS | REASON_SW_POWER_CAP,
            ),
        )
        snapshots.append(
            Snapshot(
                timestamp_s=timestamp_s,
                gpus=gpus,
                servers=(server_sample(timestamp_s),),
                groups=(group_status(),),
                ticks_total=tick,
                loop_duration_s=0.0031 * tick,
            )
        )
    return snapshots[0], snapshots[1]


def full_snapshot() -> Snapshot:
    """Every optional field set, so every metric the exporter knows appears."""
    first, _ = small_snapshots()
    gpus = (
        first.gpus[0],
        replace(
            first.gpus[1],
            observe_only=True,
            observe_only_reason="NoPermission: insufficient permissions",
            configured_power_limit_mw=650_000,
        ),
    )
    return replace(
        first,
        gpus=gpus,
        servers=(
            server_sample(
                first.timestamp_s,
                ttft_mean_s=0.2,
                itl_mean_s=0.03,
                finished_requests=12.0,
                generation_tokens_total=1_234_567.0,
            ),
        ),
        groups=(
            group_status(
                mode="target",
                power_limit_mw=650_000,
                target_tokens_per_joule=3.5,
                target_reached=True,
                observe_only=False,
                dry_run=False,
                cost_per_million_tokens=0.0115,
                carbon_g_per_million_tokens=36.5,
                energy_cost_total=4.25,
                energy_credit_total=0.5,
                carbon_g_total=12_600.0,
                decision_reason="raise_queue",
            ),
        ),
        nvml_errors={("set_power_limit", "no_permission"): 3, ("read_energy", "not_supported"): 1},
        restores_total=1,
        restore_failures_total=0,
        mode="target",
        dry_run=False,
        grid_price_per_kwh=0.12,
        grid_carbon_g_per_kwh=380.0,
        grid_pue=1.3,
        grid_signals=(
            GridSignalStatus("price", 0.12, "file", 840.0),
            GridSignalStatus("carbon", 380.0, "schedule"),
        ),
        grid_file_errors_total=2,
        grid_file_problems=1,
        node_power_budget_w=2400.0,
        node_power_budget_feasible=True,
    )


def small_exporter() -> Exporter:
    exporter = Exporter(MetricsConfig(port=0), build_info=BUILD_INFO)
    for snapshot in small_snapshots():
        exporter.publish(snapshot)
    return exporter
