"""`powerd run` as systemd runs it, on a simulated node whose GPU state lives in a file."""

from __future__ import annotations

import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.helpers import (
    NotifySocket,
    ProcessOutput,
    changed_gpus,
    powerd,
    powerd_env,
    start_powerd,
    write_sim_config,
)

pytestmark = pytest.mark.slow

# A sustained load makes the controller lock clocks below the maximum within seconds.
LOCKING_SIM = {
    "gpus": 2,
    "tp": 1,
    "model": "llama-3.1-8b",
    "trace": "constant",
    "peak_load": 0.3,
}


def _wait_until(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _run_until_it_locks_then_sigkill(config: Path, state_file: Path) -> None:
    """Start `powerd run`, wait until it has changed a GPU, then SIGKILL it."""
    process = start_powerd("run", "--config", str(config))
    try:
        _wait_until(lambda: bool(changed_gpus(state_file)), 90, "powerd to lock a clock")
    finally:
        process.kill()
        process.communicate(timeout=30)


@contextmanager
def _run_with_notify(
    tmp_path: Path, *args: str, **env: str
) -> Iterator[tuple[subprocess.Popen[str], NotifySocket]]:
    """`powerd run *args` with a systemd notify socket; killed if the test leaves it running."""
    notify = NotifySocket(tmp_path / "notify.sock")
    process = start_powerd("run", *args, env=powerd_env(NOTIFY_SOCKET=str(notify.path), **env))
    try:
        yield process, notify
    finally:
        if process.poll() is None:
            process.kill()
        notify.close()


def _stop(
    process: subprocess.Popen[str],
    sig: int = signal.SIGTERM,
    output: ProcessOutput | None = None,
) -> str:
    """Send `sig`, wait for the exit (a kill after 60 s) and return all the process wrote
    (through `output` when one reads it)."""
    if process.poll() is None:
        process.send_signal(sig)
    if output is not None:
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        return output.text()
    try:
        text, _ = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        text, _ = process.communicate()
    return text


def test_notify_protocol_reload_and_restore_on_exit(tmp_path: Path) -> None:
    config = write_sim_config(tmp_path, sim={**LOCKING_SIM, "state_file": str(tmp_path / "g")})
    state_file = tmp_path / "g"
    with _run_with_notify(
        tmp_path, "--config", str(config), WATCHDOG_USEC="2000000", WATCHDOG_PID=""
    ) as (process, notify):
        notify.wait_for("READY=1")
        notify.wait_for("WATCHDOG=1")
        _wait_until(lambda: bool(changed_gpus(state_file)), 60, "powerd to lock a clock")
        process.send_signal(signal.SIGHUP)
        notify.wait_for("RELOADING=1")
        notify.wait_for("READY=1")
        notify.wait_for("WATCHDOG=1")
        output = _stop(process)
        notify.wait_for("STOPPING=1")
    assert process.returncode == 0, output
    fields = [m.split("\n")[0] for m in notify.messages]
    order = [f for f in fields if f in ("READY=1", "RELOADING=1", "STOPPING=1")]
    assert order == ["READY=1", "RELOADING=1", "READY=1", "STOPPING=1"], fields
    assert "WATCHDOG=1" in fields[fields.index("READY=1") :]
    assert changed_gpus(state_file) == {}, "every GPU is back at its defaults after exit"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _throttled(exposition: bytes) -> bool:
    """Whether a scrape shows a GPU's clock limit below its maximum."""
    values: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(exposition.decode()):
        for sample in family.samples:
            if sample.name in ("powerd_gpu_clock_limit_hertz", "powerd_gpu_max_clock_hertz"):
                values.setdefault(sample.labels["UUID"], {})[sample.name] = sample.value
    assert values, "no GPU clock series in the scrape"
    return any(
        v["powerd_gpu_clock_limit_hertz"] < v["powerd_gpu_max_clock_hertz"] for v in values.values()
    )


def test_a_clean_stop_waits_for_prometheus_to_see_the_gpus_restored(tmp_path: Path) -> None:
    """After SIGTERM the GPUs are restored and one more scrape shows it, so the last values
    Prometheus keeps of a deliberately stopped powerd are not throttled ones."""
    state_file = tmp_path / "g"
    port = _free_port()
    config = write_sim_config(
        tmp_path, metrics={"port": port}, sim={**LOCKING_SIM, "state_file": str(state_file)}
    )
    scrapes: list[bytes] = []
    stop = threading.Event()

    def scrape_every_second() -> None:
        while not stop.wait(1.0):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                    scrapes.append(r.read())
            except OSError:
                pass

    process = start_powerd("run", "--config", str(config))
    scraper = threading.Thread(target=scrape_every_second, daemon=True)
    try:
        _wait_until(lambda: bool(changed_gpus(state_file)), 90, "powerd to lock a clock")
        scraper.start()
        _wait_until(lambda: len(scrapes) >= 3 and _throttled(scrapes[-1]), 30, "a scrape of a lock")
        before = len(scrapes)
        output = _stop(process)
    finally:
        stop.set()
        scraper.join(timeout=10)
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output
    assert changed_gpus(state_file) == {}
    assert len(scrapes) > before, output
    assert not _throttled(scrapes[-1]), "the last scrape shows every GPU restored"
    assert "restored settings were scraped" in output, output


def test_sigkill_then_restore_brings_every_gpu_back(tmp_path: Path) -> None:
    state_file = tmp_path / "g"
    config = write_sim_config(tmp_path, sim={**LOCKING_SIM, "state_file": str(state_file)})
    _run_until_it_locks_then_sigkill(config, state_file)
    assert changed_gpus(state_file), "a SIGKILLed daemon leaves its settings behind"
    result = powerd("restore", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert changed_gpus(state_file) == {}
    again = powerd("restore", "--config", str(config))
    assert again.returncode == 0, "a second restore has nothing to do and succeeds"


def test_restart_restores_then_resumes_control(tmp_path: Path) -> None:
    state_file = tmp_path / "g"
    config = write_sim_config(tmp_path, sim={**LOCKING_SIM, "state_file": str(state_file)})
    _run_until_it_locks_then_sigkill(config, state_file)
    left_behind = changed_gpus(state_file)
    assert left_behind
    second = start_powerd("run", "--config", str(config))
    try:
        # The restore runs before the kernels compile, so the defaults are seen in between.
        _wait_until(lambda: not changed_gpus(state_file), 60, "the restart to restore")
        _wait_until(lambda: bool(changed_gpus(state_file)), 90, "control to resume")
        output = _stop(second)
    finally:
        if second.poll() is None:
            second.kill()
    assert "previous run did not finish" in output
    assert second.returncode == 0, output
    assert changed_gpus(state_file) == {}


def test_sighup_with_an_invalid_config_keeps_the_running_one(tmp_path: Path) -> None:
    config = write_sim_config(tmp_path)
    with _run_with_notify(tmp_path, "--config", str(config)) as (process, notify):
        notify.wait_for("READY=1")
        config.write_text("interval_s: -1\n")
        process.send_signal(signal.SIGHUP)
        notify.wait_for("RELOADING=1")
        notify.wait_for("READY=1")
        time.sleep(1.0)
        assert process.poll() is None, "an invalid config on reload does not stop the daemon"
        output = _stop(process)
    assert "invalid config, keeping the running one" in output
    assert "interval_s" in output
    assert process.returncode == 0


def test_run_without_nvidia_driver_is_one_clear_sentence(tmp_path: Path) -> None:
    config = tmp_path / "powerd.yaml"
    config.write_text(f"state_dir: {tmp_path}\n")
    result = powerd("run", "--config", str(config))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and "NVML is not available" in lines[-1], result.stderr


def test_bad_config_exits_78_and_names_the_key(tmp_path: Path) -> None:
    config = tmp_path / "powerd.yaml"
    config.write_text("servers:\n  - name: a\n    url: http://x\n    slo: {ttft_s: zero}\n")
    for command in (("check-config", str(config)), ("run", "--config", str(config))):
        result = powerd(*command)
        assert result.returncode == 78
        assert "servers[0].slo.ttft_s" in result.stderr
        assert "Traceback" not in result.stderr


def test_check_config_accepts_the_example(tmp_path: Path) -> None:
    """The example, its GPUs checked against a simulated node that has them (on a real node
    check-config checks them against the GPUs NVML opens)."""
    text = Path("config/powerd.yaml").read_text()
    assert "\ngpu_backend: nvml\n" in text
    config = tmp_path / "powerd.yaml"
    config.write_text(
        text.replace("\ngpu_backend: nvml\n", "\ngpu_backend: sim\n") + "sim: {gpus: 6, tp: 1}\n"
    )
    result = powerd("check-config", str(config))
    assert result.returncode == 0, result.stderr
    assert "OK (2 servers, mode efficiency; 6 GPUs opened)" in result.stdout


def test_dry_run_writes_nothing_even_across_a_reload(tmp_path: Path) -> None:
    state_file = tmp_path / "g"
    config = write_sim_config(tmp_path, sim={**LOCKING_SIM, "state_file": str(state_file)})
    with _run_with_notify(tmp_path, "--dry-run", "--config", str(config)) as (process, notify):
        written = ProcessOutput(process)
        notify.wait_for("READY=1")
        # The controller's first lower clock, as late as a busy machine makes it: held back.
        written.wait_for("would set", timeout_s=60.0)
        assert changed_gpus(state_file) == {}
        process.send_signal(signal.SIGHUP)
        notify.wait_for("RELOADING=1")
        notify.wait_for("READY=1")
        time.sleep(3.0)
        assert changed_gpus(state_file) == {}
        output = _stop(process, output=written)
    assert process.returncode == 0, output
    assert "would set" in output
    assert "started with --dry-run, which holds until it is restarted without it" in output
    assert output.count("started with --dry-run") == 1, "said at the reload, not at start"
    assert not (tmp_path / "state" / "journal.json").exists()


def test_restore_and_a_second_daemon_refuse_while_powerd_runs(tmp_path: Path) -> None:
    state_file = tmp_path / "g"
    config = write_sim_config(tmp_path, sim={**LOCKING_SIM, "state_file": str(state_file)})
    with _run_with_notify(tmp_path, "--config", str(config)) as (process, notify):
        notify.wait_for("READY=1")
        _wait_until(lambda: bool(changed_gpus(state_file)), 60, "powerd to lock a clock")
        restore = powerd("restore", "--config", str(config))
        assert restore.returncode == 1
        assert f"powerd is running (pid {process.pid})" in restore.stderr
        assert changed_gpus(state_file), "the running daemon's settings were left to it"
        second = powerd("run", "--config", str(config))
        assert second.returncode == 1
        assert "another powerd is running" in second.stderr
        output = _stop(process)
    assert process.returncode == 0, output
    assert changed_gpus(state_file) == {}
