"""TLS and basic auth for the metrics endpoint, from a Prometheus exporter-toolkit web-config file.

The file format is the one node_exporter and every exporter-toolkit user reads
(`--web.config.file`)::

    tls_server_config:
      cert_file: server.crt          # relative paths are relative to this file
      key_file: server.key
      client_auth_type: RequireAndVerifyClientCert   # optional
      client_ca_file: ca.crt                          # required by the two verifying modes
      min_version: TLS12                              # optional, TLS12 by default
      max_version: TLS13                              # optional
    http_server_config:
      headers: {X-Frame-Options: deny}                # optional extra response headers
    basic_auth_users:
      prometheus: $2b$12$...                          # bcrypt hashes

Keys of the toolkit that Python's ssl module cannot honour (cipher_suites, curve_preferences,
client_allowed_sans, inline cert/key, the two client-auth modes that accept an unverified
certificate) are refused with an error that names them, rather than silently ignored.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import ssl
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import bcrypt

from powerd.config import ConfigError, read_yaml

_TLS_VERSIONS: dict[str, ssl.TLSVersion] = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}

_CLIENT_AUTH_MODES: dict[str, ssl.VerifyMode] = {
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
_UNSUPPORTED_CLIENT_AUTH = ("RequestClientCert", "RequireAnyClientCert")

_TLS_KEYS = (
    "cert_file",
    "key_file",
    "client_auth_type",
    "client_ca_file",
    "min_version",
    "max_version",
)
_TLS_UNSUPPORTED_KEYS = (
    "cert",
    "key",
    "cipher_suites",
    "curve_preferences",
    "prefer_server_cipher_suites",
    "client_allowed_sans",
)
_TOP_KEYS = ("tls_server_config", "http_server_config", "basic_auth_users")
_HTTP_KEYS = ("headers", "http2")

_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
"""An HTTP field name: one or more token characters (RFC 9110 5.1)."""
_BCRYPT_MAX_BYTES = 72
_BCRYPT_HASH = re.compile(r"^\$2[aby]\$\d\d\$[./A-Za-z0-9]{53}$")


class WebConfigError(ConfigError):
    """A problem in the web-config file; the message names the key."""


@dataclass(frozen=True, slots=True)
class TlsConfig:
    cert_file: Path
    key_file: Path
    client_auth_type: str = "NoClientCert"
    client_ca_file: Path | None = None
    min_version: str = "TLS12"
    max_version: str | None = None

    def ssl_context(self) -> ssl.SSLContext:
        """A server-side context; unreadable or mismatched files raise WebConfigError."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = _TLS_VERSIONS[self.min_version]
        if self.max_version is not None:
            context.maximum_version = _TLS_VERSIONS[self.max_version]
        try:
            context.load_cert_chain(certfile=str(self.cert_file), keyfile=str(self.key_file))
        except (OSError, ssl.SSLError) as exc:
            raise WebConfigError(
                f"tls_server_config.cert_file: cannot load {self.cert_file} with key "
                f"{self.key_file}: {_reason(exc)}"
            ) from None
        context.verify_mode = _CLIENT_AUTH_MODES[self.client_auth_type]
        if self.client_ca_file is not None:
            try:
                context.load_verify_locations(cafile=str(self.client_ca_file))
            except (OSError, ssl.SSLError) as exc:
                raise WebConfigError(
                    f"tls_server_config.client_ca_file: cannot load {self.client_ca_file}: "
                    f"{_reason(exc)}"
                ) from None
        return context


@dataclass(frozen=True, slots=True)
class WebConfig:
    tls: TlsConfig | None = None
    basic_auth_users: dict[str, str] = field(default_factory=dict)
    """User name -> bcrypt hash."""
    headers: dict[str, str] = field(default_factory=dict)
    """Extra HTTP response headers."""

    @property
    def secures_nothing(self) -> bool:
        """Neither TLS nor basic auth: /metrics is plain HTTP, open to whoever reaches it
        (as exporter-toolkit reads an empty file; one cut short reads the same)."""
        return self.tls is None and not self.basic_auth_users


def load_web_config(path: str | Path) -> WebConfig:
    """Read and validate a web-config file; relative file names resolve against its folder."""
    path = Path(path)
    try:
        data = read_yaml(path, what="web config")
    except ConfigError as exc:
        raise WebConfigError(str(exc)) from None
    return parse_web_config(data, base_dir=path.parent)


def parse_web_config(data: object, base_dir: Path | None = None) -> WebConfig:
    """Validate parsed YAML (a mapping, or None for no TLS and no auth)."""
    if data is None:
        return WebConfig()
    top = _mapping(data, "the web config")
    _check_keys(top, "", _TOP_KEYS)
    tls = None
    if top.get("tls_server_config") is not None:
        tls = _parse_tls(_mapping(top["tls_server_config"], "tls_server_config"), base_dir)
    headers: dict[str, str] = {}
    if top.get("http_server_config") is not None:
        http = _mapping(top["http_server_config"], "http_server_config")
        _check_keys(http, "http_server_config.", _HTTP_KEYS)
        if "http2" in http and not isinstance(http["http2"], bool):
            raise WebConfigError("http_server_config.http2: expected true or false")
        if http.get("headers") is not None:
            raw = _mapping(http["headers"], "http_server_config.headers")
            for name, value in raw.items():
                if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name):
                    raise WebConfigError(
                        f"http_server_config.headers: not an HTTP header name, got {name!r}"
                    )
                if not isinstance(value, str) or any(c in value for c in "\r\n"):
                    raise WebConfigError(
                        f"http_server_config.headers.{name}: expected a one-line string"
                    )
                headers[str(name)] = value
    users: dict[str, str] = {}
    if top.get("basic_auth_users") is not None:
        raw_users = _mapping(top["basic_auth_users"], "basic_auth_users")
        for user, hashed in raw_users.items():
            key = f"basic_auth_users.{user}"
            if not isinstance(hashed, str) or not _BCRYPT_HASH.match(hashed):
                raise WebConfigError(f"{key}: expected a bcrypt hash ($2b$...), got {hashed!r}")
            if ":" in str(user):
                raise WebConfigError(f"{key}: a user name cannot contain ':'")
            users[str(user)] = hashed
    return WebConfig(tls=tls, basic_auth_users=users, headers=headers)


def _parse_tls(raw: Mapping[object, object], base_dir: Path | None) -> TlsConfig:
    for key in raw:
        if key in _TLS_UNSUPPORTED_KEYS:
            raise WebConfigError(
                f"tls_server_config.{key}: not supported by powerd "
                "(use cert_file, key_file, client_auth_type, client_ca_file, min/max_version)"
            )
    _check_keys(raw, "tls_server_config.", _TLS_KEYS)
    values: dict[str, str] = {}
    for key, value in raw.items():
        if value is None:
            continue
        if not isinstance(value, str) or not value:
            raise WebConfigError(f"tls_server_config.{key}: expected a non-empty string")
        values[str(key)] = value
    for key in ("cert_file", "key_file"):
        if key not in values:
            raise WebConfigError(f"tls_server_config.{key}: required")
    auth = values.get("client_auth_type", "NoClientCert")
    if auth in _UNSUPPORTED_CLIENT_AUTH:
        raise WebConfigError(
            f"tls_server_config.client_auth_type: {auth} is not supported by powerd (Python's ssl "
            "module cannot accept an unverified client certificate); use "
            "VerifyClientCertIfGiven or RequireAndVerifyClientCert"
        )
    if auth not in _CLIENT_AUTH_MODES:
        raise WebConfigError(
            f"tls_server_config.client_auth_type: must be one of {', '.join(_CLIENT_AUTH_MODES)}, "
            f"got {auth!r}"
        )
    if auth != "NoClientCert" and "client_ca_file" not in values:
        raise WebConfigError(f"tls_server_config.client_ca_file: required by {auth}")
    for key in ("min_version", "max_version"):
        if key in values and values[key] not in _TLS_VERSIONS:
            raise WebConfigError(
                f"tls_server_config.{key}: must be one of {', '.join(_TLS_VERSIONS)}, "
                f"got {values[key]!r}"
            )
    min_version = values.get("min_version", "TLS12")
    max_version = values.get("max_version")
    if max_version is not None and _TLS_VERSIONS[max_version] < _TLS_VERSIONS[min_version]:
        raise WebConfigError(
            f"tls_server_config.max_version: {max_version} is below min_version {min_version}"
        )

    def resolve(name: str) -> Path:
        path = Path(name)
        return path if path.is_absolute() or base_dir is None else base_dir / path

    ca = values.get("client_ca_file")
    return TlsConfig(
        cert_file=resolve(values["cert_file"]),
        key_file=resolve(values["key_file"]),
        client_auth_type=auth,
        client_ca_file=resolve(ca) if ca is not None else None,
        min_version=min_version,
        max_version=max_version,
    )


class BasicAuth:
    """Checks `Authorization: Basic` headers against bcrypt hashes.

    bcrypt costs tens of milliseconds by design; a Prometheus server presents the same
    credentials every scrape, so outcomes are cached (keyed by a SHA-256 of the presented header,
    never the password itself), the right credentials and the wrong ones each in their own
    cache of cache_size, so that wrong ones cannot push the right ones out. Credentials not in
    either are checked one at a time: clients sending new wrong passwords take at most one core
    between them, and a cached credential never waits for them.
    """

    def __init__(self, users: Mapping[str, str], *, cache_size: int = 64) -> None:
        self._users = {user: hashed.encode("ascii") for user, hashed in users.items()}
        self._dummy_hash = _dummy_hash_at_highest_cost(self._users.values())
        self._accepted: OrderedDict[bytes, None] = OrderedDict()
        self._rejected: OrderedDict[bytes, None] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._bcrypt_lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return bool(self._users)

    def check(self, authorization: str | None) -> bool:
        """True when the header carries a known user and its password (always True if no users)."""
        if not self._users:
            return True
        if authorization is None:
            return False
        scheme, _, encoded = authorization.strip().partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            decoded = base64.b64decode(encoded.strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        user_bytes, sep, password = decoded.partition(b":")
        if not sep:
            return False
        key = hashlib.sha256(decoded).digest()
        cached = self._cached(key)
        if cached is not None:
            return cached
        with self._bcrypt_lock:
            # The same credentials may have been checked while this thread waited.
            cached = self._cached(key)
            if cached is not None:
                return cached
            hashed = self._users.get(user_bytes.decode("utf-8", errors="replace"))
            # An unknown user costs a check as dear as a known one's: the time of a reply does
            # not tell whether a user name exists (exporter-toolkit does the same).
            ok = _checkpw(password, hashed if hashed is not None else self._dummy_hash)
            ok = ok and hashed is not None
            self._remember(key, ok)
        return ok

    def _cached(self, key: bytes) -> bool | None:
        with self._lock:
            for cache, outcome in ((self._accepted, True), (self._rejected, False)):
                if key in cache:
                    cache.move_to_end(key)
                    return outcome
        return None

    def _remember(self, key: bytes, ok: bool) -> None:
        with self._lock:
            cache = self._accepted if ok else self._rejected
            cache[key] = None
            while len(cache) > self._cache_size:
                cache.popitem(last=False)


def _dummy_hash_at_highest_cost(hashes: Iterable[bytes]) -> bytes:
    """A bcrypt hash that no password matches, at the highest cost among hashes (10 when there
    are none), to check unknown users against."""
    costs = [int(hashed[4:6]) for hashed in hashes if hashed[4:6].isdigit()]
    return b"$2b$%02d$" % max(costs, default=10) + b"." * 53


def _checkpw(password: bytes, hashed: bytes) -> bool:
    try:
        # bcrypt reads the first 72 bytes. bcrypt < 5, htpasswd and Go's exporter-toolkit
        # ignore the rest; bcrypt 5 raises on them, which would refuse a password that worked.
        return bool(bcrypt.checkpw(password[:_BCRYPT_MAX_BYTES], hashed))
    except ValueError:
        return False


def _mapping(value: object, where: str) -> Mapping[object, object]:
    if not isinstance(value, Mapping):
        raise WebConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
    return value


def _check_keys(data: Mapping[object, object], prefix: str, known: tuple[str, ...]) -> None:
    for key in data:
        if key not in known:
            raise WebConfigError(
                f"{prefix}{key}: unknown key (known keys: {', '.join(sorted(known))})"
            )


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason).lower().replace("_", " ")
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)
