"""GPU discovery from a server's process tree, on fake pid tables with psutil's own errors."""

from __future__ import annotations

from collections import namedtuple
from dataclasses import dataclass, field

import psutil
import pytest

from powerd.sources import SourceError
from powerd.sources.gpumap import discover_server_gpus, listening_pid, url_port

Addr = namedtuple("Addr", "ip port")
Conn = namedtuple("Conn", "fd family type laddr raddr status pid")
UUIDS = ["GPU-aaaa-0", "GPU-bbbb-1", "GPU-cccc-2", "GPU-dddd-3"]


def listen(port: int, pid: int | None, ip: str = "0.0.0.0") -> Conn:
    return Conn(3, 2, 1, Addr(ip, port), (), psutil.CONN_LISTEN, pid)


@dataclass
class FakeProc:
    pid: int
    proc_name: str = "python3"
    kids: list[FakeProc] = field(default_factory=list)
    env: dict[str, str] | None = None
    denied: bool = False

    def name(self) -> str:
        return self.proc_name

    def children(self, recursive: bool = False) -> list[FakeProc]:
        if self.denied:
            raise psutil.AccessDenied(self.pid)
        out = []
        for kid in self.kids:
            out.append(kid)
            if recursive:
                out += kid.children(recursive=True)
        return out

    def environ(self) -> dict[str, str]:
        if self.env is None:
            raise psutil.AccessDenied(self.pid)
        return self.env


class Table:
    """A fake node: processes by pid, sockets, and NVML's compute pids per GPU UUID."""

    def __init__(self, procs: list[FakeProc], conns: list[Conn], gpu_pids: dict[str, list[int]]):
        self.procs = {p.pid: p for root in procs for p in [root, *root.children(True)]}
        self.conns = conns
        self.gpu_pids = gpu_pids

    def process(self, pid: int) -> FakeProc:
        if pid not in self.procs:
            raise psutil.NoSuchProcess(pid)
        return self.procs[pid]

    def compute_pids(self, uuid: str) -> list[int]:
        return self.gpu_pids.get(uuid, [])

    def discover(self, url: str, **kw: object) -> list[str]:
        return discover_server_gpus(
            url,
            self.compute_pids,
            UUIDS,
            net_connections=lambda: self.conns,
            process=self.process,
            **kw,  # type: ignore[arg-type]
        )


def vllm_tp2() -> Table:
    """vLLM on :8000: api server 100 -> EngineCore 101 -> workers 102, 103 on GPUs 2 and 3."""
    workers = [FakeProc(102, "VllmWorker-0"), FakeProc(103, "VllmWorker-1")]
    api = FakeProc(100, "vllm", [FakeProc(101, "EngineCore", workers)])
    other = FakeProc(200, "python3", [FakeProc(201, "train.py")])
    conns = [
        listen(8000, 100),
        listen(9090, 200),
        Conn(4, 2, 1, Addr("127.0.0.1", 51000), Addr("127.0.0.1", 8000), "ESTABLISHED", 300),
    ]
    gpus = {UUIDS[0]: [201], UUIDS[2]: [102], UUIDS[3]: [103, 201]}
    return Table([api, other], conns, gpus)


def test_tp_workers_below_the_api_server() -> None:
    assert vllm_tp2().discover("http://127.0.0.1:8000/metrics") == [UUIDS[2], UUIDS[3]]


def test_listen_pid_given_by_the_caller() -> None:
    table = vllm_tp2()
    table.conns = []
    assert table.discover("http://127.0.0.1:8000/metrics", listen_pid=101) == UUIDS[2:]


def test_default_ports_and_hosts() -> None:
    assert url_port("http://node7/metrics") == ("node7", 80)
    assert url_port("https://node7/metrics") == ("node7", 443)
    assert url_port("http://[::1]:30000/metrics") == ("::1", 30000)
    with pytest.raises(SourceError, match="bad server URL"):
        url_port("http://h:99999/metrics")


def test_nothing_listening() -> None:
    with pytest.raises(SourceError, match="nothing on this node listens on port 8001"):
        vllm_tp2().discover("http://localhost:8001/metrics")


def test_hidden_socket_owner_needs_root() -> None:
    table = vllm_tp2()
    table.conns = [listen(8000, None)]
    with pytest.raises(SourceError, match=r"owner is hidden from powerd .run powerd as root"):
        table.discover("http://127.0.0.1:8000/metrics")


def test_net_connections_denied() -> None:
    def denied() -> list[Conn]:
        raise psutil.AccessDenied()

    with pytest.raises(SourceError, match=r"cannot list listening sockets .* permission denied"):
        listening_pid("http://127.0.0.1:8000/metrics", denied)


def test_process_tree_denied() -> None:
    table = vllm_tp2()
    table.procs[100].denied = True
    with pytest.raises(SourceError, match=r"cannot read the process tree of 100 .*permission"):
        table.discover("http://127.0.0.1:8000/metrics")


def test_process_gone() -> None:
    table = vllm_tp2()
    del table.procs[100]
    with pytest.raises(SourceError, match=r"the process 100 serving .* has exited"):
        table.discover("http://127.0.0.1:8000/metrics")


def test_docker_proxy_is_named() -> None:
    table = Table([FakeProc(50, "docker-proxy")], [listen(3000, 50)], {})
    with pytest.raises(SourceError, match="docker-proxy"):
        table.discover("http://127.0.0.1:3000/metrics")


def test_ipv4_and_ipv6_listeners_of_different_processes() -> None:
    a, b = FakeProc(10, kids=[FakeProc(11)]), FakeProc(20, kids=[FakeProc(21)])
    conns = [listen(8000, 10, "127.0.0.1"), listen(8000, 20, "::1")]
    table = Table([a, b], conns, {UUIDS[0]: [11], UUIDS[1]: [21]})
    assert table.discover("http://127.0.0.1:8000/metrics") == [UUIDS[0]]
    assert table.discover("http://[::1]:8000/metrics") == [UUIDS[1]]
    with pytest.raises(SourceError, match=r"several processes \(10, 20\) listen on port 8000"):
        table.discover("http://node7:8000/metrics")


def test_cuda_visible_devices_is_only_a_hint() -> None:
    proc = FakeProc(10, kids=[FakeProc(11, env={"CUDA_VISIBLE_DEVICES": "1,3"})], env={})
    table = Table([proc], [listen(8080, 10)], {UUIDS[1]: [999]})
    assert table.discover("http://127.0.0.1:8080/metrics") == [UUIDS[1], UUIDS[3]]
    # NVML wins whenever it shows one of the tree's processes.
    table.gpu_pids = {UUIDS[0]: [11]}
    assert table.discover("http://127.0.0.1:8080/metrics") == [UUIDS[0]]


def test_cuda_visible_devices_indices_are_nvml_indices_when_a_gpu_is_missing() -> None:
    proc = FakeProc(10, env={"CUDA_VISIBLE_DEVICES": "2"})
    table = Table([proc], [listen(8080, 10)], {})
    present = {0: UUIDS[0], 2: UUIDS[2], 3: UUIDS[3]}  # NVML GPU 1 left out or lost
    found = discover_server_gpus(
        "http://127.0.0.1:8080/metrics",
        table.compute_pids,
        list(present.values()),
        gpu_indices=present,
        net_connections=lambda: table.conns,
        process=table.process,
    )
    assert found == [UUIDS[2]], "index 2 is NVML's GPU 2, not the third GPU still listed"


def test_cuda_visible_devices_uuid_prefixes_and_mig() -> None:
    env = {"CUDA_VISIBLE_DEVICES": "GPU-cccc,MIG-xyz,7"}
    table = Table([FakeProc(10, env=env)], [listen(8080, 10)], {})
    assert table.discover("http://127.0.0.1:8080/metrics") == [UUIDS[2]]


def test_no_gpu_found() -> None:
    table = Table([FakeProc(10, kids=[FakeProc(11)])], [listen(8080, 10)], {})
    with pytest.raises(SourceError, match=r"no GPU runs a process .*pid 10 and its 1 desc"):
        table.discover("http://127.0.0.1:8080/metrics")


def test_nvml_failure_is_a_source_error() -> None:
    def broken(uuid: str) -> list[int]:
        raise RuntimeError("GPU is lost")

    with pytest.raises(SourceError, match="cannot list the compute processes of GPU GPU-aaaa-0"):
        discover_server_gpus(
            "http://127.0.0.1:1/m", broken, UUIDS, listen_pid=1, process=lambda pid: FakeProc(1)
        )
