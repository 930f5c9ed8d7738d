"""Exporter: golden exposition, unit conversion, omission of unknown values, HTTP serving.

Regenerate the golden file after an intended change with
`.venv/bin/python -m tests.unit.test_exporter --regen` and review the diff.
"""

from __future__ import annotations

import contextlib
import gzip
import http.server
import itertools
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path

import pynvml
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from powerd import metrics_http
from powerd.config import MODES, MetricsConfig
from powerd.exporter import (
    LOOP_DURATION_BUCKETS_S,
    NVML_ERROR_KINDS,
    NVML_TICK_OPERATIONS,
    OBSERVE_ONLY_REASONS,
    Exporter,
    ExporterError,
    ScrapeTimes,
    default_build_info,
    observe_only_reason_label,
)
from powerd.gpu import errors as gpu_errors
from powerd.gpu.nvml import NvmlBackend
from powerd.metrics_http import MAX_CONNECTIONS
from powerd.model import (
    CLOCK_EVENT_REASON_NAMES,
    DECISION_REASONS,
    REASON_APPLICATIONS_CLOCKS,
    REASON_SW_POWER_CAP,
    GridSignalStatus,
    Snapshot,
)
from powerd.sim.fake_nvml import FakeNvml
from powerd.sim.plant import GpuPlant, load_gpu_profile
from tests.conftest import require_program
from tests.unit.clocks import ManualTime
from tests.unit.snapshots import (
    BUILD_INFO,
    UUIDS,
    full_snapshot,
    group_status,
    server_sample,
    small_exporter,
    small_snapshots,
)
from tests.unit.test_fake_nvml import fake_nvml_before_12_570
from tests.unit.waiting import drip_until_closed, read_reply, wait_until

GOLDEN = Path(__file__).resolve().parents[1] / "fixtures" / "exporter_small.golden"


def parse(exposition: bytes) -> dict[str, list[Sample]]:
    samples: dict[str, list[Sample]] = {}
    for family in text_string_to_metric_families(exposition.decode("utf-8")):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def value(samples: dict[str, list[Sample]], name: str, **labels: str) -> float:
    matches = [
        s for s in samples.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert len(matches) == 1, f"{name}{labels}: {len(matches)} samples"
    return float(matches[0].value)


def test_golden_exposition() -> None:
    rendered = small_exporter().render().decode("utf-8")
    assert GOLDEN.exists(), "run `python -m tests.unit.test_exporter --regen`"
    assert rendered == GOLDEN.read_text(encoding="utf-8")


def test_every_family_has_help_and_a_known_type() -> None:
    exporter = Exporter(MetricsConfig(), build_info=BUILD_INFO)
    exporter.publish(full_snapshot())
    families = list(text_string_to_metric_families(exporter.render().decode("utf-8")))
    assert len(families) > 40
    for family in families:
        assert family.name.startswith("powerd_")
        assert family.documentation, family.name
        assert family.type in ("gauge", "counter", "histogram"), family.name
        if family.type == "counter":
            assert all(s.name == family.name + "_total" for s in family.samples)


def test_units_are_converted_to_base_units() -> None:
    _, second = small_snapshots()
    samples = parse(small_exporter().render())
    gpu = second.gpus[1]
    labels = {"gpu": "1", "UUID": UUIDS[1]}
    power_mw, energy_mj = gpu.reading.power_mw, gpu.reading.energy_mj
    assert power_mw is not None and energy_mj is not None
    assert value(samples, "powerd_gpu_power_watts", **labels) == power_mw / 1000
    assert value(samples, "powerd_gpu_energy_joules_total", **labels) == pytest.approx(
        energy_mj / 1000
    )
    assert value(samples, "powerd_gpu_sm_clock_hertz", **labels) == 1605e6
    assert value(samples, "powerd_gpu_clock_limit_hertz", **labels) == 1605e6
    assert value(samples, "powerd_gpu_max_clock_hertz", **labels) == 1980e6
    assert value(samples, "powerd_gpu_power_limit_watts", **labels) == 650.0
    assert value(samples, "powerd_gpu_configured_power_limit_watts", **labels) == 650.0
    assert value(samples, "powerd_gpu_power_limit_lowered", **labels) == 1.0
    assert value(samples, "powerd_gpu_default_power_limit_watts", **labels) == 700.0
    assert value(samples, "powerd_group_clock_limit_hertz", group="llama") == 1605e6
    node_w = sum(g.reading.power_mw or 0 for g in second.gpus) / 1000
    assert value(samples, "powerd_node_power_watts") == pytest.approx(node_w)
    assert value(samples, "powerd_server_ttft_slo_quantile_seconds") == 0.35


def test_latency_series_are_named_for_the_quantile_they_hold() -> None:
    snapshot = full_snapshot()
    exporter = Exporter(MetricsConfig(), build_info=BUILD_INFO)
    exporter.publish(replace(snapshot, groups=(replace(snapshot.groups[0], slo_quantile=0.99),)))
    samples = parse(exporter.render())
    assert [name for name in samples if "p95" in name or "p99" in name] == []
    assert value(samples, "powerd_server_ttft_slo_quantile_seconds", server="llama") == 0.35
    assert value(samples, "powerd_server_itl_slo_quantile_seconds", server="llama") == 0.042
    assert value(samples, "powerd_group_slo_quantile", group="llama", server="llama") == 0.99


def test_gpu_labels_join_with_dcgm_exporter() -> None:
    samples = parse(small_exporter().render())
    for sample in samples["powerd_gpu_power_watts"]:
        assert set(sample.labels) == {"gpu", "UUID"}
        assert sample.labels["gpu"] in ("0", "1")
        assert sample.labels["UUID"] in UUIDS
    info = samples["powerd_gpu_info"]
    assert {s.labels["group"] for s in info} == {"llama"}
    assert {s.labels["name"] for s in info} == {"NVIDIA H100 80GB HBM3"}


def test_unknown_values_are_not_emitted() -> None:
    first, _ = small_snapshots()
    blind = replace(
        first.gpus[0],
        reading=replace(
            first.gpus[0].reading,
            power_mw=None,
            energy_mj=None,
            sm_clock_mhz=None,
            clock_event_reasons=None,
            temperature_c=None,
        ),
    )
    snapshot = replace(
        first,
        gpus=(blind, first.gpus[1]),
        servers=(
            server_sample(first.timestamp_s, up=False, generation_tokens_per_s=None, error="x"),
        ),
        groups=(group_status(tokens_per_joule=None, slo_met=None, slo_attainment=None),),
    )
    exporter = Exporter(MetricsConfig(), build_info=BUILD_INFO)
    exporter.publish(snapshot)
    samples = parse(exporter.render())
    for name in (
        "powerd_gpu_power_watts",
        "powerd_gpu_energy_joules_total",
        "powerd_gpu_sm_clock_hertz",
        "powerd_gpu_temperature_celsius",
        "powerd_gpu_clock_event_reason",
    ):
        assert all(s.labels["gpu"] == "1" for s in samples[name]), name
    assert "powerd_node_power_watts" not in samples
    assert "powerd_gpu_configured_power_limit_watts" in samples
    assert [s.labels["gpu"] for s in samples["powerd_gpu_configured_power_limit_watts"]] == ["1"]
    # Always there, so that its last value before powerd stopped says what was left.
    assert [s.value for s in samples["powerd_gpu_power_limit_lowered"]] == [0.0, 1.0]
    for name in (
        "powerd_group_tokens_per_joule",
        "powerd_group_slo_met",
        "powerd_group_slo_attainment_ratio",
        "powerd_group_target_tokens_per_joule",
        "powerd_server_generation_tokens_per_second",
        "powerd_server_generation_tokens_total",
        "powerd_grid_price_per_kwh",
    ):
        assert name not in samples, name
    assert value(samples, "powerd_source_up", server="llama") == 0.0


def test_grid_pue_is_exported_with_a_price_or_carbon_intensity() -> None:
    snapshot = full_snapshot()
    exporter = Exporter(MetricsConfig(), build_info=BUILD_INFO)
    for price, carbon, pue in ((0.12, 380.0, 1.3), (0.12, None, 1.3), (None, 380.0, 1.0)):
        exporter.publish(
            replace(snapshot, grid_price_per_kwh=price, grid_carbon_g_per_kwh=carbon, grid_pue=pue)
        )
        assert value(parse(exporter.render()), "powerd_grid_pue") == pue
    exporter.publish(replace(snapshot, grid_price_per_kwh=None, grid_carbon_g_per_kwh=None))
    assert "powerd_grid_pue" not in parse(exporter.render())


def test_grid_signals_say_their_source_and_the_age_of_a_file_value() -> None:
    exporter = Exporter(MetricsConfig(), build_info=BUILD_INFO)
    exporter.publish(full_snapshot())
    samples = parse(exporter.render())
    sources = {
        (s.labels["signal"], s.labels["source"]): s.value
        for s in samples["powerd_grid_signal_source"]
    }
    assert sources == {
        ("price", "file"): 1.0,
        ("price", "schedule"): 0.0,
        ("price", "flat"): 0.0,
        ("carbon", "file"): 0.0,
        ("carbon", "schedule"): 1.0,
        ("carbon", "flat"): 0.0,
    }
    ages = {s.labels["signal"]: s.value for s in samples["powerd_grid_signal_age_seconds"]}
    assert ages == {"price": 840.0}
    assert value(samples, "powerd_grid_file_errors_total") == 2.0
    assert value(samples, "powerd_grid_file_problems") == 1.0
    # The price says its currency, as the cost counters do.
    (price,) = samples["powerd_grid_price_per_kwh"]
    assert (price.labels, price.value) == ({"currency": full_snapshot().grid_currency}, 0.12)
    # No value in force: the signal is still listed, with no source marked.
    exporter.publish(
        replace(
            full_snapshot(),
            grid_price_per_kwh=None,
            grid_signals=(GridSignalStatus("price", None, None),),
            grid_file_errors_total=None,
            grid_file_problems=None,
        )
    )
    samples = parse(exporter.render())
    assert {s.labels["source"]: s.value for s in samples["powerd_grid_signal_source"]} == {
        "file": 0.0,
        "schedule": 0.0,
        "flat": 0.0,
    }
    for name in (
        "powerd_grid_signal_age_seconds",
        "powerd_grid_file_errors_total",
        "powerd_grid_file_problems",
        "powerd_grid_price_per_kwh",
    ):
        assert name not in samples, name


def test_group_cost_and_carbon_counters_appear_once_priced() -> None:
    exporter = Exporter(MetricsConfig(), build_info=BUILD_INFO)
    exporter.publish(full_snapshot())
    samples = parse(exporter.render())
    labels = {"group": "llama", "server": "llama", "model_name": "meta-llama/Llama-3.1-8B-Instruct"}
    for name, expected, extra in (
        ("powerd_group_energy_cost_total", 4.25, {"currency": "USD"}),
        ("powerd_group_energy_credit_total", 0.5, {"currency": "USD"}),
        ("powerd_group_carbon_grams_total", 12_600.0, {}),
    ):
        (sample,) = samples[name]
        assert sample.labels == {**labels, **extra}, name
        assert sample.value == expected, name
    # Never priced (no price has been in force): no series, not a made-up 0.
    exporter.publish(small_snapshots()[0])
    samples = parse(exporter.render())
    for name in (
        "powerd_group_energy_cost_total",
        "powerd_group_energy_credit_total",
        "powerd_group_carbon_grams_total",
        "powerd_grid_signal_source",
    ):
        assert name not in samples, name


def nvml_error_counts(exporter: Exporter) -> dict[tuple[str, str], float]:
    return {
        (s.labels["operation"], s.labels["kind"]): s.value
        for s in parse(exporter.render())["powerd_nvml_errors_total"]
    }


def test_nvml_error_counters_exist_at_zero_before_the_first_error() -> None:
    exporter = Exporter(MetricsConfig(), build_info=BUILD_INFO)
    exporter.publish(Snapshot(1.0))
    known = set(itertools.product(NVML_TICK_OPERATIONS, NVML_ERROR_KINDS))
    assert nvml_error_counts(exporter) == dict.fromkeys(known, 0.0)
    failed = {("nvmlDeviceSetGpuLockedClocks", "no_permission"): 2, ("nvmlDeviceGetCount", "x"): 1}
    exporter.publish(Snapshot(2.0, nvml_errors=failed))
    counts = nvml_error_counts(exporter)
    assert set(counts) == known | set(failed)
    assert {pair: n for pair, n in counts.items() if n} == failed


class _RecordingNvml:
    """An NVML module that notes which of its functions are looked up."""

    def __init__(self, nvml: object) -> None:
        self._nvml = nvml
        self.functions: set[str] = set()

    def __getattr__(self, name: str) -> object:
        if name.startswith("nvml"):
            self.functions.add(name)
        return getattr(self._nvml, name)


def _tick_functions(fake: FakeNvml) -> set[str]:
    """The NVML functions the backend looks up for one GPU's reads and writes of a tick."""
    nvml = _RecordingNvml(fake)
    backend = NvmlBackend(nvml)
    (info,) = backend.devices()
    nvml.functions.clear()
    backend.read(info.uuid)
    backend.set_locked_clocks(info.uuid, info.sm_clock_min_mhz, 1500)
    backend.reset_locked_clocks(info.uuid)
    backend.set_power_limit(info.uuid, info.power_limit_default_mw - 100_000)
    return nvml.functions


def test_the_zeroed_nvml_operations_and_kinds_are_the_backends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Whatever binding and driver answer: with the newest names, with a driver before R535
    (the older clock event reasons) and with nvidia-ml-py before 12.570 (the older temperature
    call), every call a tick makes is zeroed, and nothing else is."""
    profile = load_gpu_profile("h100-sxm")
    functions = _tick_functions(FakeNvml(GpuPlant(profile, 1, seed=7)))
    before_r535 = FakeNvml(GpuPlant(profile, 1, seed=7))
    before_r535.inject_error(
        0,
        "nvmlDeviceGetCurrentClocksEventReasons",
        pynvml.NVMLError_FunctionNotFound,
        persistent=True,
    )
    functions |= _tick_functions(before_r535)
    old_binding = fake_nvml_before_12_570(monkeypatch)
    functions |= _tick_functions(old_binding.FakeNvml(GpuPlant(profile, 1, seed=7)))
    # Handles are cached; a GPU back from a reset is looked up again by UUID.
    assert functions | {"nvmlDeviceGetHandleByUUID"} == set(NVML_TICK_OPERATIONS)
    kinds = {
        cls.kind
        for cls in vars(gpu_errors).values()
        if isinstance(cls, type) and issubclass(cls, gpu_errors.GpuError)
    }
    assert set(NVML_ERROR_KINDS) == kinds


def test_nothing_published_renders_only_node_metrics() -> None:
    samples = parse(Exporter(MetricsConfig(), build_info=BUILD_INFO).render())
    assert value(samples, "powerd_build_info", version="0.0.0-test") == 1.0
    assert value(samples, "powerd_loop_duration_seconds_count") == 0.0
    assert not [name for name in samples if name.startswith(("powerd_gpu", "powerd_group"))]


def test_clock_event_reasons_one_series_per_named_bit() -> None:
    samples = parse(small_exporter().render())
    reasons = {
        s.labels["reason"]: s.value
        for s in samples["powerd_gpu_clock_event_reason"]
        if s.labels["gpu"] == "1"
    }
    assert set(reasons) == set(CLOCK_EVENT_REASON_NAMES.values())
    assert {name for name, v in reasons.items() if v == 1.0} == {
        CLOCK_EVENT_REASON_NAMES[REASON_APPLICATIONS_CLOCKS],
        CLOCK_EVENT_REASON_NAMES[REASON_SW_POWER_CAP],
    }


def test_controller_mode_marks_exactly_the_active_mode() -> None:
    exporter = Exporter(MetricsConfig(), build_info=BUILD_INFO)
    first, _ = small_snapshots()
    exporter.publish(replace(first, groups=(group_status(mode="guard"),)))
    samples = parse(exporter.render())
    modes = {s.labels["mode"]: s.value for s in samples["powerd_controller_mode"]}
    assert set(modes) == {*MODES, "guard"}
    assert [m for m, v in modes.items() if v == 1.0] == ["guard"]
    node = {s.labels["mode"]: s.value for s in samples["powerd_node_mode"]}
    assert [m for m, v in node.items() if v == 1.0] == [first.mode]


def test_decision_reason_marks_exactly_the_current_reason() -> None:
    exporter = Exporter(MetricsConfig(), build_info=BUILD_INFO)
    first, _ = small_snapshots()
    exporter.publish(replace(first, groups=(group_status(decision_reason="raise_kv"),)))
    samples = parse(exporter.render())
    reasons = {s.labels["reason"]: s.value for s in samples["powerd_group_decision_reason"]}
    assert set(reasons) == set(DECISION_REASONS)
    assert [r for r, v in reasons.items() if v == 1.0] == ["raise_kv"]
    # A policy that gives no reason publishes no series.
    exporter.publish(first)
    assert "powerd_group_decision_reason" not in parse(exporter.render())


def test_observe_only_reason_is_from_the_fixed_set() -> None:
    exporter = Exporter(MetricsConfig(), build_info=BUILD_INFO)
    exporter.publish(full_snapshot())
    samples = parse(exporter.render())
    observe = {s.labels["gpu"]: s for s in samples["powerd_gpu_observe_only"]}
    assert observe["0"].value == 0.0 and "reason" not in observe["0"].labels
    assert observe["1"].value == 1.0 and observe["1"].labels["reason"] == "no_permission"
    texts = ["GPU is lost", "Not Supported", "weird thing", "dry_run", "write failed"]
    assert [observe_only_reason_label(t) for t in texts] == [
        "gpu_lost",
        "not_supported",
        "other",
        "dry_run",
        "error",
    ]
    assert all(observe_only_reason_label(t) in OBSERVE_ONLY_REASONS for t in texts)


def test_generation_token_counter_integrates_rate_between_scrapes() -> None:
    exporter = Exporter(MetricsConfig(), build_info=BUILD_INFO)
    timeline = [
        (100.0, True, None),  # first scrape: no rate yet
        (101.5, True, 200.0),  # +300 over 1.5 s
        (101.5, True, 200.0),  # same scrape republished: no change
        (102.5, False, None),  # server down
        (104.5, True, None),  # back, rate not yet known
        (105.0, True, 1000.0),  # +500 over 0.5 s
    ]
    totals = []
    for timestamp_s, up, rate in timeline:
        sample = server_sample(timestamp_s, up=up, generation_tokens_per_s=rate)
        exporter.publish(Snapshot(timestamp_s=timestamp_s, servers=(sample,)))
        totals.append(parse(exporter.render()).get("powerd_server_generation_tokens_total"))
    values = [t[0].value if t else None for t in totals]
    assert values == [0.0, 300.0, 300.0, 300.0, 300.0, 800.0]


def test_generation_token_counter_prefers_the_servers_own_count() -> None:
    exporter = Exporter(MetricsConfig(), build_info=BUILD_INFO)
    exporter.publish(Snapshot(1.0, servers=(server_sample(1.0, generation_tokens_total=5000.0),)))
    exporter.publish(Snapshot(2.0, servers=(server_sample(2.0, generation_tokens_total=7400.0),)))
    samples = parse(exporter.render())
    assert value(samples, "powerd_server_generation_tokens_total") == 7400.0
    # The count continues from the server's last value if a later scrape lacks it.
    exporter.publish(Snapshot(3.0, servers=(server_sample(3.0, generation_tokens_per_s=100.0),)))
    assert value(parse(exporter.render()), "powerd_server_generation_tokens_total") == 7500.0


def test_generation_token_counter_never_goes_back() -> None:
    """An own count that appears after the rate (TGI's token histogram is created at the
    first finished request) is followed from there; a restarted server's count from 0 adds."""
    exporter = Exporter(MetricsConfig(), build_info=BUILD_INFO)
    timeline: list[tuple[float, float | None, float | None]] = [
        (100.0, None, None),
        (102.0, 869.0, None),  # +1738 integrated
        (104.0, 0.0, 180.0),  # the server's own count appears: followed, not jumped to
        (106.0, 50.0, 280.0),  # +100
        (108.0, 10.0, 30.0),  # restarted: its 30 new tokens
    ]
    values = []
    for timestamp_s, rate, own in timeline:
        sample = server_sample(
            timestamp_s, generation_tokens_per_s=rate, generation_tokens_total=own
        )
        exporter.publish(Snapshot(timestamp_s=timestamp_s, servers=(sample,)))
        values.append(value(parse(exporter.render()), "powerd_server_generation_tokens_total"))
    assert values == [0.0, 1738.0, 1738.0, 1838.0, 1868.0]


def test_preemptions_are_a_counter_of_every_answer_not_the_last_tick() -> None:
    """Prometheus scrapes every 15-60 s and the daemon reads a server every second: a gauge
    of one answer's preemptions showed one tick in fifteen."""
    exporter = Exporter(MetricsConfig(), build_info=BUILD_INFO)
    values = []
    for timestamp_s, preemptions in ((1.0, None), (2.0, 0.0), (3.0, 4.0), (3.0, 4.0), (4.0, 1.0)):
        sample = server_sample(timestamp_s, preemptions=preemptions)
        exporter.publish(Snapshot(timestamp_s=timestamp_s, servers=(sample,)))
        found = parse(exporter.render()).get("powerd_server_preemptions_total")
        values.append(found[0].value if found else None)
    # Absent until the server says; an answer published twice counts once.
    assert values == [None, 0.0, 4.0, 4.0, 5.0]


def test_loop_duration_histogram_accumulates_every_publish() -> None:
    exporter = Exporter(MetricsConfig(), build_info=BUILD_INFO)
    # 0.1 is a bucket's bound: `le` counts it in that bucket, not the next.
    durations_s = [0.0, 0.0005, 0.004, 0.004, 0.1, 0.3, 5.0]
    for i, duration_s in enumerate(durations_s):
        exporter.publish(Snapshot(float(i), loop_duration_s=duration_s))
    exporter.publish(Snapshot(9.0, loop_duration_s=None))
    samples = parse(exporter.render())
    buckets = {
        float(s.labels["le"]): s.value for s in samples["powerd_loop_duration_seconds_bucket"]
    }
    for bound in (*LOOP_DURATION_BUCKETS_S, float("inf")):
        assert buckets[bound] == sum(1 for d in durations_s if d <= bound)
    assert value(samples, "powerd_loop_duration_seconds_count") == len(durations_s)
    assert value(samples, "powerd_loop_duration_seconds_sum") == pytest.approx(sum(durations_s))


def test_publish_and_render_from_different_threads() -> None:
    exporter = Exporter(MetricsConfig(), build_info=BUILD_INFO)
    first, second = small_snapshots()
    stop = threading.Event()
    errors: list[BaseException] = []

    def publisher() -> None:
        i = 0
        while not stop.is_set():
            exporter.publish(replace(first if i % 2 else second, ticks_total=i))
            i += 1

    thread = threading.Thread(target=publisher)
    thread.start()
    try:
        for _ in range(200):
            samples = parse(exporter.render())
            assert len(samples["powerd_gpu_power_watts"]) == 2
    except BaseException as exc:
        errors.append(exc)
    finally:
        stop.set()
        thread.join()
    assert not errors


def test_default_build_info_names_versions() -> None:
    info = default_build_info()
    assert info["version"]
    assert info["python"].count(".") == 2
    assert "numba" in info


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def test_http_server_serves_metrics_index_and_404() -> None:
    exporter = small_exporter()
    exporter.start()
    try:
        assert exporter.port
        base = f"http://127.0.0.1:{exporter.port}"
        status, headers, body = _get(f"{base}/metrics")
        assert status == 200
        assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
        assert body == exporter.render()
        status, headers, body = _get(f"{base}/metrics", {"Accept-Encoding": "gzip"})
        assert headers.get("Content-Encoding") == "gzip"
        assert gzip.decompress(body) == exporter.render()
        status, _, body = _get(f"{base}/")
        assert status == 200 and b'href="/metrics"' in body
        assert _get(f"{base}/nope")[0] == 404
    finally:
        exporter.stop()


class _Clock:
    def __init__(self) -> None:
        self.now_s = 100.0

    def __call__(self) -> float:
        return self.now_s


def test_scrape_rhythm_says_how_long_to_wait_for_the_next_scrape() -> None:
    clock = _Clock()
    times = ScrapeTimes(clock)
    assert times.interval_s() is None and times.next_wait_s(20.0) == 0.0
    for start_s in (100.0, 115.0, 130.2, 144.9):
        times.record(start_s)
    assert times.interval_s() == pytest.approx(15.0)
    clock.now_s = 150.0  # the next scrape is due at 159.9
    # Up to one interval past it (that one may have begun before the last publish).
    assert times.next_wait_s(30.0) == pytest.approx(9.9 + 1.25 * 15.0)
    assert times.next_wait_s(20.0) == 20.0
    assert times.next_wait_s(13.0) == 0.0, "not due within the limit: no wait"
    assert times.next_wait_s(0.0) == 0.0
    clock.now_s = 170.0  # overdue
    assert times.next_wait_s(20.0) == pytest.approx(1.25 * 15.0)


def test_scrape_wait_ends_at_a_scrape_begun_since_or_at_the_timeout() -> None:
    times = ScrapeTimes()
    since_s = times.now_s()
    times.record(since_s - 1.0)  # begun before: does not count
    assert times.wait_since(since_s, 0.05) is False
    timer = threading.Timer(0.1, lambda: times.record(times.now_s()))
    timer.start()
    try:
        assert times.wait_since(since_s, 5.0) is True
    finally:
        timer.cancel()


def test_wait_for_scrape_waits_for_one_rendering_the_last_publish() -> None:
    exporter = small_exporter()
    exporter.start()
    try:
        url = f"http://127.0.0.1:{exporter.port}/metrics"
        assert _get(url)[0] == 200
        assert exporter.wait_for_scrape(0.05) is True, "it rendered the last publish"
        exporter.publish(Snapshot(timestamp_s=1.0))
        assert exporter.wait_for_scrape(0.05) is False, "that scrape came before the publish"
        timer = threading.Timer(0.2, lambda: _get(url))
        timer.start()
        assert exporter.wait_for_scrape(5.0) is True
        timer.join()
    finally:
        exporter.stop()


@pytest.mark.parametrize("http_server", ["installed", "3.14's pre-releases"])
def test_port_in_use_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, http_server: str) -> None:
    """Python 3.14.0a1-b2's HTTPServer set SO_REUSEPORT (gh-120485, undone by gh-127319): a
    second exporter on the port bound too and the kernel split the scrapes between them."""
    if http_server != "installed":
        monkeypatch.setattr(http.server.HTTPServer, "allow_reuse_port", True, raising=False)
    first = small_exporter()
    first.start()
    try:
        second = Exporter(MetricsConfig(port=first.port or 0), build_info=BUILD_INFO)
        with pytest.raises(ExporterError, match=r"cannot listen on 127\.0\.0\.1:\d+"):
            second.start()
    finally:
        first.stop()


def read_answer(sock: socket.socket, timeout_s: float = 10.0) -> bytes:
    """One whole HTTP answer (head and Content-Length body) from sock, however long it takes up
    to timeout_s; b"" with what came so far when the server closes or the time runs out first."""
    sock.settimeout(timeout_s)
    answer = b""
    while True:
        head, blank, body = answer.partition(b"\r\n\r\n")
        if blank:
            length = next(
                (
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                ),
                0,
            )
            if len(body) >= length:
                return answer
        try:
            chunk = sock.recv(65536)
        except (TimeoutError, ConnectionResetError):
            return answer
        if not chunk:
            return answer
        answer += chunk


def hold_connections(exporter: Exporter, sent: bytes, held: list[socket.socket]) -> None:
    """Open MAX_CONNECTIONS connections to the exporter into `held`, each sending `sent`."""
    address = ("127.0.0.1", exporter.port or 0)
    for _ in range(MAX_CONNECTIONS):
        held.append(socket.create_connection(address, timeout=10))
        held[-1].sendall(sent)
        # One at a time: a burst would overflow the listen backlog (SYN retried after 1 s).
        assert wait_until(lambda: exporter.open_connections == len(held))


def test_at_the_cap_a_scrape_takes_the_place_of_the_connection_waiting_longest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Silent connections, which need no credentials, must not keep Prometheus out."""
    # The held connections must outlast the test, however slowly it runs.
    monkeypatch.setattr(metrics_http, "REQUEST_HEAD_DEADLINE_S", 300.0)
    exporter = small_exporter()
    exporter.start()
    held: list[socket.socket] = []
    try:
        hold_connections(exporter, b"GET /metrics HTTP/1.1\r\n", held)
        assert _get(f"http://127.0.0.1:{exporter.port}/metrics")[0] == 200
        assert read_reply(held[0]) == (b"", True), "the longest waiting was closed"
        assert wait_until(lambda: exporter.open_connections == MAX_CONNECTIONS - 1)
        for sock in held[1:]:
            assert read_reply(sock, 0.05) == (b"", False), "the others are still open"
    finally:
        for sock in held:
            sock.close()
        exporter.stop()


def test_a_connection_over_the_cap_is_closed_while_every_one_is_being_answered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    exporter = small_exporter()
    release = threading.Event()
    real_render = exporter.render
    renders_started = itertools.count(1)
    answering = 0

    def slow_render() -> bytes:
        nonlocal answering
        answering = next(renders_started)
        release.wait(30)
        return real_render()

    monkeypatch.setattr(exporter, "render", slow_render)
    exporter.start()
    held: list[socket.socket] = []
    try:
        hold_connections(exporter, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", held)
        # Accepted is not yet answered: a connection whose request is still unread waits,
        # and the extra one would rightly take its place.
        assert wait_until(lambda: answering == MAX_CONNECTIONS)
        with socket.create_connection(("127.0.0.1", exporter.port or 0), timeout=10) as extra:
            with contextlib.suppress(OSError):
                extra.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
            assert read_reply(extra) == (b"", True), "the connection over the cap was served"
        release.set()
        for sock in held:
            reply = read_answer(sock)
            assert reply.startswith(b"HTTP/1.1 200 "), reply[:100]
    finally:
        release.set()
        for sock in held:
            sock.close()
        exporter.stop()


def test_a_kept_connection_waits_for_the_next_scrape_past_the_heads_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Prometheus reuses its connection (and TLS session) from one scrape to the next: the
    head's deadline runs from its first byte, not from the accept, and the idle time between
    scrapes is not bounded by it."""
    clock = ManualTime()
    monkeypatch.setattr(metrics_http, "time", clock)
    exporter = small_exporter()
    exporter.start()
    try:
        with socket.create_connection(("127.0.0.1", exporter.port or 0), timeout=10) as sock:
            request = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
            for _ in range(2):
                sock.sendall(request)
                reply = read_answer(sock)
                assert reply.startswith(b"HTTP/1.1 200 "), reply[:100]
                # Short only once the first head is in: 0.5 s from the accept is a deadline a
                # busy machine's test thread can miss before it sends.
                monkeypatch.setattr(metrics_http, "REQUEST_HEAD_DEADLINE_S", 0.5)
                # Idle for three head deadlines in real time, then many on the server's clock.
                assert read_reply(sock, 1.5) == (b"", False), "the connection is kept"
                clock.now_s += 30.0
    finally:
        exporter.stop()


def test_a_stopped_exporter_hangs_up_its_kept_connections() -> None:
    """A kept connection waits up to KEEP_ALIVE_IDLE_S for its next request: a stop must not
    leave it served by the stopped exporter (a thread per scraper, the old settings)."""
    exporter = small_exporter()
    exporter.start()
    with socket.create_connection(("127.0.0.1", exporter.port or 0), timeout=10) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_answer(sock).startswith(b"HTTP/1.1 200 ")
        assert read_reply(sock, 0.1) == (b"", False), "the connection is kept"
        exporter.stop()
        assert read_reply(sock, 5.0) == (b"", True)


def test_a_connection_answered_as_the_exporter_stops_waits_for_nothing_more() -> None:
    """A connection between two requests when stop() hangs up the waiting ones must not go
    back to waiting (and be answered by the stopped exporter)."""
    exporter = small_exporter()
    exporter.start()
    server = exporter._server
    assert server is not None
    exporter.stop()
    ours, theirs = socket.socketpair()
    with ours, theirs:
        assert server.mark_waiting(ours, True) is False
        theirs.settimeout(5.0)
        assert theirs.recv(1) == b"", "hung up"


def test_a_request_head_still_coming_at_the_deadline_is_dropped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    deadline_s = metrics_http.REQUEST_HEAD_DEADLINE_S
    monkeypatch.setattr(metrics_http, "REQUEST_HEAD_DEADLINE_S", 0.5)
    exporter = small_exporter()
    exporter.start()
    try:
        with socket.create_connection(("127.0.0.1", exporter.port or 0), timeout=10) as sock:
            sock.sendall(b"GET /metrics HTTP/1.1\r\nX-Pad: ")
            assert drip_until_closed(sock, b"a"), "a slow client held its connection"
        assert wait_until(lambda: exporter.open_connections == 0)
        # The deadline is the head's, per request: a prompt scrape is untouched. With the
        # production deadline: 0.5 s from its thread's start is one a busy machine can miss.
        monkeypatch.setattr(metrics_http, "REQUEST_HEAD_DEADLINE_S", deadline_s)
        assert _get(f"http://127.0.0.1:{exporter.port}/metrics")[0] == 200
    finally:
        exporter.stop()


def test_a_request_head_over_the_byte_limit_is_answered_431(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(metrics_http, "MAX_REQUEST_HEAD_BYTES", 4096)
    exporter = small_exporter()
    exporter.start()
    try:
        # Six lines of 1 KB: each within Python's own limits (100 lines of 64 KiB).
        pads = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"a" * 1000) for i in range(6))
        with socket.create_connection(("127.0.0.1", exporter.port or 0), timeout=10) as sock:
            sock.sendall(b"GET /metrics HTTP/1.1\r\n" + pads + b"\r\n")
            reply, closed = read_reply(sock)
        assert reply.startswith(b"HTTP/1.1 431 "), reply[:200]
        assert closed
        assert _get(f"http://127.0.0.1:{exporter.port}/metrics", {"X-Pad": "a" * 2000})[0] == 200
    finally:
        exporter.stop()


def test_pipelined_requests_on_one_connection_are_each_answered() -> None:
    exporter = small_exporter()
    exporter.start()
    try:
        with socket.create_connection(("127.0.0.1", exporter.port or 0), timeout=10) as sock:
            sock.sendall(
                b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
                b"GET /nope HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
            )
            reply, closed = read_reply(sock)
        assert closed
        assert reply.count(b"HTTP/1.1 200 OK\r\n") == 1
        assert reply.count(b"HTTP/1.1 404 Not Found\r\n") == 1
    finally:
        exporter.stop()


def test_promtool_check_metrics_accepts_the_exposition() -> None:
    promtool = require_program("promtool", "prometheus")
    exporter = Exporter(MetricsConfig(), build_info=default_build_info())
    exporter.publish(full_snapshot())
    result = subprocess.run(
        [promtool, "check", "metrics"],
        input=exporter.render(),
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, (result.stdout + result.stderr).decode()


def _regen() -> None:
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN.write_bytes(small_exporter().render())
    print(f"wrote {GOLDEN}")


def test_a_server_a_reload_removed_leaves_no_token_total_behind() -> None:
    """Totals are kept per server name: a name no snapshot carries any more is let go."""
    exporter = Exporter(MetricsConfig(port=0), build_info=BUILD_INFO)
    first, second = small_snapshots()
    renamed = replace(first.servers[0], server="renamed")
    exporter.publish(replace(first, servers=(first.servers[0], renamed)))
    assert set(exporter._state.servers) == {"llama", "renamed"}
    exporter.publish(second)
    assert set(exporter._state.servers) == {"llama"}  # every total of "renamed" with it


if __name__ == "__main__":
    if sys.argv[1:] == ["--regen"]:
        _regen()
    else:
        sys.exit("usage: python -m tests.unit.test_exporter --regen")
