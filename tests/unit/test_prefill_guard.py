"""The prefill guard: SGLang's /v1/loads read between ticks, and the raise it may trigger."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml

from powerd.config import (
    Config,
    ConfigError,
    ControlConfig,
    SimConfig,
    load_config,
    parse_config,
)
from powerd.control import kernels as k
from powerd.control.policy import Controller, GroupSpec, PolicyBase
from powerd.daemon import _mean_cap_mhz
from powerd.model import GroupDecision, GroupObservation, Snapshot
from powerd.sim.node import SimNode
from powerd.sources import FetchResponse, SourceError
from powerd.sources.fetch import KeepAliveFetcher
from powerd.sources.loads import (
    RETRY_AFTER_ERROR_S,
    PromptBacklogProbe,
    loads_url,
    parse_prompt_backlog,
)
from tests.unit.daemon_helpers import (
    HOST_SUFFIX,
    SET_CLOCKS,
    Rig,
    make_rig,
    metric_lines,
    metric_value,
)
from tests.unit.test_control_kernels import H100_CLOCKS, obs, spec

# ------------------------------------------------------------------------ /v1/loads


def _loads(*ranks: str) -> bytes:
    return (
        '{"timestamp": "2026-12-01T00:00:00+00:00", "loads": [' + ",".join(ranks) + "]}"
    ).encode()


def test_backlog_is_the_uncached_waiting_tokens_summed_over_ranks() -> None:
    body = _loads(
        '{"dp_rank": 0, "num_waiting_uncached_tokens": 4096, "num_used_tokens": 10,'
        ' "num_total_tokens": 99999}',
        '{"dp_rank": 1, "num_waiting_uncached_tokens": 904.0}',
    )
    assert parse_prompt_backlog(body) == 5000.0


def test_builds_without_the_uncached_field_give_total_less_used() -> None:
    body = _loads(
        '{"dp_rank": 0, "num_used_tokens": 12000, "num_total_tokens": 15000}',
        '{"dp_rank": 1, "num_used_tokens": 500, "num_total_tokens": 400}',
    )
    assert parse_prompt_backlog(body) == 3000.0


@pytest.mark.parametrize(
    "body",
    [
        b"<html>502 Bad Gateway</html>",
        b"\xff\xfe",
        b"[1, 2]",
        b'{"loads": []}',
        b'{"loads": {"dp_rank": 0}}',
        _loads("3"),
        _loads('{"dp_rank": 0}'),
        _loads('{"num_waiting_uncached_tokens": -1}'),
        _loads('{"num_waiting_uncached_tokens": NaN}'),
        _loads('{"num_waiting_uncached_tokens": "12"}'),
        _loads('{"num_waiting_uncached_tokens": true}'),
        _loads('{"num_total_tokens": 10}'),
    ],
)
def test_anything_else_is_a_clear_source_error(body: bytes) -> None:
    with pytest.raises(SourceError) as info:
        parse_prompt_backlog(body)
    assert str(info.value)


@pytest.mark.parametrize(
    ("metrics", "loads"),
    [
        ("http://10.0.0.5:30000/metrics", "http://10.0.0.5:30000/v1/loads?include=core"),
        ("https://[::1]:30000/metrics?x=1", "https://[::1]:30000/v1/loads?include=core"),
        ("sim://sglang-0/metrics", "sim://sglang-0/v1/loads?include=core"),
    ],
)
def test_loads_url_is_on_the_metrics_host(metrics: str, loads: str) -> None:
    assert loads_url(metrics) == loads


class _Fetch:
    def __init__(self, *answers: FetchResponse | Exception) -> None:
        self.answers = list(answers)
        self.urls: list[str] = []

    def __call__(self, url: str, timeout_s: float) -> FetchResponse:
        self.urls.append(url)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer


def test_probe_stops_asking_a_server_without_v1_loads(caplog: pytest.LogCaptureFixture) -> None:
    fetch = _Fetch(FetchResponse(404, b"Not Found"))
    probe = PromptBacklogProbe("sglang-0", "http://h:30000/metrics", fetch, 0.25)
    with caplog.at_level(logging.INFO):
        assert probe.read(0.0) is None
        assert probe.read(1.0) is None
    assert not probe.supported
    assert fetch.urls == ["http://h:30000/v1/loads?include=core"]
    assert "not served" in caplog.text


def test_probe_pauses_after_a_failure_logs_once_and_recovers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    good = FetchResponse(200, _loads('{"num_waiting_uncached_tokens": 7}'))
    fetch = _Fetch(
        SourceError("cannot connect to x: Connection refused"),
        FetchResponse(200, b"garbage"),
        good,
    )
    probe = PromptBacklogProbe("sglang-0", "http://h:30000/metrics", fetch, 0.25)
    with caplog.at_level(logging.INFO):
        assert probe.read(0.0) is None
        assert probe.read(RETRY_AFTER_ERROR_S / 2) is None  # paused: not fetched
        assert len(fetch.urls) == 1
        assert probe.read(RETRY_AFTER_ERROR_S) is None  # garbage this time
        assert probe.read(2 * RETRY_AFTER_ERROR_S) == 7.0
    assert probe.supported
    assert len(fetch.urls) == 3
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "Connection refused" in warnings[0].getMessage()
    assert "answers again" in caplog.text


def test_probe_reads_over_one_kept_connection() -> None:
    from powerd.sim.http_server import SimServerHttp

    backlog = iter(range(100, 1000, 100))
    connections: list[object] = []

    def render() -> tuple[bytes, str, dict[str, str]]:
        body = _loads(f'{{"num_waiting_uncached_tokens": {next(backlog)}}}')
        return body, "application/json", {}

    server = SimServerHttp(lambda: (b"", "text/plain", {}), extra_routes={"/v1/loads": render})
    server.start()
    try:
        own = KeepAliveFetcher()
        # Every read must succeed: a ceiling, not a production timeout (a second at most) that
        # a busy machine's late server thread can miss.
        probe = PromptBacklogProbe("sglang-0", server.url, own, 30.0)
        for now_s, want in ((0.0, 100.0), (0.33, 200.0), (0.66, 300.0)):
            assert probe.read(now_s) == want
            connections.append(own._connection)
        assert connections[0] is not None and connections.count(connections[0]) == 3
        probe.close()
        assert own._connection is None
        # A closed probe connects again when read.
        assert probe.read(1.0) == 400.0
        probe.close()
    finally:
        server.stop()


# ------------------------------------------------------------------------ the raise


def _learned(config: Config | None = None) -> tuple[Controller, int, float]:
    """A controller that learned ~10 prompt tokens/s per MHz at f_max, then came down under a
    light prompt load. Returns it, its cap and the learned capacity per MHz."""
    controller = Controller(config or Config(), [spec()])
    cap = 1980
    for t in range(3):
        cap = controller.decide(
            float(t), [obs(prompt_tokens_per_s=20000.0, waiting=2.0, sm_clock_mhz=cap)]
        )[0].sm_clock_max_mhz
    for t in range(60):
        cap = controller.decide(10.0 + t, [obs(prompt_tokens_per_s=2000.0, sm_clock_mhz=cap)])[
            0
        ].sm_clock_max_mhz
    prefill_k = float(controller.arrays.state[k.ST_PREFILL_K, 0])
    return controller, cap, prefill_k


def test_a_backlog_past_the_share_of_the_ttft_slo_raises_to_the_clock_that_prefills_it() -> None:
    controller, cap, prefill_k = _learned()
    assert cap < 1500 and prefill_k == pytest.approx(20000.0 / 1980.0)
    budget_s = k._GUARD_TTFT_SHARE * spec().slo.ttft_s
    # Just within the budget at the cap: nothing to do.
    assert controller.prefill_guard({"g0": 0.9 * prefill_k * cap * budget_s}) == {}
    backlog = 1.2 * prefill_k * cap * budget_s
    need = backlog / (prefill_k * budget_s)
    raised = controller.prefill_guard({"g0": backlog})
    step_up = min(c for c in H100_CLOCKS if c >= need)
    assert raised == {"g0": step_up}
    # More than f_max could do: f_max. Unknown groups and unknown backlogs are ignored.
    assert controller.prefill_guard({"g0": 1e9, "nope": 1e9}) == {"g0": 1980}
    assert controller.prefill_guard({"g0": math.nan}) == {}
    # The guard reads the controller's state and leaves it as it was.
    before = controller.arrays.state.copy()
    controller.prefill_guard({"g0": backlog})
    np.testing.assert_array_equal(controller.arrays.state, before)


@pytest.mark.parametrize(
    "config",
    [Config(mode="off"), Config(mode="budget", node_power_budget_w=2000.0)],
)
def test_no_raise_between_ticks_in_off_and_budget_modes(config: Config) -> None:
    """Between ticks a node budget is not re-shared and an observing daemon writes nothing.
    The mode alone must say so: an off tick leaves the cap at f_max, so a controller that only
    ever ran in off mode has nothing to raise whatever the mode check says. Here it is given
    what an efficiency run learned and last decided (a lowered cap), from which efficiency
    mode raises."""
    learned, cap, _ = _learned()
    assert cap < 1980
    for mode_config, want in ((Config(), {"g0": 1980}), (config, {})):
        controller = Controller(mode_config, [spec()])
        controller.arrays.state[:] = learned.arrays.state
        controller.arrays.out[:] = learned.arrays.out
        assert controller.prefill_guard({"g0": 1e9}) == want, mode_config.mode


def test_a_fresh_controller_never_raises() -> None:
    controller = Controller(Config(), [spec()])
    assert controller.prefill_guard({"g0": 1e9}) == {}


# ------------------------------------------------------------------------ config


def test_guard_interval_config() -> None:
    assert Config().control.prefill_guard_interval_s == 0.33
    assert parse_config({"control": {"prefill_guard_interval_s": 0}}).control == ControlConfig(
        prefill_guard_interval_s=0
    )
    for bad in (-1, 0.01, 11):
        with pytest.raises(ConfigError, match="prefill_guard_interval_s"):
            parse_config({"control": {"prefill_guard_interval_s": bad}})


# ------------------------------------------------------------------------ in the daemon

SGLANG_NODE = SimConfig(
    gpu_model="a100-sxm4-80gb",
    gpus=2,
    tp=1,
    model="llama-3.1-8b",
    server_kind="sglang",
    trace="constant",
    peak_load=0.6,
)
"""Two A100s with an 8B SGLang server each: long prompts prefill slowly enough to queue."""


def _run_with_guard(rig: Rig, seconds: int, parts: int = 4) -> list[tuple[float, int, int]]:
    """Tick every second and guard in between; (time, group, cap after it) of every raise,
    at a tick or between ticks (an unlocked GPU runs up to f_max)."""
    raises: list[tuple[float, int, int]] = []
    f_max = rig.node.plant.profile.sm_clock_max_mhz

    def note_raises(before: list[int]) -> None:
        for i, group in enumerate(rig.daemon.groups):
            if group.guard_raises_total > before[i]:
                raises.append((rig.node.now_s, i, _locked(rig, i) or f_max))

    for _ in range(seconds):
        for _part in range(parts - 1):
            rig.node.advance(1.0 / parts)
            before = [g.guard_raises_total for g in rig.daemon.groups]
            rig.daemon.guard(rig.node.now_s)
            note_raises(before)
        rig.node.advance(1.0 / parts)
        before = [g.guard_raises_total for g in rig.daemon.groups]
        rig.snapshots.append(rig.daemon.tick(rig.node.now_s))
        note_raises(before)
    return raises


def _locked(rig: Rig, index: int) -> int | None:
    """The upper end of GPU index's locked clock range, None when unlocked."""
    lock = rig.node.plant.locked_clocks(index)
    return None if lock is None else lock[1]


def test_guard_raises_an_sglang_groups_cap_at_and_between_ticks_above_the_decision(
    tmp_path: Path,
) -> None:
    rig = make_rig(tmp_path, sim=SGLANG_NODE, record=True)
    raises = _run_with_guard(rig, 240)
    at_ticks = [r for r in raises if r[0] == int(r[0])]
    assert at_ticks and len(at_ticks) < len(raises), "raises both at and between ticks"
    decisions = rig.recorder.decisions  # decisions[i]: the tick at i + 1 s
    for when, group, locked in raises:
        start_s = float(int(when))  # the tick whose decision is in force
        chosen = decisions[int(start_s) - 1][group].sm_clock_max_mhz
        assert locked > chosen, (when, group, locked, chosen)
        # The next tick judges the cap the controller chose, and credits the interval's prompt
        # work to the caps in force over it (a raise at a tick holds from its start).
        held = [(w, c) for w, g, c in raises if g == group and start_s <= w < start_s + 1.0]
        mean_cap = _mean_cap_mhz(chosen, held, start_s, start_s + 1.0)
        assert chosen < mean_cap <= max(c for _, c in held)
        seen = rig.recorder.observations[int(start_s)][group]
        assert seen.sm_clock_mhz is not None and seen.sm_clock_mhz <= chosen
        assert seen.interval_clock_cap_mhz is not None
        assert seen.sm_clock_mhz <= seen.interval_clock_cap_mhz <= mean_cap + 1e-6
    # Each tick applies the controller's decision, or the raise its own read of the backlog
    # called for.
    f_max = rig.node.plant.profile.sm_clock_max_mhz
    last_s = rig.node.now_s
    for i, decision in enumerate(decisions[-1]):
        raised = [c for w, g, c in raises if g == i and w == last_s]
        if raised:
            assert (_locked(rig, i) or f_max) == raised[0]
        else:
            expected = None if decision.sm_clock_max_mhz >= f_max else decision.sm_clock_max_mhz
            assert _locked(rig, i) == expected
    text = rig.metrics()
    counts = [
        metric_value(line) for line in metric_lines(text, "powerd_group_prefill_guard_raises_total")
    ]
    assert sum(counts) == sum(g.guard_raises_total for g in rig.daemon.groups) == len(raises)
    assert metric_lines(text, "powerd_group_prompt_backlog_tokens")


def test_a_reload_that_changes_only_an_slo_keeps_the_groups_count_of_raises(
    tmp_path: Path,
) -> None:
    """The changed server gets a new group; its counter carries on, as a counter must within
    one process."""
    path = tmp_path / "powerd.yaml"

    def write(node: SimNode, itl_s: float) -> None:
        servers = [
            {
                "name": server.name,
                "url": f"http://{server.name}{HOST_SUFFIX}/metrics",
                "kind": "sglang",
                "gpus": list(server.gpu_indices),
                "slo": {"itl_s": itl_s},
            }
            for server in node.servers
        ]
        path.write_text(yaml.safe_dump({"servers": servers}))

    def configure(node: SimNode) -> Config:
        write(node, 0.1)
        return load_config(path)

    def exported() -> dict[str, float]:
        lines = metric_lines(rig.metrics(), "powerd_group_prefill_guard_raises_total")
        return {line.split('group="')[1].split('"')[0]: metric_value(line) for line in lines}

    rig = make_rig(tmp_path, sim=SGLANG_NODE, configure=configure)
    _run_with_guard(rig, 120)
    before = exported()
    assert sorted(before) == ["sglang-0", "sglang-1"] and sum(before.values()) > 0
    groups = list(rig.daemon.groups)
    write(rig.node, 0.09)
    assert rig.daemon.reload(path)
    assert all(new is not old for new, old in zip(rig.daemon.groups, groups, strict=True))
    _run_with_guard(rig, 5)
    after = exported()
    assert sorted(after) == sorted(before)
    assert all(after[name] >= count for name, count in before.items()), (before, after)


def test_guard_leaves_vllm_groups_alone_and_never_asks_for_v1_loads(tmp_path: Path) -> None:
    rig = make_rig(tmp_path, sim=replace(SGLANG_NODE, server_kind="vllm"))
    assert not rig.daemon.guards_backlog
    assert _run_with_guard(rig, 60) == []
    assert rig.fetch.urls and not [url for url in rig.fetch.urls if "/v1/loads" in url]
    assert not metric_lines(rig.metrics(), "powerd_group_prefill_guard_raises_total")


def test_an_sglang_server_without_v1_loads_is_asked_once(tmp_path: Path) -> None:
    rig = make_rig(tmp_path, sim=SGLANG_NODE)
    asked: list[str] = []
    inner = rig.fetch.__call__

    def fetch(url: str, timeout_s: float) -> FetchResponse:
        asked.append(url)
        if "/v1/loads" in url:
            return FetchResponse(404, b"Not Found")
        return inner(url, timeout_s)

    rig.daemon._fetch = fetch
    assert _run_with_guard(rig, 30) == []
    loads = [url for url in asked if "/v1/loads" in url]
    assert len(loads) == len(rig.daemon.groups)
    assert all(
        g.backlog_probe is not None and not g.backlog_probe.supported for g in rig.daemon.groups
    )
    # The groups are still controlled at each tick.
    assert any(fn == SET_CLOCKS for fn, _, _ in rig.fake.writes)


@pytest.mark.parametrize(
    "fields",
    [
        {"control": ControlConfig(prefill_guard_interval_s=0)},
        {"interval_s": 0.4},  # too short a tick for two reads between ticks
    ],
)
def test_guard_is_off_at_zero_or_with_short_ticks(tmp_path: Path, fields: dict) -> None:
    rig = make_rig(tmp_path, sim=SGLANG_NODE, **fields)
    assert not rig.daemon.guards_backlog
    assert _run_with_guard(rig, 120) == []
    assert not [url for url in rig.fetch.urls if "/v1/loads" in url]


@pytest.mark.parametrize("kind", ["sglang", "vllm"])
def test_run_forever_guards_between_ticks_only_where_a_server_may_report_a_backlog(
    tmp_path: Path, kind: str
) -> None:
    rig = make_rig(
        tmp_path,
        sim=replace(SGLANG_NODE, server_kind=kind),
        interval_s=0.5,
        control=ControlConfig(prefill_guard_interval_s=0.1),
    )
    daemon = rig.daemon
    events: list[str] = []
    tick, guard = daemon.tick, daemon.guard

    def counted_tick(now_s: float, *, unix_time_s: float | None = None) -> Snapshot:
        events.append("tick")
        return tick(now_s, unix_time_s=unix_time_s)

    def counted_guard(now_s: float) -> int:
        events.append("guard")
        return guard(now_s)

    daemon.tick = counted_tick  # type: ignore[method-assign]
    daemon.guard = counted_guard  # type: ignore[method-assign]
    daemon.run_forever(duration_s=1.2)
    assert events.count("tick") >= 2
    if kind == "vllm":
        assert "guard" not in events
        return
    # Three or four reads between two ticks (real time: the machine may be busy), none before
    # the first tick.
    assert events[0] == "tick"
    between = [len(run) for run in "".join(e[0] for e in events).split("t")[1:-1]]
    assert between and all(2 <= n <= 4 for n in between), events


def test_a_running_server_between_counted_batches_is_not_stale(tmp_path: Path) -> None:
    """A slow model's SGLang counts a batch of decode tokens only every several seconds: the
    ticks in between have no rate, and the group must not go back to default clocks."""
    rig = make_rig(tmp_path, sim=SGLANG_NODE, stale_after_s=3.0)
    rig.run(30)
    group = rig.daemon.groups[0]
    sample = group.last_sample
    assert sample is not None and sample.up
    silent = replace(sample, generation_tokens_per_s=None, running=12.0)
    readings = rig.daemon.roster.read(rig.daemon.groups)
    for t in range(10):
        now_s = rig.node.now_s + 1.0 + t
        observation = rig.daemon._observe(group, silent, readings, now_s, 1.0)
        assert not observation.stale
    idle = replace(sample, generation_tokens_per_s=None, running=0.0)
    observations = [
        rig.daemon._observe(group, idle, readings, rig.node.now_s + 11.0 + t, 1.0) for t in range(5)
    ]
    assert observations[-1].stale


def test_a_dry_run_counts_the_raises_it_would_make_and_writes_and_logs_none(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rig = make_rig(tmp_path, sim=SGLANG_NODE, dry_run=True)
    guard = rig.daemon.guard
    logged_by_guard: list[str] = []

    def watched_guard(now_s: float) -> int:
        before = len(caplog.records)
        raised = guard(now_s)
        logged_by_guard.extend(r.getMessage() for r in caplog.records[before:])
        return raised

    rig.daemon.guard = watched_guard  # type: ignore[method-assign]
    with caplog.at_level(logging.INFO):
        _run_with_guard(rig, 120)
    raises = sum(g.guard_raises_total for g in rig.daemon.groups)
    assert raises > 0
    assert rig.fake.writes == []
    assert logged_by_guard == []
    assert any("would set" in r.getMessage() for r in caplog.records)  # the ticks still say
    text = rig.metrics()
    exported = metric_lines(text, "powerd_group_prefill_guard_raises_total")
    assert sum(metric_value(line) for line in exported) == raises


def test_the_backlog_gauge_goes_away_while_the_group_is_at_f_max(tmp_path: Path) -> None:
    rig = make_rig(tmp_path, sim=SGLANG_NODE)
    _run_with_guard(rig, 120)
    f_max = rig.node.plant.profile.sm_clock_max_mhz
    statuses = [g for snapshot in rig.snapshots for g in snapshot.groups]
    assert all(g.sm_clock_max_mhz is not None for g in statuses)
    at_f_max = [g for g in statuses if (g.sm_clock_max_mhz or 0) >= f_max]
    below = [g for g in statuses if (g.sm_clock_max_mhz or 0) < f_max]
    assert at_f_max and below
    assert all(g.prompt_backlog_tokens is None for g in at_f_max)
    assert any(g.prompt_backlog_tokens is not None for g in below)
    # Between ticks too: a group the guard skips at f_max drops its last figure.
    group = next(g for g in rig.daemon.groups if g.prompt_backlog_tokens is not None)
    assert group.decision is not None
    group.decision = replace(group.decision, sm_clock_max_mhz=f_max)
    rig.daemon.guard(rig.node.now_s)
    assert group.prompt_backlog_tokens is None


class _NoGuardPolicy(PolicyBase):
    """Decides as the Controller does and has no prefill guard (PolicyBase's)."""

    name = "no-guard"

    def __init__(self, config: Config, groups: Sequence[GroupSpec]) -> None:
        self._inner = Controller(config, groups)

    def decide(self, now_s: float, observations: Sequence[GroupObservation]) -> list[GroupDecision]:
        return self._inner.decide(now_s, observations)


def test_a_policy_that_defines_a_prefill_guard_is_asked_for_it() -> None:
    """PolicyBase's guards_prefill follows whether a subclass has its own guard: one that
    defines prefill_guard and forgets guards_prefill must not lose its guard without a word."""

    class Guarding(_NoGuardPolicy):
        def prefill_guard(self, backlog_tokens: Mapping[str, float]) -> dict[str, int]:
            return {name: 1980 for name in backlog_tokens}

    config = Config()
    assert Guarding(config, []).guards_prefill
    assert not _NoGuardPolicy(config, []).guards_prefill


@pytest.mark.parametrize("mode", ["no guard", "budget", "off"])
def test_a_policy_without_a_prefill_guard_has_no_backlog_read(tmp_path: Path, mode: str) -> None:
    """A read of /v1/loads four times a second, for a policy that cannot use it (one with no
    guard; the Controller between ticks in budget and off modes), is an HTTP request to the
    server and a wait on it for nothing."""
    if mode == "no guard":
        rig = make_rig(tmp_path, sim=SGLANG_NODE)
        groups = [g.spec for g in rig.daemon.groups]
        rig.daemon.policy = _NoGuardPolicy(rig.daemon.config, groups)
    else:
        rig = make_rig(tmp_path, sim=SGLANG_NODE, mode=mode, node_power_budget_w=900.0)
    for _ in range(20):
        rig.node.advance(0.5)
        rig.daemon.guard(rig.node.now_s)
        rig.node.advance(0.5)
        rig.daemon.tick(rig.node.now_s)
    assert not any("/v1/loads" in url for url in rig.fetch.urls)
    assert all(group.prompt_backlog_tokens is None for group in rig.daemon.groups)
