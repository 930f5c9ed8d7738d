"""The `powerd` command run in-process, as systemd and a sysadmin call it."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import yaml

from powerd import __version__, runtime
from powerd import journal as journal_module
from powerd.actuator import Actuator
from powerd.cli import EX_CONFIG, main
from powerd.config import SimConfig
from powerd.daemon import Daemon
from powerd.gpu.errors import GpuError, GpuUnavailable
from powerd.gpu.nvml import NvmlBackend
from powerd.journal import Journal
from powerd.model import GroupDecision
from powerd.simulation import detached_fake_nvml
from powerd.wording import counted
from tests.integration.helpers import changed_gpus


def _throttled_node(tmp_path: Path) -> tuple[dict[str, Any], Path]:
    """A simulated node whose GPU 0 powerd locked and then left (kill -9): its config data
    and its device state file."""
    state_file = tmp_path / "gpus.json"
    sim = SimConfig(gpus=2, tp=1, state_file=str(state_file))
    backend = NvmlBackend(detached_fake_nvml(sim))
    actuator = Actuator(backend, Journal(tmp_path / "state" / "journal.json"), dry_run=False)
    devices = backend.devices()
    for info in devices:
        actuator.track(info)
    actuator.apply(GroupDecision("g", 1500, None, "efficiency"), [devices[0].uuid])
    backend.close()
    assert changed_gpus(state_file)
    data = {
        "gpu_backend": "sim",
        "state_dir": str(tmp_path / "state"),
        "sim": {"gpus": 2, "tp": 1, "state_file": str(state_file)},
    }
    return data, state_file


@pytest.mark.parametrize(
    "edit",
    [
        lambda text: text + "interval_s: 1s\n",  # an edit not reloaded yet
        lambda text: text + "mode: off\nmode: budget\n",
        lambda text: text.replace("tp: 1", "tp: 3").replace("gpus: 2", "gpus: 2\n  seed: x"),
        lambda text: "# price in €\n" + text,
    ],
    ids=["bad-value", "duplicate-key", "bad-sim", "not-utf8"],
)
def test_restore_puts_the_gpus_back_although_the_config_is_invalid(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, edit: object
) -> None:
    data, state_file = _throttled_node(tmp_path)
    config = tmp_path / "powerd.yaml"
    text = edit(yaml.safe_dump(data))  # type: ignore[operator]
    config.write_bytes(text.encode("cp1252"))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="powerd"):
        assert main(["restore", "--config", str(config)]) == 0
    assert changed_gpus(state_file) == {}
    assert not (tmp_path / "state" / "journal.json").exists()
    warning = next(r for r in caplog.records if r.levelno >= logging.WARNING).getMessage()
    assert warning.startswith(str(config)), warning
    assert "reading only state_dir, gpu_backend, sim from it" in warning or (
        "restoring with the defaults" in warning
    )


def test_restore_with_an_unreadable_config_and_a_state_dir_given(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data, state_file = _throttled_node(tmp_path)
    config = tmp_path / "powerd.yaml"
    config.write_text(yaml.safe_dump({**data, "state_dir": str(tmp_path / "elsewhere")}))
    assert main(["restore", "--config", str(config), "--state-dir", str(tmp_path / "state")]) == 0
    assert changed_gpus(state_file) == {}

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="powerd"):
        rc = main(
            ["restore", "--config", str(tmp_path / "missing.yaml"), "--state-dir", str(tmp_path)]
        )
    assert rc == 0, "nothing to restore there"
    assert "cannot read config" in caplog.text
    assert f"restoring with the defaults (state_dir {tmp_path}, gpu_backend nvml)" in caplog.text


def test_restore_refuses_an_empty_state_dir(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["restore", "--state-dir", ""])
    assert exit_info.value.code == 2
    assert "argument --state-dir: must not be empty" in capsys.readouterr().err


def _restore_from(tmp_path: Path, state_dir: Path, *options: str) -> int:
    """`powerd restore --state-dir state_dir [options]` (no config file: the defaults
    otherwise)."""
    config = str(tmp_path / "none.yaml")
    return main(["restore", "--config", config, "--state-dir", str(state_dir), *options])


@pytest.mark.parametrize(("boot_now", "status"), [("boot-b", 0), ("boot-a", 1)])
def test_restore_drops_a_replaced_gpu_once_the_node_rebooted(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    boot_now: str,
    status: int,
) -> None:
    """The card powerd controlled was replaced (its UUID never comes back): after a reboot,
    which reset it, its entry goes and the restore succeeds; in the same boot it stays."""
    boot_id = tmp_path / "boot_id"
    monkeypatch.setattr(journal_module, "BOOT_ID_FILE", boot_id)
    boot_id.write_text("boot-a\n")
    data, _ = _throttled_node(tmp_path)
    journal = tmp_path / "state" / "journal.json"
    document = json.loads(journal.read_text())
    document["entries"][0]["uuid"] = "GPU-00000000-old-card"
    journal.write_text(json.dumps(document))
    config = tmp_path / "powerd.yaml"
    config.write_text(yaml.safe_dump(data))
    boot_id.write_text(boot_now + "\n")

    with caplog.at_level(logging.INFO, logger="powerd"):
        assert main(["restore", "--config", str(config)]) == status
    assert journal.exists() == (status == 1)
    assert (
        "GPU GPU-00000000-old-card: gone, and saved before the node rebooted" in caplog.text
    ) == (status == 0)


def _journal_of_two(tmp_path: Path) -> tuple[list[str], Path]:
    """_throttled_node with GPU 1's settings saved too: the journal's UUIDs, and the GPUs'
    state file."""
    data, state_file = _throttled_node(tmp_path)
    backend = NvmlBackend(detached_fake_nvml(SimConfig(**data["sim"])))
    journal = Journal(tmp_path / "state" / "journal.json")
    second = backend.devices()[1]
    journal.remember(backend, second.uuid, second)
    backend.close()
    return [entry.uuid for entry in journal.entries()], state_file


def test_forget_removes_only_the_named_entry_and_touches_no_gpu(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A card replaced within the same boot, or taken out, cannot be restored: the operator
    lets it go without waiting for a reboot."""
    (first, second), state_file = _journal_of_two(tmp_path)
    left = changed_gpus(state_file)
    state = tmp_path / "state"
    capsys.readouterr()
    assert _restore_from(tmp_path, state, "--forget", second) == 0
    out = capsys.readouterr().out
    assert f"forgot GPU {second} (index 1, " in out and first not in out
    assert [entry.uuid for entry in Journal(state / "journal.json").entries()] == [first]
    assert changed_gpus(state_file) == left != {}
    assert _restore_from(tmp_path, state, "--forget", first) == 0
    assert not (state / "journal.json").exists()
    assert changed_gpus(state_file) == left


@pytest.mark.parametrize("named", [["GPU-unknown"], ["first", "GPU-unknown"]])
def test_forget_of_a_gpu_not_in_the_journal_changes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], named: list[str]
) -> None:
    (first, second), _ = _journal_of_two(tmp_path)
    journal = tmp_path / "state" / "journal.json"
    before = journal.read_bytes()
    capsys.readouterr()
    forget = [part for uuid in named for part in ("--forget", first if uuid == "first" else uuid)]
    assert _restore_from(tmp_path, journal.parent, *forget) == 1
    last = capsys.readouterr().err.splitlines()[-1]  # after the missing config's warning
    assert last == (
        f"powerd restore: GPU-unknown is not in {journal} (it holds {first}, {second}); "
        "nothing forgotten"
    )
    assert journal.read_bytes() == before


def test_forget_of_an_empty_uuid_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["restore", "--state-dir", str(tmp_path), "--forget", " "])
    assert exit_info.value.code == 2
    assert "--forget: must not be empty" in capsys.readouterr().err


def test_forget_keeps_a_corrupt_journal_and_the_state_dir_checks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A corrupt journal stays for `powerd restore`, which resets every clock for it."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / "journal.json").write_bytes(b"{ cut short")
    assert _restore_from(tmp_path, state, "--forget", "GPU-x") == 1
    assert "nothing forgotten" in capsys.readouterr().err
    assert (state / "journal.json").read_bytes() == b"{ cut short"
    state.chmod(0o777)
    assert _restore_from(tmp_path, state, "--forget", "GPU-x") == 1
    assert "cannot use the state directory" in capsys.readouterr().err.splitlines()[-1]


def test_a_state_dir_others_can_write_is_refused_and_nothing_is_written_through(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """powerd runs as root and restores GPUs from its state directory: a folder another user
    can write (a planted journal, a lock file linked to /etc/...) is refused in one line."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    assert _restore_from(tmp_path, shared) == 1
    last = capsys.readouterr().err.splitlines()[-1]  # after the missing config's warning
    assert last.startswith("powerd restore: cannot use the state directory: ")
    assert last.endswith(f"chmod go-w {shared}")

    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    victim = tmp_path / "victim.conf"
    victim.write_text("root-owned file that must not change")
    (private / "powerd.lock").symlink_to(victim)
    assert _restore_from(tmp_path, private) == 1
    assert "cannot use the state directory" in capsys.readouterr().err
    assert victim.read_text() == "root-owned file that must not change"


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a link to another user needs root")
def test_a_state_dir_linked_by_another_user_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A link another user planted (say /tmp/powerd -> /etc) passes a check of its target."""
    target = tmp_path / "target"
    target.mkdir(mode=0o700)
    link = tmp_path / "powerd"
    link.symlink_to(target)
    os.lchown(link, 65534, 65534)
    assert _restore_from(tmp_path, link) == 1
    last = capsys.readouterr().err.splitlines()[-1]
    assert "is a link made by uid 65534" in last
    assert not (target / "powerd.lock").exists()
    os.lchown(link, 0, 0)
    assert _restore_from(tmp_path, link) == 0


def _run_throttled_node_in_a_child(
    tmp_path: Path, script: str
) -> tuple[subprocess.CompletedProcess[str], Path]:
    """`script` (given the config's path) run in a Python of its own over _throttled_node, its
    metrics on a free port and no final scrape wait; the finished process and the GPUs'
    state file."""
    data, state_file = _throttled_node(tmp_path)
    config = tmp_path / "powerd.yaml"
    config.write_text(yaml.safe_dump({**data, "metrics": {"port": 0, "final_scrape_wait_s": 0}}))
    done = subprocess.run(
        [sys.executable, "-c", script, str(config)], capture_output=True, text=True, timeout=120
    )
    return done, state_file


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a folder to another user needs root")
def test_a_state_dir_inside_another_users_folder_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Its owner could swap the state folder for another while powerd runs."""
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, 65534, 65534)
    state = theirs / "state"
    state.mkdir(mode=0o700)
    assert _restore_from(tmp_path, state) == 1
    assert f"{theirs} belongs to uid 65534" in capsys.readouterr().err.splitlines()[-1]


def test_a_state_dir_is_checked_before_it_is_made_and_may_not_climb(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A missing state folder in a folder others can write is not made there; '..' would be
    read past a link, checking one folder and using another."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    missing = shared / "powerd"
    assert _restore_from(tmp_path, missing) == 1
    assert f"chmod go-w {shared}" in capsys.readouterr().err.splitlines()[-1]
    assert not missing.exists()
    climbing = tmp_path / "a" / ".." / "state"
    assert _restore_from(tmp_path, climbing) == 1
    assert "may not contain '..'" in capsys.readouterr().err.splitlines()[-1]


_SIGNALS_WHILE_STARTING = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from powerd import journal, runtime
    from powerd.cli import main

    real_restore_all = runtime.restore_all

    def restore_all(*args, **kwargs):
        # A log rotation's SIGHUP, then systemd's SIGTERM, while a killed run is restored.
        os.kill(os.getpid(), signal.SIGHUP)
        os.kill(os.getpid(), signal.SIGTERM)
        return real_restore_all(*args, **kwargs)

    runtime.restore_all = restore_all
    sys.exit(main(["run", "--config", sys.argv[1]]))
    """
)


def test_signals_while_starting_neither_kill_powerd_nor_cut_the_restore_short(
    tmp_path: Path,
) -> None:
    done, state_file = _run_throttled_node_in_a_child(tmp_path, _SIGNALS_WHILE_STARTING)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "stopped while starting" in done.stderr
    assert changed_gpus(state_file) == {}
    assert not (tmp_path / "state" / "journal.json").exists()


_SIGTERM_AS_HANDLERS_CHANGE = textwrap.dedent(
    """
    import os, signal, sys
    from powerd import daemon
    from powerd.cli import main

    real_install = daemon.Daemon.install_signal_handlers

    def install(self):
        # systemd's SIGTERM just as the daemon's handlers replace the early ones.
        os.kill(os.getpid(), signal.SIGTERM)
        real_install(self)

    daemon.Daemon.install_signal_handlers = install
    sys.exit(main(["run", "--config", sys.argv[1]]))
    """
)


def test_a_sigterm_as_the_daemons_handlers_are_installed_is_not_lost(tmp_path: Path) -> None:
    done, state_file = _run_throttled_node_in_a_child(tmp_path, _SIGTERM_AS_HANDLERS_CHANGE)
    assert done.returncode == 0, done.stderr[-2000:]
    assert changed_gpus(state_file) == {}


def test_run_on_one_simulated_gpu_counts_it_and_its_server_in_the_singular(
    tmp_path: Path,
) -> None:
    config = tmp_path / "powerd.yaml"
    data = {
        "gpu_backend": "sim",
        "state_dir": str(tmp_path / "state"),
        "metrics": {"port": 0, "final_scrape_wait_s": 0},
        "sim": {"gpus": 1, "tp": 1, "trace": "constant", "state_file": str(tmp_path / "g")},
    }
    config.write_text(yaml.safe_dump(data))
    done = subprocess.run(
        [sys.executable, "-c", _SIGTERM_AS_HANDLERS_CHANGE, str(config)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"powerd {__version__}: 1 GPU, 1 server, mode efficiency" in done.stderr


def _nvml_unavailable(monkeypatch: pytest.MonkeyPatch, why: str) -> None:
    """Opening NVML fails, as it does without a loaded driver or after an upgrade (`why`)."""

    def unavailable(config: object) -> None:
        raise GpuUnavailable(why)

    monkeypatch.setattr(runtime, "open_backend", unavailable)


def test_a_corrupt_journal_waits_for_nvml_before_it_is_put_aside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, state_file = _throttled_node(tmp_path)
    journal = tmp_path / "state" / "journal.json"
    journal.write_bytes(b"{ cut short")
    config = tmp_path / "powerd.yaml"
    config.write_text(yaml.safe_dump(data))

    _nvml_unavailable(monkeypatch, "NVML is not loaded yet")
    assert main(["restore", "--config", str(config)]) == 1
    assert journal.exists(), "kept for the next attempt, which can reset the clocks"
    monkeypatch.undo()
    assert main(["restore", "--config", str(config)]) == 1, "a corrupt journal is reported"
    assert changed_gpus(state_file) == {}, "and every clock was reset"


def test_a_restore_without_nvml_names_the_gpus_left_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A driver upgraded under a running powerd that then crashed: no new process opens
    NVML (LIB_RM_VERSION_MISMATCH) until the module is reloaded, and the GPUs keep powerd's
    settings until then; the sysadmin is told which."""
    data, state_file = _throttled_node(tmp_path)
    config = tmp_path / "powerd.yaml"
    config.write_text(yaml.safe_dump(data))

    _nvml_unavailable(monkeypatch, "NVML is not available: the NVIDIA driver was upgraded")
    assert main(["restore", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert "the NVIDIA driver was upgraded" in err
    changed = changed_gpus(state_file)
    assert changed
    assert f"the settings powerd set stay on {counted(len(changed), 'GPU')} until" in err
    journal = tmp_path / "state" / "journal.json"
    for entry in json.loads(journal.read_text())["entries"]:
        assert entry["uuid"] in err


def test_a_restore_without_nvml_names_no_gpu_a_reboot_reset_and_warns_of_a_corrupt_journal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    boot = tmp_path / "boot_id"
    monkeypatch.setattr(journal_module, "BOOT_ID_FILE", boot)
    boot.write_text("before-the-reboot\n")
    data, _ = _throttled_node(tmp_path)
    boot.write_text("now\n")  # the node rebooted: that GPU is back at its defaults
    config = tmp_path / "powerd.yaml"
    config.write_text(yaml.safe_dump(data))

    _nvml_unavailable(monkeypatch, "NVML is not available: the NVIDIA kernel driver is not loaded")
    assert main(["restore", "--config", str(config)]) == 1
    assert "keep the settings powerd set" not in capsys.readouterr().err
    (tmp_path / "state" / "journal.json").write_bytes(b"{ cut short")
    assert main(["restore", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert "corrupt" in err and "any GPU's clocks may still be locked" in err


@pytest.mark.parametrize("level", ["loud", ""])
def test_a_bad_log_level_in_the_environment_never_stops_restore(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], level: str
) -> None:
    monkeypatch.setenv("POWERD_LOG_LEVEL", level)
    data, state_file = _throttled_node(tmp_path)
    config = tmp_path / "powerd.yaml"
    config.write_text(yaml.safe_dump(data))
    assert main(["restore", "--config", str(config)]) == 0
    assert changed_gpus(state_file) == {}
    err = capsys.readouterr().err
    assert ("POWERD_LOG_LEVEL: log level 'loud' is not one of" in err) == (level == "loud")
    assert "Traceback" not in err


def test_log_level_is_checked_and_taken_after_the_subcommand_too(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--log-level", "loud", "check-config", "x.yaml"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'loud'" in capsys.readouterr().err
    assert main(["restore", "--log-level", "DEBUG", "--state-dir", str(tmp_path)]) == 0
    assert logging.getLogger().level == logging.DEBUG
    # Every subcommand takes it, status included (nothing listens there: exit 1, not usage's 2).
    url = "http://127.0.0.1:9/metrics"
    assert main(["status", "--log-level", "warning", "--url", url]) == 1
    assert logging.getLogger().level == logging.WARNING, "and it takes effect there"
    # logging's own aliases, as the environment takes them
    assert main(["--log-level", "WARN", "restore", "--state-dir", str(tmp_path)]) == 0
    assert logging.getLogger().level == logging.WARNING


# ------------------------------------------------------------------------ check-config


def _check(tmp_path: Path, data: dict[str, object], capsys: pytest.CaptureFixture[str]) -> str:
    path = tmp_path / "powerd.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["check-config", str(path)]) == EX_CONFIG
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    return err


@pytest.mark.parametrize(
    "text", ["# nothing yet\n", "tls_server_config:\n", "http_server_config: {}\n"]
)
def test_a_web_config_that_secures_nothing_is_warned_of(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str
) -> None:
    """Plain HTTP without auth is what exporter-toolkit makes of such a file, and powerd too;
    a file cut short after its first key reads the same, so the operator is told."""
    web = tmp_path / "web.yml"
    web.write_text(text)
    path = tmp_path / "powerd.yaml"
    path.write_text(
        yaml.safe_dump({"state_dir": str(tmp_path), "metrics": {"web_config_file": str(web)}})
    )
    assert main(["check-config", str(path)]) == 0
    err = capsys.readouterr().err
    assert (
        f"metrics.web_config_file: {web} sets neither tls_server_config nor basic_auth_users" in err
    )
    assert "plain HTTP without auth" in err


def test_a_web_config_with_auth_is_not_warned_of(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import bcrypt

    web = tmp_path / "web.yml"
    hashed = bcrypt.hashpw(b"secret", bcrypt.gensalt(4)).decode()
    web.write_text(f"basic_auth_users:\n  prometheus: '{hashed}'\n")
    path = tmp_path / "powerd.yaml"
    path.write_text(
        yaml.safe_dump({"state_dir": str(tmp_path), "metrics": {"web_config_file": str(web)}})
    )
    assert main(["check-config", str(path)]) == 0
    assert "sets neither" not in capsys.readouterr().err


def test_check_config_refuses_what_run_would(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "web.yml"
    err = _check(tmp_path, {"metrics": {"web_config_file": str(missing)}}, capsys)
    assert err.startswith(f"powerd: metrics.web_config_file: cannot read web config {missing}")
    missing.write_text("basic_auth_users: {prom: not-a-bcrypt-hash}\n")
    assert "metrics.web_config_file: " in _check(
        tmp_path, {"metrics": {"web_config_file": str(missing)}}, capsys
    )
    missing.write_text(
        f"tls_server_config: {{cert_file: {tmp_path}/c.pem, key_file: {tmp_path}/k.pem}}\n"
    )
    assert "tls_server_config.cert_file" in _check(
        tmp_path, {"metrics": {"web_config_file": str(missing)}}, capsys
    )
    assert f"grid.file: {tmp_path} is a folder; name the JSON file" in _check(
        tmp_path, {"grid": {"file": str(tmp_path)}}, capsys
    )
    sim = {"gpu_backend": "sim"}
    assert "sim.gpu_model: unknown GPU profile 'nope'" in _check(
        tmp_path, {**sim, "sim": {"gpu_model": "nope"}}, capsys
    )
    assert "sim.model: unknown model profile 'nope'" in _check(
        tmp_path, {**sim, "sim": {"model": "nope"}}, capsys
    )
    assert "sim.trace: '/missing.csv' is neither a file" in _check(
        tmp_path, {**sim, "sim": {"trace": "/missing.csv"}}, capsys
    )
    trace = tmp_path / "trace.csv"
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46,x,3\n")
    assert f"sim.trace: trace {trace}, line 2: cannot read" in _check(
        tmp_path, {**sim, "sim": {"trace": str(trace)}}, capsys
    )
    assert "sim.server_kind" in _check(tmp_path, {"sim": {"server_kind": "nope"}}, capsys)
    assert "sim.model: llama-3.1-70b does not fit on 2 GPUs of 48 GiB" in _check(
        tmp_path, {**sim, "sim": {"gpu_model": "l40s"}}, capsys
    )
    server = {"name": "a", "url": "http://127.0.0.1:8000/metrics"}
    assert (
        "servers[0].gpus[1] (server 'a'): no GPU 9 on this node (it has 4 GPUs: 0 (GPU-"
        in _check(tmp_path, {**sim, "servers": [{**server, "gpus": [0, 9]}]}, capsys)
    )
    assert "metrics.listen_address" in _check(
        tmp_path, {"metrics": {"listen_address": "not an address"}}, capsys
    )
    # The simulated H100 supports 345-1980 MHz.
    assert _check(tmp_path, {**sim, "control": {"min_clock_mhz": 100000}}, capsys) == (
        "powerd: control.min_clock_mhz: 100000 MHz is above the SM clocks every GPU on this "
        "node supports (the highest: GPU 0, 345-1980 MHz); every GPU would be held at its "
        "maximum\n"
    )
    assert _check(tmp_path, {**sim, "control": {"dither_mhz": 818}}, capsys) == (
        "powerd: control.dither_mhz: 818 MHz does not fit within the SM clocks GPU 0 supports "
        "(345-1980 MHz): the dither moves the clock that far up and down, so it must be at "
        "most 817 MHz\n"
    )
    # A budget the minimum limits of the GPUs the servers name alone exceed (H100: 200 W each).
    budget = {**sim, "mode": "budget", "node_power_budget_w": 300}
    assert "node_power_budget_w: 300 W is below the minimum power limits of the 2 GPUs" in _check(
        tmp_path, {**budget, "servers": [{**server, "gpus": [0, 1]}]}, capsys
    )


def test_a_sim_state_file_that_cannot_be_read_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """check-config and run name sim.state_file; restore, which must not refuse a config,
    says the simulated GPUs cannot be opened and exits 1, as without a driver."""
    data, state_file = _throttled_node(tmp_path)
    state_file.write_bytes(b"\xff\xfe garbage")
    err = _check(tmp_path, data, capsys)
    assert err == f"powerd: sim.state_file: device state {state_file} is not UTF-8\n"
    assert main(["run", "--config", str(tmp_path / "powerd.yaml")]) == EX_CONFIG
    assert capsys.readouterr().err == err
    assert main(["restore", "--config", str(tmp_path / "powerd.yaml")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"powerd restore: sim.state_file: device state {state_file} is not")
    assert "Traceback" not in err
    state_file.unlink()
    state_file.mkdir()
    assert _check(tmp_path, data, capsys) == (
        f"powerd: sim.state_file: cannot read device state {state_file}: Is a directory\n"
    )


def test_check_config_checks_the_gpus_where_it_can_open_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "powerd.yaml"
    server = {"name": "a", "url": "http://127.0.0.1:8000/metrics", "gpus": [3]}
    path.write_text(yaml.safe_dump({"gpu_backend": "sim", "servers": [server]}))
    assert main(["check-config", str(path)]) == 0
    assert "OK (1 server, mode efficiency; 4 GPUs opened)" in capsys.readouterr().out
    single = {
        "gpu_backend": "sim",
        "sim": {"gpus": 1, "tp": 1},
        "servers": [{**server, "gpus": [0]}],
    }
    path.write_text(yaml.safe_dump(single))
    assert main(["check-config", str(path)]) == 0
    assert "OK (1 server, mode efficiency; 1 GPU opened)" in capsys.readouterr().out
    # A floor at the highest clock, a dither that spans the whole range: pinned, but kept.
    control = {"min_clock_mhz": 1980, "dither_mhz": 817}
    path.write_text(yaml.safe_dump({"gpu_backend": "sim", "servers": [server], "control": control}))
    assert main(["check-config", str(path)]) == 0
    budget = {"mode": "budget", "node_power_budget_w": 200}  # GPU 3's minimum limit
    path.write_text(yaml.safe_dump({"gpu_backend": "sim", "servers": [server], **budget}))
    assert main(["check-config", str(path)]) == 0
    assert "OK (1 server, mode budget; 4 GPUs opened)" in capsys.readouterr().out
    # Beside a server that finds its own GPUs: it may find one, so only GPU 3 is counted.
    finder = {"name": "b", "url": "http://127.0.0.1:8001/metrics"}
    path.write_text(yaml.safe_dump({"gpu_backend": "sim", "servers": [server, finder], **budget}))
    assert main(["check-config", str(path)]) == 0
    path.write_text(yaml.safe_dump({"servers": [server]}))  # nvml, absent here
    with mock.patch(
        "powerd.runtime.open_backend",
        side_effect=GpuUnavailable("NVML is not available: libnvidia-ml.so.1 was not found"),
    ):
        assert main(["check-config", str(path)]) == 0
    assert "GPUs not checked: NVML is not available" in capsys.readouterr().out
    broken = mock.Mock()
    broken.devices.side_effect = GpuError("nvmlDeviceGetCount failed: Unknown Error")
    with mock.patch("powerd.runtime.open_backend", return_value=broken):
        assert main(["check-config", str(path)]) == 0
    assert "GPUs not checked: nvmlDeviceGetCount failed" in capsys.readouterr().out
    broken.close.assert_called_once()


def test_check_config_warns_of_a_gpu_two_servers_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two models on one GPU (or MIG instances of one) are read, and the GPU is left alone."""
    path = tmp_path / "powerd.yaml"
    servers = [
        {"name": "a", "url": "http://127.0.0.1:8000/metrics", "gpus": [0, 1]},
        {"name": "b", "url": "http://127.0.0.1:8001/metrics", "gpus": [2, 1]},
    ]
    path.write_text(yaml.safe_dump({"gpu_backend": "sim", "servers": servers}))
    assert main(["check-config", str(path)]) == 0
    captured = capsys.readouterr()
    assert "OK (2 servers, mode efficiency; 4 GPUs opened)" in captured.out
    warnings = [line for line in captured.err.splitlines() if "is named by servers" in line]
    assert len(warnings) == 1, captured.err
    assert "is named by servers a, b: one clock limit cannot keep two" in warnings[0]


def test_check_config_keeps_a_shared_gpu_out_of_the_budget_at_the_limit_it_has(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """GPU 1, named by both servers, is controlled for neither and keeps its limit (700 W on
    the simulated H100s): 800 W cannot hold GPUs 0 and 2 at their 200-W minimums beside it,
    as the daemon would find; 1100 W can."""
    path = tmp_path / "powerd.yaml"
    servers = [
        {"name": "a", "url": "http://127.0.0.1:8000/metrics", "gpus": [0, 1]},
        {"name": "b", "url": "http://127.0.0.1:8001/metrics", "gpus": [2, 1]},
    ]
    data = {"gpu_backend": "sim", "servers": servers, "mode": "budget"}
    path.write_text(yaml.safe_dump({**data, "node_power_budget_w": 800}))
    assert main(["check-config", str(path)]) == EX_CONFIG
    assert (
        "node_power_budget_w: 800 W is below the minimum power limits of the 2 GPUs it is "
        "shared by (400 W) beside the 700 W of the GPUs two servers share"
    ) in capsys.readouterr().err
    path.write_text(yaml.safe_dump({**data, "node_power_budget_w": 1100}))
    assert main(["check-config", str(path)]) == 0


def test_run_and_check_config_name_a_gpu_the_node_lacks_alike(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One message, from powerd.gpu.backend.locate_gpu: the config key, the server's name and
    the node's GPUs."""
    data = {
        "gpu_backend": "sim",
        "state_dir": str(tmp_path / "state"),
        "metrics": {"port": 0, "final_scrape_wait_s": 0},
        "sim": {"gpus": 2, "tp": 1, "trace": "constant", "state_file": str(tmp_path / "g")},
        "servers": [
            {"name": "a", "url": "http://127.0.0.1:8000/metrics", "gpus": [0]},
            {"name": "b", "url": "http://127.0.0.1:8001/metrics", "gpus": [1, 7]},
        ],
    }
    path = tmp_path / "powerd.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["check-config", str(path)]) == EX_CONFIG
    checked = capsys.readouterr().err
    assert main(["run", "--config", str(path)]) == EX_CONFIG
    ran = capsys.readouterr().err
    uuids = [info.uuid for info in NvmlBackend(detached_fake_nvml(SimConfig(gpus=2))).devices()]
    expected = (
        f"powerd: servers[1].gpus[1] (server 'b'): no GPU 7 on this node (it has 2 GPUs: "
        f"0 ({uuids[0]}), "
        f"1 ({uuids[1]}))\n"
    )
    assert checked == expected
    assert ran.endswith(expected), ran


@pytest.mark.parametrize(
    ("control", "message"),
    [
        ({"min_clock_mhz": 2000}, "control.min_clock_mhz: 2000 MHz is above the SM clocks"),
        ({"dither_mhz": 5000}, "control.dither_mhz: 5000 MHz does not fit within the SM clocks"),
    ],
)
def test_run_and_check_config_refuse_clock_settings_the_gpus_cannot_take_alike(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], control: dict[str, int], message: str
) -> None:
    """Without the check the controller would hold every GPU at its maximum, or swing it
    between the ends of its range, and say nothing."""
    data = {
        "gpu_backend": "sim",
        "state_dir": str(tmp_path / "state"),
        "metrics": {"port": 0, "final_scrape_wait_s": 0},
        "sim": {"gpus": 1, "tp": 1, "trace": "constant", "state_file": str(tmp_path / "g")},
        "control": control,
    }
    path = tmp_path / "powerd.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["check-config", str(path)]) == EX_CONFIG
    checked = capsys.readouterr().err
    assert checked.startswith(f"powerd: {message}") and checked.count("\n") == 1
    # A run that took the config would serve until stopped: there it fails instead.
    refused = mock.patch.object(Daemon, "warmup", side_effect=AssertionError("run started"))
    with refused:
        assert main(["run", "--config", str(path)]) == EX_CONFIG
    assert capsys.readouterr().err.endswith(checked)


# ------------------------------------------------------------------------ run and demo


@pytest.fixture()
def taken_port() -> Iterator[int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


def test_run_with_its_metrics_port_taken_is_one_line(
    tmp_path: Path, taken_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "powerd.yaml"
    data = {
        "gpu_backend": "sim",
        "state_dir": str(tmp_path / "state"),
        "metrics": {"port": taken_port},
        "sim": {"gpus": 2, "tp": 1, "trace": "constant", "state_file": str(tmp_path / "g")},
    }
    config.write_text(yaml.safe_dump(data))
    assert main(["run", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"powerd: cannot listen on 127.0.0.1:{taken_port}"), err
    assert err.count("\n") == 1, "one line, as README promises"


def test_demo_with_its_metrics_port_taken_is_one_line(
    taken_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["demo", "--duration", "2", "--gpus", "2", "--metrics-port", str(taken_port)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"powerd demo: cannot listen on 127.0.0.1:{taken_port}")
    assert err.count("\n") == 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--tp", "0"], "argument --tp: must be at least 1, got 0"),
        (["--gpus", "0"], "argument --gpus: must be at least 1, got 0"),
        (["--mode", "bogus"], "argument --mode: invalid choice: 'bogus'"),
        (["--metrics-port", "70000"], "argument --metrics-port: must be in [0, 65535]"),
        (["--duration", "0"], "argument --duration: must be a positive number, got 0"),
        (["--peak-load", "nan"], "argument --peak-load: must be a positive number"),
        (["--seed", "-1"], "argument --seed: must be at least 0, got -1"),
    ],
)
def test_demo_argument_errors_are_argparse_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--mode", "budget"], "--mode budget needs --node-power-budget-w"),
        (["--mode", "target"], "--mode target needs --target-tokens-per-joule"),
        (["--gpus", "3", "--tp", "2"], "--tp (2) must divide --gpus (3)"),
        (["--trace", "/missing.csv"], "--trace: '/missing.csv' is neither a file"),
        (["--gpu-model", "nope"], "--gpu-model: unknown GPU profile 'nope'"),
        (["--model", "nope"], "--model: unknown model profile 'nope'"),
    ],
)
def test_demo_options_that_cannot_run_are_refused_in_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["demo", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"powerd demo: {message}") and err.count("\n") == 1


def _help(command: str, capsys: pytest.CaptureFixture[str]) -> str:
    """`powerd COMMAND --help`, its lines joined as one (argparse wraps them to the terminal)."""
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    return " ".join(capsys.readouterr().out.split())


def test_the_help_of_demo_and_run_names_the_trace_each_replays_by_default(
    capsys: pytest.CaptureFixture[str],
) -> None:
    demo = _help("demo", capsys)
    assert "--trace TRACE a trace file or a name: azure-conv, diurnal, step, burst, " in demo
    assert "constant (default: azure-conv)" in demo
    run = _help("run", capsys)
    assert "with `gpu_backend: sim` in the config, on a simulated node whose servers" in run
    assert "replay the config's sim.trace (default: diurnal)" in run


def test_python_dash_m_powerd_is_the_command() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "powerd", "--version"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"powerd {__version__}"
