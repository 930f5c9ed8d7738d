"""`powerd status` against a real Exporter on an ephemeral port."""

from __future__ import annotations

import socket
import threading
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import bcrypt
import pytest

from powerd.config import MetricsConfig
from powerd.exporter import Exporter
from powerd.status import GroupRow, StatusError, fetch_status, format_status, parse_status
from tests.unit.test_exporter import BUILD_INFO, full_snapshot, group_status, small_snapshots


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
    server = HTTPServer(("127.0.0.1", 0), _HtmlHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with pytest.raises(StatusError, match=r"/metrics did not return Prometheus metrics"):
            fetch_status(f"http://127.0.0.1:{server.server_address[1]}")
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
