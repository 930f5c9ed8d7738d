"""`powerd status` against a real Exporter on an ephemeral port."""

from __future__ import annotations

import socket
import socketserver
import ssl
import subprocess
import threading
import urllib.request
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import bcrypt
import pytest

from powerd.cli import main
from powerd.config import DEFAULT_METRICS_PORT, MetricsConfig, load_config
from powerd.exporter import Exporter
from powerd.status import (
    GroupRow,
    StatusError,
    endpoint,
    fetch_status,
    format_status,
    parse_status,
)
from tests.conftest import require_program
from tests.unit.snapshots import BUILD_INFO, full_snapshot, group_status, small_snapshots
from tests.unit.test_webconfig import make_certs


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_certs(tmp_path_factory.mktemp("certs"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_fetch_status_reads_every_group() -> None:
    first, _ = small_snapshots()
    groups = (
        group_status(decision_reason="lower_slack"),
        group_status(
            group="qwen",
            server="qwen",
            model_name="Qwen/Qwen2.5-7B",
            gpu_uuids=(),
            mode="off",
            sm_clock_max_mhz=1980,
            tokens_per_joule=None,
            power_w=None,
            slo_met=False,
            slo_attainment=0.5,
            observe_only=True,
        ),
    )
    exporter = Exporter(MetricsConfig(port=0), build_info=BUILD_INFO)
    exporter.publish(replace(first, groups=groups))
    exporter.start()
    try:
        rows = fetch_status(f"127.0.0.1:{exporter.port}")
        assert rows == fetch_status(f"http://127.0.0.1:{exporter.port}/metrics")
    finally:
        exporter.stop()
    assert [row.group for row in rows] == ["llama", "qwen"]
    llama, qwen = rows
    assert llama.mode == "efficiency"
    assert llama.clock_limit_mhz == 1605.0
    assert llama.power_w == 640.0
    assert llama.tokens_per_s == 2400.0
    assert llama.tokens_per_joule == 3.75
    assert llama.slo_met is True and llama.slo_attainment == 0.98
    assert llama.model_name == "meta-llama/Llama-3.1-8B-Instruct"
    assert llama.reason == "lower_slack"
    assert qwen.mode == "off" and qwen.observe_only and qwen.reason is None
    assert qwen.tokens_per_joule is None and qwen.power_w is None
    assert qwen.slo_met is False


def test_format_status_is_a_table_with_one_line_per_group() -> None:
    exporter = Exporter(MetricsConfig(), build_info=BUILD_INFO)
    exporter.publish(full_snapshot())
    rows = parse_status(exporter.render().decode())
    rows.append(
        GroupRow("idle", "idle", "m", None, None, None, None, None, None, None, dry_run=True)
    )
    text = format_status(rows)
    lines = text.splitlines()
    assert len(lines) == 3
    assert lines[0].split() == [
        "GROUP",
        "MODE",
        "CLOCK",
        "MHz",
        "WATTS",
        "TOKENS/S",
        "TOKENS/J",
        "SLO",
        "WHY",
    ]
    assert lines[1].split() == [
        "llama",
        "target",
        "1,605",
        "640",
        "2,400",
        "3.75",
        "met",
        "98%",
        "of",
        "ticks",
        "raise_queue",
    ]
    assert lines[2].split() == ["idle", "-", "(dry", "run)", "-", "-", "-", "-", "-", "-"]
    # Numbers are right-aligned under their headers.
    for header, cell in (("CLOCK MHz", "1,605"), ("TOKENS/J", "3.75")):
        assert lines[0].index(header) + len(header) == lines[1].index(cell) + len(cell)
    assert format_status([]) == "powerd is running but controls no groups."


def test_unreachable_daemon_is_one_sentence() -> None:
    port = _free_port()
    with pytest.raises(StatusError) as info:
        fetch_status(f"http://127.0.0.1:{port}", timeout_s=1.0)
    message = str(info.value)
    assert message == (
        f"powerd is not reachable at http://127.0.0.1:{port}/metrics (connection refused); "
        "is the daemon running?"
    )


class _HtmlHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"<!DOCTYPE html><html><body>not metrics</body></html>"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_not_metrics_is_a_clear_error() -> None:
    exporter = Exporter(MetricsConfig(port=0), build_info=BUILD_INFO)
    exporter.start()
    try:
        with pytest.raises(StatusError, match=r"answered HTTP 404"):
            fetch_status(f"http://127.0.0.1:{exporter.port}/other")
    finally:
        exporter.stop()
    server, url = _serve(_HtmlHandler)
    try:
        with pytest.raises(StatusError, match=r"/metrics did not return Prometheus metrics"):
            fetch_status(url)
    finally:
        server.shutdown()
        server.server_close()


def test_basic_auth(tmp_path: Path) -> None:
    hashed = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=4)).decode()
    web = tmp_path / "web.yml"
    web.write_text(f"basic_auth_users:\n  ops: '{hashed}'\n")
    exporter = Exporter(MetricsConfig(port=0, web_config_file=str(web)), build_info=BUILD_INFO)
    exporter.publish(small_snapshots()[1])
    exporter.start()
    try:
        url = f"http://127.0.0.1:{exporter.port}"
        with pytest.raises(StatusError, match=r"refused the request \(it needs a user"):
            fetch_status(url)
        with pytest.raises(StatusError, match=r"refused the request \(wrong user or password"):
            fetch_status(url, auth=("ops", "nope"))
        assert [row.group for row in fetch_status(url, auth=("ops", "s3cret"))] == ["llama"]
    finally:
        exporter.stop()


def test_a_group_whose_server_shows_first_tokens_neither_way_is_marked_blind() -> None:
    snapshot = full_snapshot()
    exporter = Exporter(MetricsConfig(), build_info=BUILD_INFO)
    exporter.publish(snapshot)
    seeing = parse_status(exporter.render().decode())
    assert [row.first_token_blind for row in seeing] == [False]
    assert "blind" not in format_status(seeing)

    blind_server = replace(snapshot.servers[0], exports_ttft=False, exports_prompt_lengths=False)
    exporter.publish(replace(snapshot, servers=(blind_server,)))
    rows = parse_status(exporter.render().decode())
    assert [row.first_token_blind for row in rows] == [True]
    lines = format_status(rows).splitlines()
    assert lines[1].split()[:3] == ["llama", "target", "(blind)"]
    assert lines[-1].startswith("blind: the server exports neither a TTFT nor a prompt-length")
    assert "70 % of their maximum" in lines[-1]
    # One of the two is enough to see or model first tokens.
    half = replace(blind_server, exports_prompt_lengths=True)
    exporter.publish(replace(snapshot, servers=(half,)))
    assert [row.first_token_blind for row in parse_status(exporter.render().decode())] == [False]


def _serve(handler: type[BaseHTTPRequestHandler]) -> tuple[HTTPServer, str]:
    server = HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/metrics"


def _config(tmp_path: Path, port: int, web_config: Path | None = None) -> Path:
    web = f"\n  web_config_file: {web_config}" if web_config is not None else ""
    path = tmp_path / "powerd.yaml"
    path.write_text(
        "servers:\n  - {name: llama, url: 'http://127.0.0.1:8000/metrics', gpus: [0]}\n"
        f"metrics:\n  listen_address: 127.0.0.1\n  port: {port}{web}\n"
    )
    return path


def _status(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["status", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_an_http_proxy_in_the_environment_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    dead = f"http://127.0.0.1:{_free_port()}"
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.setenv(name, dead)
    # urlopen's shared opener reads the environment once, when it is first built.
    monkeypatch.setattr(urllib.request, "_opener", None)
    exporter = Exporter(MetricsConfig(port=0), build_info=BUILD_INFO)
    exporter.publish(small_snapshots()[1])
    exporter.start()
    try:
        assert [row.group for row in fetch_status(f"127.0.0.1:{exporter.port}")] == ["llama"]
    finally:
        exporter.stop()


def test_config_gives_the_address(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    exporter = Exporter(MetricsConfig(port=0), build_info=BUILD_INFO)
    exporter.publish(small_snapshots()[1])
    exporter.start()
    try:
        code, out, err = _status(capsys, "--config", str(_config(tmp_path, exporter.port or 0)))
    finally:
        exporter.stop()
    assert (code, err) == (0, "")
    assert out.splitlines()[1].split()[0] == "llama"
    wildcard = MetricsConfig(listen_address="::", port=9999)
    assert endpoint(metrics=wildcard).url == "http://[::1]:9999/metrics"
    assert endpoint("http://node:1/metrics", metrics=wildcard).url == "http://node:1/metrics"
    assert endpoint().url == f"http://127.0.0.1:{DEFAULT_METRICS_PORT}/metrics"


def _tls_exporter(tmp_path: Path, certs: Path, more: str = "") -> tuple[Path, Exporter]:
    """A started exporter serving https with certs' server certificate; `more` adds lines to
    its tls_server_config. Returns its web config file and the exporter."""
    web = tmp_path / "web.yml"
    web.write_text(
        f"tls_server_config:\n  cert_file: {certs / 'server.crt'}\n"
        f"  key_file: {certs / 'server.key'}\n{more}"
    )
    exporter = Exporter(MetricsConfig(port=0, web_config_file=str(web)), build_info=BUILD_INFO)
    exporter.publish(small_snapshots()[1])
    exporter.start()
    return web, exporter


def test_tls_from_the_config_or_a_ca_file(
    tmp_path: Path, certs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    web, exporter = _tls_exporter(tmp_path, certs)
    url = f"https://127.0.0.1:{exporter.port}/metrics"
    try:
        config = _config(tmp_path, exporter.port or 0, web)
        assert endpoint(metrics=load_config(config).metrics).url == url
        code, out, err = _status(capsys, "--config", str(config))
        assert (code, err) == (0, "") and "llama" in out
        code, out, err = _status(capsys, "--url", url, "--ca-file", str(certs / "server.crt"))
        assert (code, err) == (0, "") and "llama" in out
        code, out, err = _status(capsys, "--url", url, "--ca-file", str(certs / "client.crt"))
        assert code == 1 and len(err.splitlines()) == 1
        assert err.startswith(f"powerd status: powerd at {url} is not trusted (TLS error: ")
        code, out, err = _status(capsys, "--url", url, "--ca-file", str(tmp_path / "none.crt"))
        assert code == 1 and err.startswith("powerd status: cannot load --ca-file ")
        code, out, err = _status(capsys, "--url", url.replace("https", "http"))
        assert code == 1 and len(err.splitlines()) == 1, err
    finally:
        exporter.stop()


_CA_CONFIG = """[req]
distinguished_name = dn
x509_extensions = ca
prompt = no
[dn]
CN = powerd-test-ca
[ca]
basicConstraints = critical,CA:TRUE
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
"""
"""What `openssl req -x509` gives a CA with OpenSSL 3.0's own configuration (Debian 12, Ubuntu
22.04 and 24.04): no keyUsage, which RFC 5280 wants of a CA."""

_SERVER_EXTENSIONS = """subjectAltName = DNS:localhost,IP:127.0.0.1
basicConstraints = CA:FALSE
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


def _ca_and_server(folder: Path) -> Path:
    """ca.crt, and server.crt/.key for localhost that ca.crt issued, in folder."""
    openssl = require_program("openssl")
    (folder / "ca.cnf").write_text(_CA_CONFIG)
    (folder / "server.ext").write_text(_SERVER_EXTENSIONS)
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2")
    for command in (
        f"req -x509 -config ca.cnf {' '.join(ec)} -keyout ca.key -out ca.crt",
        f"req -new {' '.join(ec[:5])} -subj /CN=localhost -keyout server.key -out server.csr",
        "x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 "
        "-extfile server.ext -out server.crt",
    ):
        subprocess.run(
            [openssl, *command.split()], cwd=folder, check=True, capture_output=True, timeout=30
        )
    return folder


_REAL_CREATE_DEFAULT_CONTEXT = ssl.create_default_context


def _create_default_context_3_13(*args: object, **kwargs: object) -> ssl.SSLContext:
    """ssl.create_default_context as Python 3.13 has it (gh-107361): VERIFY_X509_STRICT and
    VERIFY_X509_PARTIAL_CHAIN among its verify flags."""
    context = _REAL_CREATE_DEFAULT_CONTEXT(*args, **kwargs)  # type: ignore[arg-type]
    context.verify_flags |= ssl.VERIFY_X509_STRICT | ssl.VERIFY_X509_PARTIAL_CHAIN
    return context


@pytest.mark.parametrize("default_context", ["installed", "3.13's"])
def test_a_daemon_certificate_from_an_operators_ca_is_trusted_on_every_python(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    default_context: str,
) -> None:
    """Python 3.13 verifies against RFC 5280's profile too, which refuses a CA without keyUsage
    ("CA cert does not include key usage extension"): `powerd status --ca-file` with a CA
    made by `openssl req -x509` failed on 3.13 and worked on 3.12."""
    if default_context != "installed":
        monkeypatch.setattr(ssl, "create_default_context", _create_default_context_3_13)
    certs = _ca_and_server(tmp_path)
    _, exporter = _tls_exporter(tmp_path, certs)
    try:
        url = f"https://127.0.0.1:{exporter.port}/metrics"
        code, out, err = _status(capsys, "--url", url, "--ca-file", str(certs / "ca.crt"))
        assert (code, err) == (0, "") and "llama" in out
    finally:
        exporter.stop()


def test_a_client_certificate_for_a_daemon_that_requires_one(
    tmp_path: Path, certs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    web, exporter = _tls_exporter(
        tmp_path,
        certs,
        "  client_auth_type: RequireAndVerifyClientCert\n"
        f"  client_ca_file: {certs / 'client.crt'}\n",
    )
    try:
        config = str(_config(tmp_path, exporter.port or 0, web))
        code, out, err = _status(capsys, "--config", config)
        assert code == 1 and len(err.splitlines()) == 1, err
        # TLS 1.3 gives the server's alert or only a closed connection, as the timing falls.
        assert "client certificate" in err and "--cert-file" in err, err
        client = ("--cert-file", str(certs / "client.crt"), "--key-file", str(certs / "client.key"))
        code, out, err = _status(capsys, "--config", config, *client)
        assert (code, err) == (0, "") and "llama" in out
        both = tmp_path / "client.pem"
        both.write_text((certs / "client.crt").read_text() + (certs / "client.key").read_text())
        code, out, err = _status(capsys, "--config", config, "--cert-file", str(both))
        assert (code, err) == (0, "") and "llama" in out
        cert_only = ("--cert-file", str(certs / "client.crt"))
        code, out, err = _status(capsys, "--config", config, *cert_only)
        assert code == 1 and err.startswith("powerd status: cannot load --cert-file "), err
        key_only = ("--key-file", str(certs / "client.key"))
        code, out, err = _status(capsys, "--config", config, *key_only)
        assert (code, err) == (1, "powerd status: --key-file needs --cert-file.\n")
    finally:
        exporter.stop()


def test_basic_auth_from_a_password_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hashed = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=4)).decode()
    web = tmp_path / "web.yml"
    web.write_text(f"basic_auth_users:\n  ops: '{hashed}'\n")
    password = tmp_path / "password"
    password.write_text("s3cret\n")
    wrong = tmp_path / "wrong"
    wrong.write_text("nope\n")
    exporter = Exporter(MetricsConfig(port=0, web_config_file=str(web)), build_info=BUILD_INFO)
    exporter.publish(small_snapshots()[1])
    exporter.start()
    port = exporter.port
    try:
        config = str(_config(tmp_path, port or 0, web))
        code, out, err = _status(capsys, "--config", config)
        assert code == 1
        assert "needs a user and password: give --user and --password-file" in err
        code, out, err = _status(
            capsys, "--config", config, "--user", "ops", "--password-file", str(password)
        )
        assert (code, err) == (0, "") and "llama" in out
        code, out, err = _status(
            capsys, "--config", config, "--user", "ops", "--password-file", str(wrong)
        )
        assert code == 1 and "wrong user or password" in err
        code, out, err = _status(capsys, "--url", f"http://ops:s3cret@127.0.0.1:{port}")
        assert (code, err) == (0, "") and "llama" in out
        code, out, err = _status(capsys, "--config", config, "--user", "ops")
        assert (code, err) == (1, "powerd status: --user and --password-file go together.\n")
        code, out, err = _status(
            capsys, "--config", config, "--user", "ops", "--password-file", str(tmp_path / "x")
        )
        assert code == 1 and err.startswith("powerd status: cannot read the password file ")
    finally:
        exporter.stop()


@pytest.mark.parametrize(
    "url",
    ["http://[::1", "http://127.0.0.1:99999/metrics", "http://h:port/", "ftp://h/", "http://"],
)
def test_a_bad_url_is_one_line_and_a_failure(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _status(capsys, "--url", url)
    assert code == 1 and out == ""
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("powerd status: ") and "URL" in err


class _NotHttpHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")


def test_a_port_that_does_not_speak_http_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    server = socketserver.TCPServer(("127.0.0.1", 0), _NotHttpHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        code, _, err = _status(capsys, "--url", f"127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
        server.server_close()
    assert code == 1 and len(err.splitlines()) == 1
    assert "did not answer in HTTP" in err


DCGM_TEXT = (
    "# HELP DCGM_FI_DEV_POWER_USAGE Power draw (in W).\n"
    "# TYPE DCGM_FI_DEV_POWER_USAGE gauge\n"
    'DCGM_FI_DEV_POWER_USAGE{gpu="0",UUID="GPU-1",modelName="NVIDIA H100"} 312.5\n'
)


class _DcgmHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = DCGM_TEXT.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_another_exporters_metrics_are_not_powerds(capsys: pytest.CaptureFixture[str]) -> None:
    server, url = _serve(_DcgmHandler)
    try:
        with pytest.raises(StatusError, match=r"is not powerd's metrics endpoint"):
            fetch_status(url)
        code, out, err = _status(capsys, "--url", url)
    finally:
        server.shutdown()
        server.server_close()
    assert code == 1 and out == ""
    assert err == (
        f"powerd status: {url} is not powerd's metrics endpoint (its metrics have no "
        "powerd_build_info); is that the right address and port?\n"
    )
    # A powerd with nothing published yet is still powerd.
    exporter = Exporter(MetricsConfig(port=0), build_info=BUILD_INFO)
    exporter.start()
    try:
        assert fetch_status(f"127.0.0.1:{exporter.port}") == []
    finally:
        exporter.stop()
