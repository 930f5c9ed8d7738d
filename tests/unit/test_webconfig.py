"""Web-config parsing, basic auth and TLS on the exporter's HTTP server."""

from __future__ import annotations

import base64
import socket
import ssl
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import bcrypt
import pytest

from powerd import metrics_http, webconfig
from powerd.config import ConfigError, MetricsConfig
from powerd.exporter import Exporter
from powerd.webconfig import BasicAuth, WebConfigError, load_web_config, parse_web_config
from tests.conftest import require_program
from tests.unit.snapshots import small_exporter, small_snapshots
from tests.unit.waiting import drip_until_closed, wait_until

PASSWORD = "correct horse"
# Cost 4 keeps the tests fast; production hashes use 10-12.
HASH = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([1, 2], r"the web config: expected a mapping"),
        ({"tls_config": {}}, r"^tls_config: unknown key \(known keys: basic_auth_users"),
        ({"tls_server_config": {"cert_file": "a"}}, r"^tls_server_config\.key_file: required"),
        (
            {"tls_server_config": {"cert_file": "a", "key_file": "b", "cipher_suites": ["x"]}},
            r"^tls_server_config\.cipher_suites: not supported by powerd",
        ),
        (
            {"tls_server_config": {"cert_file": "a", "key_file": "b", "cert_fle": "c"}},
            r"^tls_server_config\.cert_fle: unknown key",
        ),
        (
            {"tls_server_config": {"cert_file": "a", "key_file": "b", "client_auth_type": "Any"}},
            r"^tls_server_config\.client_auth_type: must be one of NoClientCert",
        ),
        (
            {
                "tls_server_config": {
                    "cert_file": "a",
                    "key_file": "b",
                    "client_auth_type": "RequireAnyClientCert",
                }
            },
            r"^tls_server_config\.client_auth_type: RequireAnyClientCert is not supported",
        ),
        (
            {
                "tls_server_config": {
                    "cert_file": "a",
                    "key_file": "b",
                    "client_auth_type": "RequireAndVerifyClientCert",
                }
            },
            r"^tls_server_config\.client_ca_file: required by RequireAndVerifyClientCert",
        ),
        (
            {"tls_server_config": {"cert_file": "a", "key_file": "b", "min_version": "TLS1.2"}},
            r"^tls_server_config\.min_version: must be one of TLS10",
        ),
        (
            {
                "tls_server_config": {
                    "cert_file": "a",
                    "key_file": "b",
                    "min_version": "TLS13",
                    "max_version": "TLS12",
                }
            },
            r"^tls_server_config\.max_version: TLS12 is below min_version TLS13",
        ),
        (
            {"tls_server_config": {"cert_file": 3, "key_file": "b"}},
            r"^tls_server_config\.cert_file: expected a non-empty string",
        ),
        ({"basic_auth_users": {"prom": "hunter2"}}, r"^basic_auth_users\.prom: expected a bcrypt"),
        ({"basic_auth_users": ["prom"]}, r"^basic_auth_users: expected a mapping"),
        ({"http_server_config": {"http3": True}}, r"^http_server_config\.http3: unknown key"),
        (
            {"http_server_config": {"headers": {"X-Frame-Options:": "deny"}}},
            r"^http_server_config\.headers: not an HTTP header name, got 'X-Frame-Options:'",
        ),
        (
            {"http_server_config": {"headers": {"X Frame": "deny"}}},
            r"^http_server_config\.headers: not an HTTP header name, got 'X Frame'",
        ),
        (
            {"http_server_config": {"headers": {"": "deny"}}},
            r"^http_server_config\.headers: not an HTTP header name, got ''",
        ),
        (
            {"http_server_config": {"headers": {"X-A": "a\r\nX-B: b"}}},
            r"^http_server_config\.headers\.X-A: expected a one-line string",
        ),
    ],
)
def test_bad_web_config_names_the_key(data: object, message: str) -> None:
    with pytest.raises(WebConfigError, match=message):
        parse_web_config(data)


def test_web_config_error_is_a_config_error() -> None:
    assert issubclass(WebConfigError, ConfigError)


def test_empty_file_means_plain_http_without_auth(tmp_path: Path) -> None:
    path = tmp_path / "web.yml"
    path.write_text("# nothing\n")
    config = load_web_config(path)
    assert config.tls is None and config.basic_auth_users == {} and config.headers == {}


def test_relative_files_resolve_against_the_config_folder(tmp_path: Path) -> None:
    path = tmp_path / "web.yml"
    path.write_text(
        "tls_server_config:\n  cert_file: certs/server.crt\n  key_file: /abs/server.key\n"
        f"basic_auth_users:\n  prometheus: '{HASH}'\n"
    )
    config = load_web_config(path)
    assert config.tls is not None
    assert config.tls.cert_file == tmp_path / "certs" / "server.crt"
    assert config.tls.key_file == Path("/abs/server.key")
    assert config.tls.min_version == "TLS12"
    assert config.basic_auth_users == {"prometheus": HASH}


def test_unreadable_and_invalid_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(WebConfigError, match=r"cannot read web config .*missing\.yml"):
        load_web_config(tmp_path / "missing.yml")
    bad = tmp_path / "bad.yml"
    bad.write_text("basic_auth_users: [\n")
    with pytest.raises(WebConfigError, match=r"bad\.yml: not valid YAML"):
        load_web_config(bad)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"basic_auth_users:\n  prom: x # \x80\n", "not UTF-8 (byte 0x80 on line 2)"),
        (
            b"basic_auth_users: {}\nbasic_auth_users: {}\n",
            "line 2: key 'basic_auth_users' is given twice (first on line 1)",
        ),
        (
            f"basic_auth_users:\n  prom: {HASH}\n  prom: {HASH}\n".encode(),
            "line 3: key 'prom' is given twice (first on line 2)",
        ),
        (b"a: [1\nb: 2\n", "not valid YAML: line 2, column 2: expected ',' or ']'"),
    ],
)
def test_a_web_config_is_read_as_strictly_as_the_config(
    tmp_path: Path, content: bytes, message: str
) -> None:
    """One line naming the file and the line: a second user that would replace the first, or
    a TLS section given twice, is not quietly dropped."""
    path = tmp_path / "web.yml"
    path.write_bytes(content)
    with pytest.raises(WebConfigError) as info:
        load_web_config(path)
    assert str(info.value).startswith(f"{path}: {message}")
    assert "\n" not in str(info.value)


def test_basic_auth_accepts_only_the_right_password() -> None:
    auth = BasicAuth({"prometheus": HASH})
    assert auth.check(basic("prometheus", PASSWORD))
    assert not auth.check(basic("prometheus", PASSWORD + "!"))
    assert not auth.check(basic("grafana", PASSWORD))
    assert not auth.check(None)
    assert not auth.check("Bearer abc")
    assert not auth.check("Basic !!!not-base64")
    assert not auth.check("Basic " + base64.b64encode(b"no-colon").decode())
    assert BasicAuth({}).check(None)


_REAL_CHECKPW = bcrypt.checkpw


def _checkpw_raising_past_72_bytes(password: bytes, hashed: bytes) -> bool:
    """bcrypt.checkpw as bcrypt 5.0+ has it: a password longer than 72 bytes raises ValueError
    (before 5.0 the bytes past the 72nd were ignored)."""
    if len(password) > 72:
        raise ValueError("password cannot be longer than 72 bytes")
    return bool(_REAL_CHECKPW(password, hashed))


@pytest.mark.parametrize("checkpw", ["installed", "raising past 72 bytes"])
def test_a_password_longer_than_bcrypt_reads_is_accepted_on_every_bcrypt(
    monkeypatch: pytest.MonkeyPatch, checkpw: str
) -> None:
    """bcrypt hashes the first 72 bytes of a password. bcrypt < 5, htpasswd and Go's
    exporter-toolkit ignore the rest; bcrypt 5 raises instead, so a long password (a generated
    token) that worked was refused after an upgrade and every scrape got 401."""
    if checkpw != "installed":
        monkeypatch.setattr(bcrypt, "checkpw", _checkpw_raising_past_72_bytes)
    token = "t" * 72 + "-and-more"
    hashed = bcrypt.hashpw(token.encode()[:72], bcrypt.gensalt(rounds=4)).decode()
    auth = BasicAuth({"prometheus": hashed})
    assert auth.check(basic("prometheus", token))
    assert not auth.check(basic("prometheus", "u" + token[1:]))


def test_basic_auth_caches_bcrypt_by_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bytes] = []
    real = webconfig._checkpw

    def counting(password: bytes, hashed: bytes) -> bool:
        calls.append(password)
        return real(password, hashed)

    monkeypatch.setattr(webconfig, "_checkpw", counting)
    auth = BasicAuth({"prometheus": HASH}, cache_size=2)
    for _ in range(5):
        assert auth.check(basic("prometheus", PASSWORD))
        assert not auth.check(basic("prometheus", "wrong"))
    assert len(calls) == 2
    # A third wrong credential evicts the oldest wrong one, never the right password.
    assert not auth.check(basic("prometheus", "other"))
    assert not auth.check(basic("prometheus", "third"))
    assert auth.check(basic("prometheus", PASSWORD))
    assert len(calls) == 4
    assert not auth.check(basic("prometheus", "wrong"))
    assert len(calls) == 5


def test_a_flood_of_wrong_credentials_keeps_the_right_one_cached(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    checked: list[bytes] = []
    real = webconfig._checkpw

    def counting(password: bytes, hashed: bytes) -> bool:
        checked.append(password)
        return real(password, hashed)

    monkeypatch.setattr(webconfig, "_checkpw", counting)
    auth = BasicAuth({"prometheus": HASH}, cache_size=4)
    assert auth.check(basic("prometheus", PASSWORD))
    for guess in range(20):
        assert not auth.check(basic("prometheus", f"guess-{guess}"))
    assert auth.check(basic("prometheus", PASSWORD))
    assert checked.count(PASSWORD.encode()) == 1


def test_uncached_credentials_are_checked_one_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """A second new credential waits for the bcrypt check under way; a cached one does not."""
    inside = threading.Semaphore(0)
    release = threading.Event()
    real = webconfig._checkpw

    def held(password: bytes, hashed: bytes) -> bool:
        inside.release()
        release.wait(10.0)
        return real(password, hashed)

    auth = BasicAuth({"prometheus": HASH})
    assert auth.check(basic("prometheus", PASSWORD))
    monkeypatch.setattr(webconfig, "_checkpw", held)
    outcomes: list[bool] = []
    guessers = [
        threading.Thread(target=lambda g=g: outcomes.append(auth.check(basic("prometheus", g))))
        for g in ("guess-1", "guess-2")
    ]
    try:
        guessers[0].start()
        assert inside.acquire(timeout=10.0), "the first check never began"
        guessers[1].start()
        # Not a timing bound: a second check running alongside would be inside within this.
        assert not inside.acquire(timeout=1.0), "two bcrypt checks ran at once"
        cached: list[bool] = []
        scrape = threading.Thread(
            target=lambda: cached.append(auth.check(basic("prometheus", PASSWORD)))
        )
        scrape.start()
        scrape.join(10.0)
        assert cached == [True], "a cached credential waited for a bcrypt check"
    finally:
        release.set()
        for guesser in guessers:
            guesser.join(10.0)
    assert inside.acquire(timeout=0), "the second check ran after the first"
    assert outcomes == [False, False]


def test_unknown_users_cost_as_much_as_the_dearest_configured_hash(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    hashes = {
        "cheap": bcrypt.hashpw(b"a", bcrypt.gensalt(rounds=4)).decode(),
        "dear": bcrypt.hashpw(b"b", bcrypt.gensalt(rounds=6)).decode(),
    }
    checked: list[bytes] = []
    real = webconfig._checkpw

    def recording(password: bytes, hashed: bytes) -> bool:
        checked.append(hashed)
        return real(password, hashed)

    monkeypatch.setattr(webconfig, "_checkpw", recording)
    auth = BasicAuth(hashes)
    assert not auth.check(basic("nobody", "b"))
    (dummy,) = checked
    assert dummy.startswith(b"$2b$06$") and webconfig._BCRYPT_HASH.match(dummy.decode())
    # A real check, at that cost, that fails: not a malformed hash rejected at once.
    assert bcrypt.checkpw(b"b", dummy) is False
    assert not BasicAuth({"cheap": hashes["cheap"]}).check(basic("nobody", "a"))
    assert checked[-1].startswith(b"$2b$04$")


def _get(
    url: str, headers: dict[str, str] | None = None, context: ssl.SSLContext | None = None
) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5, context=context) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def _serving(tmp_path: Path, web_config: str) -> Exporter:
    path = tmp_path / "web.yml"
    path.write_text(web_config)
    exporter = Exporter(
        MetricsConfig(port=0, web_config_file=str(path)), build_info={"version": "t"}
    )
    for snapshot in small_snapshots():
        exporter.publish(snapshot)
    return exporter


def test_http_basic_auth(tmp_path: Path) -> None:
    exporter = _serving(
        tmp_path,
        f"basic_auth_users:\n  prometheus: '{HASH}'\n"
        "http_server_config:\n  headers:\n    X-Content-Type-Options: nosniff\n",
    )
    exporter.start()
    try:
        url = f"http://127.0.0.1:{exporter.port}/metrics"
        status, headers, _ = _get(url)
        assert status == 401
        assert headers["WWW-Authenticate"].startswith("Basic realm=")
        assert _get(url, {"Authorization": basic("prometheus", "nope")})[0] == 401
        status, headers, body = _get(url, {"Authorization": basic("prometheus", PASSWORD)})
        assert status == 200
        assert body == exporter.render()
        assert headers["X-Content-Type-Options"] == "nosniff"
    finally:
        exporter.stop()


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    yield make_certs(tmp_path_factory.mktemp("certs"))


def make_certs(folder: Path) -> Path:
    """Self-signed server.crt/.key (localhost, 127.0.0.1) and client.crt/.key in folder; skips
    the test without the openssl CLI."""
    openssl = require_program("openssl")
    for name, subject in (("server", "localhost"), ("client", "powerd-test-client")):
        subprocess.run(
            [
                openssl,
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-days",
                "2",
                "-subj",
                f"/CN={subject}",
                "-addext",
                "subjectAltName=DNS:localhost,IP:127.0.0.1",
                "-keyout",
                str(folder / f"{name}.key"),
                "-out",
                str(folder / f"{name}.crt"),
            ],
            check=True,
            capture_output=True,
            timeout=30,
        )
    return folder


def test_tls_serves_metrics_and_a_stalled_client_blocks_nobody(tmp_path: Path, certs: Path) -> None:
    exporter = _serving(
        tmp_path,
        f"tls_server_config:\n  cert_file: {certs / 'server.crt'}\n"
        f"  key_file: {certs / 'server.key'}\n",
    )
    exporter.start()
    stalled = socket.create_connection(("127.0.0.1", exporter.port or 0))
    try:
        context = ssl.create_default_context(cafile=str(certs / "server.crt"))
        status, _, body = _get(f"https://127.0.0.1:{exporter.port}/metrics", context=context)
        assert status == 200 and body == exporter.render()
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            _get(f"http://127.0.0.1:{exporter.port}/metrics")
        untrusting = ssl.create_default_context()
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
            _get(f"https://127.0.0.1:{exporter.port}/metrics", context=untrusting)
    finally:
        stalled.close()
        exporter.stop()


def test_a_tls_handshake_still_coming_at_the_deadline_is_dropped(
    tmp_path: Path, certs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(metrics_http, "REQUEST_HEAD_DEADLINE_S", 0.5)
    exporter = _serving(
        tmp_path,
        f"tls_server_config:\n  cert_file: {certs / 'server.crt'}\n"
        f"  key_file: {certs / 'server.key'}\n",
    )
    exporter.start()
    try:
        with socket.create_connection(("127.0.0.1", exporter.port or 0), timeout=10) as sock:
            # A TLS handshake record of 512 bytes, whose body then comes a byte at a time.
            sock.sendall(b"\x16\x03\x01\x02\x00")
            assert drip_until_closed(sock, b"\x00"), "a slow handshake held its connection"
        assert wait_until(lambda: exporter.open_connections == 0)
    finally:
        exporter.stop()


def test_tls_client_certificates_are_verified(tmp_path: Path, certs: Path) -> None:
    exporter = _serving(
        tmp_path,
        f"tls_server_config:\n  cert_file: {certs / 'server.crt'}\n"
        f"  key_file: {certs / 'server.key'}\n"
        "  client_auth_type: RequireAndVerifyClientCert\n"
        f"  client_ca_file: {certs / 'client.crt'}\n"
        "  min_version: TLS12\n",
    )
    exporter.start()
    try:
        url = f"https://127.0.0.1:{exporter.port}/metrics"
        anonymous = ssl.create_default_context(cafile=str(certs / "server.crt"))
        with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
            _get(url, context=anonymous)
        known = ssl.create_default_context(cafile=str(certs / "server.crt"))
        known.load_cert_chain(str(certs / "client.crt"), str(certs / "client.key"))
        assert _get(url, context=known)[0] == 200
    finally:
        exporter.stop()


def test_missing_certificate_is_a_clear_error(tmp_path: Path) -> None:
    exporter = _serving(
        tmp_path, "tls_server_config:\n  cert_file: nope.crt\n  key_file: nope.key\n"
    )
    with pytest.raises(WebConfigError, match=r"^tls_server_config\.cert_file: cannot load .*nope"):
        exporter.start()
    assert exporter.port is None


def test_bad_web_config_file_stops_start(tmp_path: Path) -> None:
    exporter = _serving(tmp_path, "basic_auth_users:\n  prometheus: plain\n")
    with pytest.raises(WebConfigError, match=r"basic_auth_users\.prometheus"):
        exporter.start()


def test_exporter_without_web_config_is_plain_http() -> None:
    exporter = small_exporter()
    exporter.start()
    try:
        assert _get(f"http://127.0.0.1:{exporter.port}/metrics")[0] == 200
    finally:
        exporter.stop()
