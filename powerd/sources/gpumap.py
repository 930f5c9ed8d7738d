"""Which GPUs an inference server runs on, found from its process tree.

The HTTP front end that listens on the metrics port usually holds no GPU context: vLLM's
EngineCore and VllmWorker processes, SGLang's schedulers and TRT-LLM's MPI ranks are its
descendants. So: the PID listening on the URL's port, its descendants
(`psutil.Process.children(recursive=True)`), intersected with NVML's compute processes per GPU
(keyed by UUID). NVML reports host PIDs, so powerd must see host PIDs too (no private PID
namespace). `CUDA_VISIBLE_DEVICES` of the tree is only a hint, used when NVML shows none of the
tree's processes: indices follow CUDA's order, which matches NVML's only with
CUDA_DEVICE_ORDER=PCI_BUS_ID, and containers renumber devices.
Reference: shared/reference/inference_server_metrics.md section 11.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

import psutil

from powerd.sources.base import SourceError

_ANY_ADDRESSES = {"0.0.0.0", "::", ""}
_ENV_HINTS = ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES")
_SET_GPUS = "set gpus: for this server in the config"


def _default_connections() -> Iterable[Any]:
    return psutil.net_connections(kind="inet")


def url_port(url: str) -> tuple[str, int]:
    """(host, port) of a metrics URL, the scheme's default port when none is given."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise SourceError(f"bad server URL {url!r}: {exc}") from None
    if parts.hostname is None:
        raise SourceError(f"bad server URL {url!r}: no host")
    if port is None:
        port = 443 if parts.scheme == "https" else 80
    return parts.hostname, port


def _host_matches(listen_ip: str, host: str) -> bool:
    if listen_ip in _ANY_ADDRESSES or listen_ip == host:
        return True
    if host == "localhost":
        return listen_ip.startswith("127.") or listen_ip == "::1"
    return False


def listening_pid(
    url: str, net_connections: Callable[[], Iterable[Any]] = _default_connections
) -> int:
    """The PID listening on the URL's port on this node; SourceError when it cannot be told."""
    host, port = url_port(url)
    try:
        connections = list(net_connections())
    except (psutil.AccessDenied, PermissionError):
        raise SourceError(
            f"cannot list listening sockets to find the server at {url}: permission denied "
            f"(run powerd as root, or {_SET_GPUS})"
        ) from None
    listeners = [
        c
        for c in connections
        if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
    ]
    if not listeners:
        raise SourceError(f"nothing on this node listens on port {port} (is {url} served here?)")
    try:
        literal = str(ipaddress.ip_address(host))
    except ValueError:
        literal = host
    preferred = [c for c in listeners if _host_matches(c.laddr.ip, literal)] or listeners
    pids = {c.pid for c in preferred}
    if None in pids:
        raise SourceError(
            f"a process listens on port {port} but its owner is hidden from powerd "
            f"(run powerd as root, or {_SET_GPUS})"
        )
    if len(pids) > 1:
        shown = ", ".join(str(p) for p in sorted(pids))
        raise SourceError(f"several processes ({shown}) listen on port {port}; {_SET_GPUS}")
    return int(pids.pop())


def _visible_devices(value: str, gpu_uuids: list[str], by_index: Mapping[int, str]) -> list[str]:
    found: list[str] = []
    for token in value.split(","):
        token = token.strip()
        if token.isdigit():
            uuid = by_index.get(int(token))
            if uuid is not None:
                found.append(uuid)
        elif token.startswith("GPU-"):
            found += [u for u in gpu_uuids if u.startswith(token)]
    return found


def discover_server_gpus(
    url: str,
    backend_compute_pids: Callable[[str], list[int]],
    gpu_uuids: list[str],
    *,
    gpu_indices: Mapping[int, str] | None = None,
    listen_pid: int | None = None,
    net_connections: Callable[[], Iterable[Any]] = _default_connections,
    process: Callable[[int], Any] = psutil.Process,
) -> list[str]:
    """UUIDs (in gpu_uuids order) of the GPUs running processes of the server at url.

    backend_compute_pids(uuid) lists the PIDs with a compute context on that GPU (NVML).
    gpu_indices maps NVML indices to UUIDs, for a CUDA_VISIBLE_DEVICES hint that names GPUs by
    index (default: positions in gpu_uuids, right only while no GPU is missing from it).
    listen_pid skips the socket lookup when the caller knows the server's PID. The psutil
    functions are injectable for tests. Raises SourceError (one sentence) when the server's
    processes cannot be seen or hold no GPU.
    """
    pid = listen_pid if listen_pid is not None else listening_pid(url, net_connections)
    try:
        root = process(pid)
        name = root.name()
        if name == "docker-proxy":
            raise SourceError(
                f"the port of {url} is published by docker-proxy, whose container is not its "
                f"child; {_SET_GPUS} or run the container with --network host"
            )
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        raise SourceError(f"the process {pid} serving {url} has exited") from None
    except psutil.AccessDenied:
        raise SourceError(
            f"cannot read the process tree of {pid} serving {url}: permission denied "
            f"(run powerd as root, or {_SET_GPUS})"
        ) from None
    tree_pids = {p.pid for p in tree}
    found: list[str] = []
    for uuid in gpu_uuids:
        try:
            pids = backend_compute_pids(uuid)
        except Exception as exc:
            raise SourceError(f"cannot list the compute processes of GPU {uuid}: {exc}") from None
        if tree_pids.intersection(pids):
            found.append(uuid)
    if found:
        return found
    hinted: list[str] = []
    by_index = dict(enumerate(gpu_uuids)) if gpu_indices is None else gpu_indices
    for proc in tree:
        try:
            env = proc.environ()
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess, OSError):
            continue
        for key in _ENV_HINTS:
            value = env.get(key)
            if value:
                visible = _visible_devices(value, gpu_uuids, by_index)
                hinted += [u for u in visible if u not in hinted]
        if hinted:
            break
    if hinted:
        return [u for u in gpu_uuids if u in hinted]
    raise SourceError(
        f"no GPU runs a process of the server at {url} (pid {pid} and its "
        f"{len(tree) - 1} descendants); {_SET_GPUS}"
    )
