"""Start-up and shut-down of the production daemon: `powerd run` and `powerd restore`.

The order matters and is the contract with systemd: NVML first (a node without a driver
exits at once with one sentence), then any restore a previous run left pending, then the
metrics port is bound (a taken port also exits with one sentence) and the kernels are
compiled, and only then READY=1.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import stat
import sys
from collections.abc import Callable, Collection
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from powerd import __version__
from powerd.config import Config, ConfigError, ServerConfig, SimConfig
from powerd.exporter import Exporter, ExporterError
from powerd.gpu.backend import GpuBackend, check_clock_settings, locate_gpu
from powerd.gpu.errors import GpuError, GpuUnavailable
from powerd.journal import Journal, JournalError, restore_all
from powerd.model import SHARED_WHY, GpuInfo
from powerd.signals import handle_stop_and_reload_signals
from powerd.systemd import Notifier
from powerd.webconfig import load_web_config
from powerd.wording import counted

if TYPE_CHECKING:
    from powerd.simulation import RunningSimulation

log = logging.getLogger("powerd")

JOURNAL_FILE = "journal.json"
LOCK_FILE = "powerd.lock"


class RunLock:
    """An exclusive lock on the state directory, held while a daemon runs.

    Two daemons on one node would fight over the same GPUs, and a restore while a daemon runs
    would be undone at its next tick. The lock is an flock, so the kernel drops it when the
    holder dies: a SIGKILLed daemon never blocks the restore that follows it.
    """

    def __init__(self, state_dir: str | Path) -> None:
        self.path = Path(state_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> bool:
        """Take the lock without waiting; False when another process holds it. OSError when
        the state directory cannot be used or may not be trusted (see check_state_dir)."""
        check_state_dir(self.path.parent)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return True

    def holder(self) -> str:
        """The PID written by the holder, or '?'."""
        try:
            return self.path.read_text().strip() or "?"
        except OSError:
            return "?"

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def check_state_dir(state_dir: Path) -> None:
    """Create the state directory (mode 0700) if absent, and refuse one that another user
    could write or swap: powerd runs as root and restores GPUs from what it finds there, so a
    journal or a link planted in it would set GPUs or overwrite files. Every folder on the way
    must belong to this user or root and be writable by no one else unless sticky (as /tmp),
    and no link on the way may be another user's; the path may not hold "..", which would be
    read past a link. Checked before a missing folder is made and again after.
    PermissionError naming the fix."""
    if ".." in state_dir.parts:
        raise PermissionError(f"{state_dir}: a state directory may not contain '..'")
    written = Path(os.path.abspath(state_dir))
    existing = next(part for part in [written, *written.parents] if os.path.lexists(part))
    if existing != written:
        _check_trusted_path(existing, state_dir, to_create_in=True)
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    _check_trusted_path(written, state_dir, to_create_in=False)


def _check_trusted_path(path: Path, state_dir: Path, *, to_create_in: bool) -> None:
    """check_state_dir's rules for `path` (absolute, without ".."), which exists: the state
    directory itself, or the folder it is to be made in (which, as any folder on the way,
    may be sticky)."""
    uid = os.geteuid()
    trusted = (uid, 0)
    for part in [path, *path.parents]:
        link = os.lstat(part)
        if stat.S_ISLNK(link.st_mode) and link.st_uid not in trusted:
            raise PermissionError(
                f"{part} is a link made by uid {link.st_uid}, not by this user (uid {uid}) or "
                f"root; powerd keeps the GPU settings it restores in {state_dir}"
            )
    real = path.resolve()
    for part in [real, *real.parents]:
        info = os.stat(part)
        if info.st_uid not in trusted:
            raise PermissionError(
                f"{part} belongs to uid {info.st_uid}, not to this user (uid {uid}) or root; "
                f"powerd keeps the GPU settings it restores in {state_dir}"
            )
        sticky = (to_create_in or part != real) and info.st_mode & stat.S_ISVTX
        if info.st_mode & 0o022 and not sticky:
            mode = stat.S_IMODE(info.st_mode)
            raise PermissionError(
                f"{part} is writable by its group or others (mode {mode:04o}); powerd keeps "
                f"the GPU settings it restores in {state_dir}: chmod go-w {part}"
            )


def _holding_run_lock(config: Config, body: Callable[[], int], *, program: str, busy: str) -> int:
    """Run `body` holding the state directory's RunLock; its exit status, or 1 with one
    sentence (`busy`, with {pid} filled in) when another process holds the lock."""
    lock = RunLock(config.state_dir)
    try:
        acquired = lock.acquire()
    except OSError as exc:
        print(f"{program}: cannot use the state directory: {exc}", file=sys.stderr)
        return 1
    if not acquired:
        print(f"{program}: {busy.replace('{pid}', lock.holder())}", file=sys.stderr)
        return 1
    try:
        return body()
    finally:
        lock.release()


def check_config(config: Config) -> None:
    """What `powerd run` would refuse beyond Config.validate, as a ConfigError naming the key:
    a web-config file that cannot be read, is invalid, or names a certificate that does not
    load (one that sets neither TLS nor auth is logged as a warning); a grid.file that is a
    folder (a feed's rename cannot replace one; a file not there yet is fine); and with
    `gpu_backend: sim`, what check_sim_config refuses."""
    if config.grid.file is not None and Path(config.grid.file).is_dir():
        raise ConfigError(
            f"grid.file: {config.grid.file} is a folder; name the JSON file the feed writes"
        )
    if config.metrics.web_config_file:
        try:
            web = load_web_config(config.metrics.web_config_file)
            if web.tls is not None:
                web.tls.ssl_context()
        except ConfigError as exc:
            raise ConfigError(f"metrics.web_config_file: {exc}") from None
        if web.secures_nothing:
            log.warning(
                "metrics.web_config_file: %s sets neither tls_server_config nor "
                "basic_auth_users: /metrics is served over plain HTTP without auth",
                config.metrics.web_config_file,
            )
    if config.gpu_backend == "sim":
        check_sim_config(config.sim)


def check_config_gpus(config: Config) -> str:
    """ConfigError when a server names a GPU the node does not count, or the control clocks
    are more than the GPUs can take, as `powerd run` would refuse them; the GPUs are those NVML
    opens (the simulated node's with `gpu_backend: sim`). A GPU two servers name is warned of.
    Returns what was checked, or why the GPUs could not be (NVML not available here)."""
    try:
        backend = open_backend(config)
    except GpuUnavailable as exc:
        return f"GPUs not checked: {exc}"
    try:
        infos = backend.devices()
        unopened = backend.unopened_indices()
        check_clock_settings(config.control, infos)
        by_index = {info.index: info.uuid for info in infos}
        servers_of: dict[str, list[str]] = {}
        for i, server in enumerate(config.servers):
            for j, gpu in enumerate(server.gpus or ()):
                uuid = locate_gpu(f"servers[{i}].gpus[{j}]", server.name, gpu, by_index, unopened)
                if uuid is None:  # one that may open later
                    continue
                names = servers_of.setdefault(uuid, [])
                if server.name not in names:  # a server may name a GPU by index and by UUID
                    names.append(server.name)
        shared = {uuid for uuid, names in servers_of.items() if len(names) > 1}
        for uuid in sorted(shared):
            named_by = ", ".join(servers_of[uuid])
            log.warning("GPU %s is named by servers %s: %s", uuid, named_by, SHARED_WHY)
        if config.mode == "budget" and config.node_power_budget_w is not None:
            kept_w = _shared_limits_w(config, backend, infos, shared)
            _check_budget_floor(config.node_power_budget_w, infos, set(servers_of) - shared, kept_w)
    except GpuError as exc:
        return f"GPUs not checked: {exc}"
    finally:
        backend.close()
    return f"{counted(len(infos), 'GPU')} opened" + (f", {len(unopened)} not" if unopened else "")


def _shared_limits_w(
    config: Config, backend: GpuBackend, infos: list[GpuInfo], shared: set[str]
) -> float:
    """What the GPUs two servers share keep of a node budget: the limit the daemon leaves
    each, the one from before powerd (a running daemon may hold it lower now), else the one it
    has, else its default."""
    if not shared:
        return 0.0
    journal = Journal(journal_path(config), put_corrupt_aside=False)
    kept_w = 0.0
    for info in infos:
        if info.uuid in shared:
            entry = journal.get(info.uuid)
            kept_mw = (entry.power_limit_mw if entry is not None else None) or (
                backend.power_limit_mw(info.uuid)
            )
            kept_w += (kept_mw or info.power_limit_default_mw) / 1000.0
    return kept_w


def _check_budget_floor(
    budget_w: float, infos: list[GpuInfo], controlled: set[str], kept_w: float
) -> None:
    """ConfigError when the GPUs the servers name (`controlled`: a server that finds its own
    may find any number) cannot keep within `budget_w` at their minimum limits, beside the
    `kept_w` that GPUs two servers share keep."""
    named = [info for info in infos if info.uuid in controlled]
    floor_w = sum(info.power_limit_min_mw for info in named) / 1000.0
    if budget_w < floor_w + kept_w:
        sharing = counted(len(named), "GPU")
        beside = f" beside the {kept_w:g} W of the GPUs two servers share" if kept_w else ""
        raise ConfigError(
            f"node_power_budget_w: {budget_w:g} W is below the minimum power limits of the "
            f"{sharing} it is shared by ({floor_w:g} W){beside}; every GPU would be held at "
            "its minimum and the node would still draw more"
        )


def check_sim_config(sim: SimConfig, keys: dict[str, str] | None = None) -> None:
    """ConfigError when the simulator has no such GPU profile, model profile or trace (or
    its trace file cannot be read as one), the model does not fit on its GPUs, or the state
    file cannot be read as one; the message names the key (sim.gpu_model, ...), or its entry
    in `keys` (a command-line option) where given."""
    from powerd.sim.models import get_model_profile
    from powerd.sim.traces import AZURE_CONV_NAMES, TRACE_NAMES, load_azure_trace
    from powerd.simulation import gpu_profile_for, model_name_for

    def name(key: str) -> str:
        return (keys or {}).get(key, f"sim.{key}")

    try:
        profile = gpu_profile_for(sim)
    except ValueError as exc:
        key = "gpu_profile_file" if sim.gpu_profile_file else "gpu_model"
        raise ConfigError(f"{name(key)}: {exc}") from None
    try:
        model = get_model_profile(model_name_for(sim))
    except ValueError as exc:
        raise ConfigError(f"{name('model')}: {exc}") from None
    try:
        model.kv_capacity_tokens(profile.memory_gb, sim.tp)
    except ValueError as exc:
        raise ConfigError(f"{name('model')}: {exc} (give it more GPUs with {name('tp')})") from None
    if sim.state_file is not None:
        from powerd.sim.device_state import DeviceStateError, DeviceStateFile

        try:
            DeviceStateFile(sim.state_file).check()
        except DeviceStateError as exc:
            raise ConfigError(f"{name('state_file')}: {exc}") from None
    trace = sim.trace
    known = (*TRACE_NAMES, *AZURE_CONV_NAMES)
    if trace is None or trace.strip() in known:
        return
    if not Path(trace).is_file():
        raise ConfigError(
            f"{name('trace')}: {trace!r} is neither a file nor one of {', '.join(TRACE_NAMES)}"
        )
    try:
        load_azure_trace(trace)
    except ValueError as exc:
        raise ConfigError(f"{name('trace')}: {exc}") from None


def journal_path(config: Config) -> Path:
    return Path(config.state_dir) / JOURNAL_FILE


def journal_for(config: Config) -> Journal:
    return Journal(journal_path(config))


def open_backend(config: Config) -> GpuBackend:
    """The real NVML, or a fake NVML over the simulated GPUs' state file (`gpu_backend: sim`)."""
    from powerd.gpu.nvml import NvmlBackend

    if config.gpu_backend == "sim":
        from powerd.sim.device_state import DeviceStateError
        from powerd.simulation import detached_fake_nvml

        try:
            return NvmlBackend(detached_fake_nvml(config.sim))
        except DeviceStateError as exc:
            # The simulated node's driver state: unusable, as a broken driver would be.
            raise GpuUnavailable(f"sim.state_file: {exc}") from None
    return NvmlBackend()


class EarlySignals:
    """SIGTERM, SIGINT and SIGHUP from the first moment of `powerd run`, remembered until the
    daemon's own handlers take over: a SIGHUP (a log rotation's) while NVML opens or a killed
    run is restored would otherwise end the process by its default action, which systemd
    counts as a clean stop, and a SIGTERM then would cut the restore short."""

    def __init__(self) -> None:
        self.stop = False
        self.reload = False

    def install(self) -> None:
        handle_stop_and_reload_signals(self._stop, self._reload)

    def _stop(self) -> None:
        self.stop = True

    def _reload(self) -> None:
        self.reload = True


def restore_node(config: Config) -> int:
    """`powerd restore`: put back every GPU setting recorded in the journal. Exit status."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # no reload here, and no death mid-restore
    return _holding_run_lock(
        config,
        lambda: _restore_journal(config),
        program="powerd restore",
        busy="powerd is running (pid {pid}); stop it instead, which restores every GPU "
        "(systemctl stop powerd)",
    )


def _restore_journal(config: Config) -> int:
    path = journal_path(config)
    if not path.exists():
        log.info("nothing to restore: %s holds no saved settings", path)
        return 0
    # NVML before the journal: reading a corrupt journal puts it aside, and the clock reset
    # it calls for must not be lost to an NVML that cannot be opened yet.
    try:
        backend = open_backend(config)
    except GpuUnavailable as exc:
        print(f"powerd restore: {exc}", file=sys.stderr)
        _name_gpus_left_changed(path)
        return 1
    try:
        journal = journal_for(config)
        if not journal.pending():
            log.info("nothing to restore: %s holds no saved settings", journal.path)
            return 0
        report = restore_all(backend, journal)
    finally:
        backend.close()
    log.info("restore: %s", report.summary())
    return 0 if report.ok else 1


def _name_gpus_left_changed(path: Path) -> None:
    """Say which GPUs keep powerd's settings while NVML cannot be opened: after a driver
    upgrade under a running powerd (LIB_RM_VERSION_MISMATCH) that lasts until the module is
    reloaded, which resets them too. Entries saved before the last reboot are not named (the
    reboot reset those GPUs)."""
    journal = Journal(path, put_corrupt_aside=False)
    if journal.load_error is not None:
        print(
            f"powerd restore: {journal.load_error}; any GPU's clocks may still be locked until "
            "NVML opens again (a driver reload or a reboot resets them)",
            file=sys.stderr,
        )
        return
    held = [e for e in journal.entries() if not journal.saved_in_earlier_boot(e)]
    if held:
        print(
            f"powerd restore: the settings powerd set stay on {counted(len(held), 'GPU')} until "
            "NVML opens again (a driver reload or a reboot resets them): "
            + ", ".join(f"{entry.uuid} (GPU {entry.index})" for entry in held),
            file=sys.stderr,
        )


def forget_gpus(config: Config, uuids: Collection[str]) -> int:
    """`powerd restore --forget UUID`: remove these GPUs' entries from the journal, touching
    no GPU, for a card that will not come back to be restored (replaced within the same boot,
    or taken out). Prints each entry removed. Exit status; 1 with one sentence when a UUID is
    not in the journal, which is then left as it is."""
    return _holding_run_lock(
        config,
        lambda: _forget(config, uuids),
        program="powerd restore",
        busy="powerd is running (pid {pid}) and rewrites the journal; stop it first "
        "(systemctl stop powerd)",
    )


def _forget(config: Config, uuids: Collection[str]) -> int:
    # A corrupt journal stays where it is: `powerd restore` resets every clock for it.
    journal = Journal(journal_path(config), put_corrupt_aside=False)
    if journal.load_error is not None:
        print(f"powerd restore: nothing forgotten: {journal.load_error}", file=sys.stderr)
        return 1
    try:
        forgotten = journal.forget(uuids)
    except KeyError as exc:
        held = ", ".join(entry.uuid for entry in journal.entries()) or "nothing"
        print(
            f"powerd restore: {exc.args[0]} is not in {journal.path} (it holds {held}); "
            "nothing forgotten",
            file=sys.stderr,
        )
        return 1
    except JournalError as exc:
        print(f"powerd restore: nothing forgotten: {exc}", file=sys.stderr)
        return 1
    for entry in forgotten:
        print(
            f"forgot GPU {entry.uuid} (index {entry.index}, {entry.name}): its saved "
            "settings will not be restored"
        )
    return 0


def run_daemon(config: Config, *, config_path: Path, force_dry_run: bool = False) -> int:
    """`powerd run`: the daemon until SIGTERM/SIGINT; every GPU restored on the way out.

    `force_dry_run` (--dry-run) holds for every config read, reloads included. ConfigError for
    what check_config refuses; exit status 1 with one sentence when NVML or the metrics
    address cannot be had.
    """
    early = EarlySignals()
    early.install()
    try:
        check_config(config)
        return _holding_run_lock(
            config,
            lambda: _run_locked(
                config, config_path=config_path, force_dry_run=force_dry_run, early=early
            ),
            program="powerd",
            busy="another powerd is running (pid {pid}) with its state in "
            f"{config.state_dir}; two would fight over the same GPUs",
        )
    finally:
        # Python gives its own handlers back to the default actions as it exits: a late
        # SIGHUP would turn a clean, restored stop into a death by signal.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)


def _run_locked(
    config: Config, *, config_path: Path, force_dry_run: bool, early: EarlySignals
) -> int:
    notifier = Notifier()
    simulation: RunningSimulation | None = None
    simulated_servers: tuple[ServerConfig, ...] = ()
    try:
        if config.gpu_backend == "sim":
            from powerd.simulation import server_configs, start_simulation

            simulation = start_simulation(config.sim)
            backend: GpuBackend = simulation.backend
            simulated_servers = server_configs(simulation.node, simulation.urls())
        else:
            from powerd.gpu.nvml import NvmlBackend

            backend = NvmlBackend()
    except GpuUnavailable as exc:
        print(f"powerd: {exc}", file=sys.stderr)
        return 1

    def transform(config: Config, *, reload: bool = True) -> Config:
        if force_dry_run:
            if reload and not config.dry_run:
                log.warning(
                    "reload: the config says dry_run: false, but powerd was started with "
                    "--dry-run, which holds until it is restarted without it"
                )
            config = replace(config, dry_run=True)
        if simulation is not None and not config.servers:
            config = replace(config, servers=simulated_servers)
        return config

    try:
        config = transform(config, reload=False)
        journal = journal_for(config)
        if journal.pending():
            log.warning("a previous run did not finish; restoring the GPU settings it left")
            report = restore_all(backend, journal)
            log.info("restore: %s", report.summary())
        if early.stop:
            log.info("stopped while starting, before controlling any GPU")
            return 0 if not journal.pending() else 1
        # Bound before the kernels compile: a taken port is told at once, not seconds later.
        exporter = Exporter(config.metrics)
        try:
            exporter.start()
        except ExporterError as exc:
            print(f"powerd: {exc} (metrics.listen_address, metrics.port)", file=sys.stderr)
            return 1
        try:
            return _serve(
                config,
                config_path,
                backend,
                journal,
                exporter,
                notifier,
                transform,
                simulation,
                early,
            )
        finally:
            exporter.stop()
    finally:
        backend.close()
        if simulation is not None:
            simulation.stop()


def _serve(
    config: Config,
    config_path: Path,
    backend: GpuBackend,
    journal: Journal,
    exporter: Exporter,
    notifier: Notifier,
    transform: Callable[[Config], Config],
    simulation: RunningSimulation | None,
    early: EarlySignals,
) -> int:
    """Build the daemon, signal READY and run it until it stops (GPUs restored); the exit
    status, 1 when a GPU could not be restored."""
    # Here, not at the top: `powerd restore` and the other commands need no daemon, and so no
    # numba (which a broken install of would otherwise stop the restore too).
    from powerd.daemon import Daemon

    daemon = Daemon(
        config,
        backend,
        journal=journal,
        publish=exporter.publish,
        notifier=notifier,
        config_transform=transform,
    )
    daemon.install_signal_handlers()
    # After the daemon's handlers are in: a signal between the two reaches one or the other.
    if early.stop:
        daemon.request_stop()
    if early.reload:
        daemon.request_reload()
    daemon.warmup()
    log.info(
        "powerd %s: %s, %s, mode %s%s, metrics on %s:%d",
        __version__,
        counted(len(daemon.infos), "GPU"),
        counted(len(daemon.groups), "server"),
        config.mode,
        " (dry run)" if config.dry_run else "",
        config.metrics.listen_address,
        exporter.port,
    )
    if simulation is not None:
        simulation.driver.start()
    notifier.ready()
    restored = daemon.run_forever(config_path=config_path)
    _await_final_scrape(exporter, daemon.config.metrics.final_scrape_wait_s)
    return 0 if restored else 1


def _await_final_scrape(exporter: Exporter, limit_s: float) -> None:
    """Let Prometheus see the restored GPUs once before the series stop (a stop otherwise
    leaves the last throttled values as the evidence PowerdGpuLeftThrottled reads)."""
    wait_s = exporter.scrapes.next_wait_s(limit_s)
    if wait_s <= 0:
        return
    log.info("waiting up to %.1f s for a last scrape of the restored settings", wait_s)
    if exporter.wait_for_scrape(wait_s):
        log.info("the restored settings were scraped; exiting")
    else:
        log.info("no scrape came; exiting")
