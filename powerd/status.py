"""`powerd status`: a per-group summary read from a running daemon's /metrics."""

from __future__ import annotations

import base64
import http.client
import math
import socket
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from powerd.config import DEFAULT_METRICS_PORT, MetricsConfig
from powerd.model import BLIND_PREFILL_SHARE
from powerd.webconfig import WebConfig, load_web_config

DEFAULT_URL = f"http://127.0.0.1:{DEFAULT_METRICS_PORT}/metrics"

_IDENTITY_FAMILY = "powerd_build_info"
"""Exported by every powerd from its start, so its absence means another exporter answered."""

_WILDCARD_HOSTS = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}
"""A daemon listening on every address is reached on the loopback one."""


class StatusError(Exception):
    """The daemon's metrics could not be read; the message is one sentence."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where and how to read a daemon's /metrics."""

    url: str
    auth: tuple[str, str] | None = None
    """(user, password) for basic auth."""
    ssl_context: ssl.SSLContext | None = None
    """Verifies an https daemon; None: the system's CAs."""


def endpoint(
    url: str | None = None,
    *,
    metrics: MetricsConfig | None = None,
    user: str | None = None,
    password_file: str | Path | None = None,
    ca_file: str | Path | None = None,
    cert_file: str | Path | None = None,
    key_file: str | Path | None = None,
) -> Endpoint:
    """The endpoint `powerd status` reads, from its options.

    metrics is the config's metrics section: it gives the address (listen_address, port) and,
    through web_config_file, the scheme; without ca_file an https daemon is then trusted by the
    certificate it serves (tls_server_config.cert_file). url overrides the address. Neither
    given: DEFAULT_URL. cert_file (with key_file, unless the key is in the same PEM) is the
    client certificate for a daemon that requires one (client_auth_type). Raises StatusError
    for an unreadable file, a user without a password file (and the reverse) or a key without
    a certificate, WebConfigError (a ConfigError) for a bad web config.
    """
    if (user is None) != (password_file is None):
        raise StatusError("--user and --password-file go together.")
    if key_file is not None and cert_file is None:
        raise StatusError("--key-file needs --cert-file.")
    auth = None
    if user is not None and password_file is not None:
        auth = (user, _read_password(Path(password_file)))
    trusted_cert = None
    if metrics is not None:
        web = load_web_config(metrics.web_config_file) if metrics.web_config_file else WebConfig()
        if web.tls is not None:
            trusted_cert = web.tls.cert_file
        if url is None:
            url = _config_url(metrics, tls=web.tls is not None)
    context = None
    if ca_file is not None:
        context = _client_context(Path(ca_file), "--ca-file")
    elif trusted_cert is not None:
        # The daemon's own certificate is the trust anchor even when a CA issued it.
        context = _client_context(trusted_cert, "tls_server_config.cert_file")
    if cert_file is not None:
        if context is None:
            context = _client_context(None, "the system's CA certificates")
        _load_client_cert(context, Path(cert_file), None if key_file is None else Path(key_file))
    return Endpoint(url=url or DEFAULT_URL, auth=auth, ssl_context=context)


@dataclass(frozen=True, slots=True)
class GroupRow:
    """One group as the daemon exports it; None where the daemon does not know the value."""

    group: str
    server: str
    model_name: str
    mode: str | None
    clock_limit_mhz: float | None
    power_w: float | None
    tokens_per_s: float | None
    tokens_per_joule: float | None
    slo_met: bool | None
    slo_attainment: float | None
    observe_only: bool = False
    dry_run: bool = False
    first_token_blind: bool = False
    """Its server exports neither a TTFT nor a prompt-length histogram."""
    reason: str | None = None
    """Why the controller set the group as it did at the last tick (model.DECISION_REASONS)."""


def fetch_status(
    url: str,
    timeout_s: float = 2.0,
    auth: tuple[str, str] | None = None,
    *,
    ssl_context: ssl.SSLContext | None = None,
) -> list[GroupRow]:
    """Read a daemon's /metrics (url may be the base address or the /metrics URL itself).

    auth is (user, password) for basic auth, else the user:password@ in url if any; ssl_context
    verifies an https daemon (e.g. made with `ssl.create_default_context(cafile=...)`). No
    http_proxy is used. Raises StatusError, also when the endpoint answers with metrics that are
    not powerd's.
    """
    metrics_url, url_auth = _metrics_url(url)
    auth = auth if auth is not None else url_auth
    request = urllib.request.Request(metrics_url)
    if auth is not None:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode("ascii")
        request.add_header("Authorization", f"Basic {token}")
    # The daemon is on this node or the operator's network, never behind the http_proxy that
    # the environment may name for the internet.
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=ssl_context)
    )
    try:
        with opener.open(request, timeout=timeout_s) as response:
            body = response.read()
    except urllib.error.HTTPError as exc:
        if exc.code == 401:
            hint = (
                "wrong user or password"
                if auth is not None
                else "it needs a user and password: give --user and --password-file"
            )
            raise StatusError(f"powerd at {metrics_url} refused the request ({hint}).") from None
        raise StatusError(f"powerd at {metrics_url} answered HTTP {exc.code}.") from None
    except urllib.error.URLError as exc:
        raise _unreachable(metrics_url, exc.reason) from None
    except (http.client.InvalidURL, ValueError) as exc:
        raise StatusError(f"{url!r} is not a usable URL ({exc}).") from None
    except http.client.HTTPException as exc:
        raise StatusError(
            f"{metrics_url} did not answer in HTTP ({type(exc).__name__}); is that the right "
            "port and scheme?"
        ) from None
    except OSError as exc:
        raise _unreachable(metrics_url, exc) from None
    try:
        families = list(text_string_to_metric_families(body.decode("utf-8")))
    except (ValueError, UnicodeDecodeError) as exc:
        raise StatusError(f"{metrics_url} did not return Prometheus metrics ({exc}).") from None
    if not any(family.name == _IDENTITY_FAMILY for family in families):
        raise StatusError(
            f"{metrics_url} is not powerd's metrics endpoint (its metrics have no "
            f"{_IDENTITY_FAMILY}); is that the right address and port?"
        )
    return _rows(families)


def parse_status(text: str) -> list[GroupRow]:
    """Group rows from an exposition text, in the order the groups first appear."""
    return _rows(text_string_to_metric_families(text))


def _rows(families: Iterable[Metric]) -> list[GroupRow]:
    values: dict[tuple[str, str, str], dict[str, float]] = {}
    chosen: dict[str, dict[tuple[str, str, str], str]] = {name: {} for name in _STATE_SETS}
    """Per state-set family: the label value that is 1, by group."""
    exports: dict[str, dict[str, float]] = {}
    """Per server: its powerd_source_exports_* values by metric name."""
    for family in families:
        if family.name in _EXPORTS:
            for sample in family.samples:
                exports.setdefault(sample.labels.get("server", ""), {})[family.name] = sample.value
            continue
        if not family.name.startswith(("powerd_group_", "powerd_controller_mode")):
            continue
        for sample in family.samples:
            labels = sample.labels
            if "group" not in labels:
                continue
            key = (labels["group"], labels.get("server", ""), labels.get("model_name", ""))
            row = values.setdefault(key, {})
            label = _STATE_SETS.get(sample.name)
            if label is not None:
                if sample.value == 1.0:
                    chosen[sample.name][key] = labels.get(label, "")
                continue
            if not math.isnan(sample.value):
                row[sample.name] = float(sample.value)
    rows = []
    for key, row in values.items():
        clock_hz = row.get("powerd_group_clock_limit_hertz")
        slo_met = row.get("powerd_group_slo_met")
        rows.append(
            GroupRow(
                group=key[0],
                server=key[1],
                model_name=key[2],
                mode=chosen["powerd_controller_mode"].get(key),
                clock_limit_mhz=None if clock_hz is None else clock_hz / 1e6,
                power_w=row.get("powerd_group_power_watts"),
                tokens_per_s=row.get("powerd_group_generation_tokens_per_second"),
                tokens_per_joule=row.get("powerd_group_tokens_per_joule"),
                slo_met=None if slo_met is None else slo_met == 1.0,
                slo_attainment=row.get("powerd_group_slo_attainment_ratio"),
                observe_only=row.get("powerd_group_observe_only") == 1.0,
                dry_run=row.get("powerd_group_dry_run") == 1.0,
                first_token_blind=all(
                    exports.get(key[1], {}).get(name) == 0.0 for name in _EXPORTS
                ),
                reason=chosen["powerd_group_decision_reason"].get(key),
            )
        )
    return rows


_EXPORTS = ("powerd_source_exports_ttft", "powerd_source_exports_prompt_lengths")
_STATE_SETS = {"powerd_controller_mode": "mode", "powerd_group_decision_reason": "reason"}
"""Families with one series per value of a label, 1 for the current one: the label's name."""
_HEADER = ("GROUP", "MODE", "CLOCK MHz", "WATTS", "TOKENS/S", "TOKENS/J", "SLO", "WHY")
_BLIND_NOTE = (
    "blind: the server exports neither a TTFT nor a prompt-length histogram, so its clocks stay "
    f"at or above {100 * BLIND_PREFILL_SHARE:.0f} % of their maximum (`powerd probe URL` shows "
    "what it exports)"
)


def format_status(rows: list[GroupRow]) -> str:
    """A fixed-width table, one line per group; '-' marks a value the daemon does not know."""
    if not rows:
        return "powerd is running but controls no groups."
    table = [_HEADER]
    for row in rows:
        mode = row.mode or "-"
        tags = ["observe"] if row.observe_only else []
        if row.dry_run and not row.observe_only:
            tags.append("dry run")
        if row.first_token_blind and not row.observe_only:
            tags.append("blind")
        if tags:
            mode += f" ({', '.join(tags)})"
        table.append(
            (
                row.group,
                mode,
                _number(row.clock_limit_mhz, 0),
                _number(row.power_w, 0),
                _number(row.tokens_per_s, 0),
                _number(row.tokens_per_joule, 2),
                _slo(row.slo_met, row.slo_attainment),
                row.reason or "-",
            )
        )
    widths = [max(len(line[i]) for line in table) for i in range(len(_HEADER))]
    lines = []
    for line in table:
        cells = [
            cell.ljust(width) if i < 2 or i >= len(line) - 2 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(line, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    if any(row.first_token_blind and not row.observe_only for row in rows):
        lines += ["", _BLIND_NOTE]
    return "\n".join(lines)


def _number(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _slo(met: bool | None, attainment: float | None) -> str:
    """Whether the last tick's latency quantiles met the SLO, and the share of recent ticks
    whose did (not of requests: a tick's p95 misses when a twentieth of its requests do)."""
    text = "-" if met is None else ("met" if met else "missed")
    if attainment is not None:
        text += f" {attainment * 100:.0f}% of ticks"
    return text


def _metrics_url(url: str) -> tuple[str, tuple[str, str] | None]:
    """The /metrics URL without credentials, and the (user, password) it carried."""
    if "://" not in url:
        url = f"http://{url}"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise StatusError(f"{url!r} is not a valid URL ({exc}).") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise StatusError(f"{url!r} is not an http:// or https:// URL with a host.")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    netloc = host if port is None else f"{host}:{port}"
    auth = None
    if parts.username is not None:
        auth = (unquote(parts.username), unquote(parts.password or ""))
    path = parts.path if parts.path not in ("", "/") else "/metrics"
    return urlunsplit((parts.scheme, netloc, path, parts.query, "")), auth


_CLIENT_CERT_ALERTS = frozenset(
    {
        "TLSV13_ALERT_CERTIFICATE_REQUIRED",
        "SSLV3_ALERT_BAD_CERTIFICATE",
        "TLSV1_ALERT_UNKNOWN_CA",
    }
)
"""The server's TLS alerts for a missing or untrusted client certificate (OpenSSL's names)."""


def _unreachable(metrics_url: str, reason: object) -> StatusError:
    if isinstance(reason, ssl.SSLCertVerificationError):
        return StatusError(
            f"powerd at {metrics_url} is not trusted ({_reason(reason)}); give --ca-file, or "
            "--url with a name its certificate carries."
        )
    if isinstance(reason, ssl.SSLError) and reason.reason in _CLIENT_CERT_ALERTS:
        return StatusError(
            f"powerd at {metrics_url} refused the client ({_reason(reason)}); it requires a "
            "client certificate it trusts: give --cert-file (and --key-file)."
        )
    if isinstance(reason, ssl.SSLError):
        return StatusError(
            f"powerd at {metrics_url} failed TLS ({_reason(reason)}); does it serve https, "
            "and does it require a client certificate (--cert-file)?"
        )
    return StatusError(
        f"powerd is not reachable at {metrics_url} ({_reason(reason)}); is the daemon running?"
    )


def _reason(reason: object) -> str:
    if isinstance(reason, ssl.SSLCertVerificationError) and reason.verify_message:
        return f"TLS error: {reason.verify_message}"
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(reason, socket.gaierror):
        return "unknown host"
    if isinstance(reason, ssl.SSLError):
        return f"TLS error: {reason.reason or reason}"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror.lower()
    return str(reason)


def _config_url(metrics: MetricsConfig, *, tls: bool) -> str:
    host = _WILDCARD_HOSTS.get(metrics.listen_address, metrics.listen_address)
    if ":" in host:
        host = f"[{host}]"
    return f"{'https' if tls else 'http'}://{host}:{metrics.port}/metrics"


def _read_password(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise StatusError(f"cannot read the password file {path}: {_reason(exc)}.") from None
    # Files written by `echo` end in a newline that is not part of the password.
    return text.rstrip("\r\n")


def _client_context(ca_file: Path | None, what: str) -> ssl.SSLContext:
    """A context that trusts ca_file (else the system's CAs) and ends a chain at any
    certificate it trusts (VERIFY_X509_PARTIAL_CHAIN), the same on every Python."""
    try:
        context = ssl.create_default_context(cafile=None if ca_file is None else str(ca_file))
    except (OSError, ssl.SSLError) as exc:
        where = what if ca_file is None else f"{what} {ca_file}"
        raise StatusError(f"cannot load {where}: {_reason(exc)}.") from None
    # Python 3.13 added RFC 5280's profile checks to the default context (gh-107361), which
    # refuse a CA without keyUsage, as `openssl req -x509` makes one with OpenSSL 3.0's own
    # configuration: the CA the operator names is trusted as it is on 3.10-3.12.
    context.verify_flags &= ~ssl.VERIFY_X509_STRICT
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    return context


def _load_client_cert(context: ssl.SSLContext, cert_file: Path, key_file: Path | None) -> None:
    try:
        context.load_cert_chain(str(cert_file), None if key_file is None else str(key_file))
    except (OSError, ssl.SSLError) as exc:
        what = f"--cert-file {cert_file}"
        if key_file is not None:
            what += f" / --key-file {key_file}"
        raise StatusError(f"cannot load {what}: {_reason(exc)}.") from None
