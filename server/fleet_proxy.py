"""A TLS reverse proxy (a real nginx) that shows sites only the Fleet API of the owner's SuperLink.

Why a proxy at all
    Flower 1.41 serves the Fleet API (what SuperNodes call), the Control API (what ``flwr``
    calls: submit runs, register node keys) and the Runtime API (what ServerApps call) on
    one HTTP port, and in the open-source build Control and Runtime are unauthenticated.
    Exposing that port to sites would let any site run code on every other site and
    register arbitrary node keys.  So the SuperLink stays on 127.0.0.1 and this proxy is
    the only public door: ``/v1/fleet/<route>`` (POST) and ``/health`` (GET/HEAD) go
    through; everything else (``/v1/control/*``, ``/v1/runtime/*``, ``/docs``,
    ``/openapi.json``) gets a 403 from nginx itself and never reaches Flower.

Why nginx and not a Python proxy
    The public side parses untrusted bytes from the internet at up to 5 MiB a request;
    nginx is the hardened, boring tool for that, and keeps the proxy off the SuperLink's
    Python event loop.  Everything it needs lives under one work dir (conf, pid, logs,
    temp paths), so it runs next to the SuperLink without touching /etc or /var.

What Flower's Fleet client needs from the proxy (read from flwr 1.41's source)
    * ``POST /v1/fleet/<route>`` with ``Content-Type: application/protobuf`` and no query
      string; unary request and response bodies (no streaming on the Fleet API).
    * Node auth sends ``flwr-public-key``, ``flwr-timestamp`` and ``flwr-signature``;
      nginx passes hyphenated headers unchanged (it drops only underscored ones).
    * Arrays travel as 5 MiB chunks (``FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE``), so the body
      limit must be above that; each request has a 30 s client timeout (heartbeats 5 s),
      so the proxy's own timeouts must not be shorter.
    * The SuperLink's uvicorn closes idle keep-alive connections after 5 s.  nginx notices
      a close that has already happened, but a request sent just as uvicorn closes would
      fail, and nginx does not retry a POST: so the proxy drops idle upstream connections
      first (4 s).
    * nginx 1.22 verifies the SuperLink's certificate against DNS names only
      (``proxy_ssl_name 127.0.0.1`` fails with "upstream SSL certificate does not match"
      although the SAN holds IP:127.0.0.1), so the name it checks is ``localhost``.

Worker user when started as root
    nginx's master keeps root (it reads the TLS key, binds the port, opens the logs); the
    workers, which parse the requests, run as ``nobody`` so a worker compromise is not a
    root compromise.  Request and response buffering are off, so workers never write
    temp files; the temp paths still point into the work dir so nginx never creates
    anything under /var/lib/nginx, and nginx's master chowns them to the worker user.
    Running workers as root whenever the work dir happens to sit in a private folder
    (such as /root or pytest's 0700 /tmp/pytest-of-root) would silently trade that
    protection for nothing, so it is never done.
"""

from __future__ import annotations

import contextlib
import grp
import ipaddress
import os
import pwd
import re
import shutil
import signal
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType

from cryptography.hazmat.primitives import serialization

from xkt.shared.addresses import is_loopback
from xkt.shared.errors import ConfigError, TransportError
from xkt.shared.files import replace_file
from xkt.shared.flower_process import die_with_parent, free_port
from xkt.shared.tls import check_key_permissions, load_cert

FLOWER_REQUEST_TIMEOUT_S = 30
"""Flower's HTTP clients give up on a request after 30 s; the proxy must not cut sooner."""

FLOWER_CHUNK_MIB = 5
"""Flower splits arrays into 5 MiB objects (FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE); one is one POST body."""

UPSTREAM_KEEPALIVE_S = 4
"""Below uvicorn's 5 s idle keep-alive, so nginx never sends on a connection the SuperLink is closing."""

REFUSAL = "refused by the xkt fleet proxy: only POST /v1/fleet/<route> and GET /health are served here"
"""The body of every 403 the proxy itself answers, so a test (or a person) can tell it from Flower's."""

_FLEET_URI = "^/v1/fleet/[a-z0-9-]+$"
"""The raw request URI of a Fleet call: no query, no dots, no percent-encoding, nothing to reinterpret."""

_UNSAFE_CONF_CHARS = frozenset("\"\\;{}$#'\n\r\t")
_NGINX_MISSING_HINT = "install nginx (make install does it: apt-get install nginx)"
_SBIN_DIRS = ("/usr/sbin", "/sbin", "/usr/local/sbin")
_FREE_PORT_ATTEMPTS = 3
_TEMP_KINDS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")  # nginx creates all five at start
_SERIOUS_LINE = re.compile(r"\[(?P<level>emerg|alert|crit)\] (?:\d+#\d+: )?(?:\*\d+ )?(?P<text>.*)")


@dataclass(frozen=True)
class FleetProxyConfig:
    """Where the proxy listens, what it presents, where the SuperLink is, and where nginx keeps its files.

    ``tls_cert``/``tls_key`` are what sites see (their SuperNodes pass the matching CA as
    ``--root-certificates``).  ``upstream_ca`` verifies the SuperLink's own certificate,
    whose SAN must include ``upstream_tls_name``.  ``work`` holds nginx.conf, the pid
    file, logs/ and temp/; it is created if missing.  ``listen_port`` 0 means "a free
    port, chosen at start" (:attr:`FleetProxy.port` tells which).
    """

    listen_port: int
    tls_cert: Path
    tls_key: Path
    upstream_port: int
    upstream_ca: Path
    work: Path
    listen_host: str = "0.0.0.0"
    upstream_host: str = "127.0.0.1"
    upstream_tls_name: str = "localhost"
    max_body_mib: int = 64
    timeout_s: int = 60
    nginx: str = "nginx"
    start_timeout_s: float = 15.0
    stop_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if not 0 <= self.listen_port < 65536:
            raise _config_error(f"the proxy's listen port {self.listen_port} is out of range", "give 1..65535, or 0")
        if not 1 <= self.upstream_port < 65536:
            raise _config_error(f"the SuperLink port {self.upstream_port} is out of range", "give 1..65535")
        if not is_loopback(self.upstream_host):
            raise _config_error(
                f"the SuperLink address {self.upstream_host} is not loopback",
                "run flower-superlink with --host 127.0.0.1; sites could otherwise bypass the proxy",
            )
        if self.max_body_mib <= FLOWER_CHUNK_MIB:
            raise _config_error(
                f"a body limit of {self.max_body_mib} MiB cannot carry Flower's {FLOWER_CHUNK_MIB} MiB chunks",
                "use at least 8 MiB (64 is the default)",
            )
        if self.timeout_s < FLOWER_REQUEST_TIMEOUT_S:
            raise _config_error(
                f"a proxy timeout of {self.timeout_s} s is shorter than Flower's {FLOWER_REQUEST_TIMEOUT_S} s",
                f"use at least {FLOWER_REQUEST_TIMEOUT_S} s (60 is the default)",
            )
        _safe_token(self.listen_host, "listen host")
        _safe_token(self.upstream_tls_name, "upstream TLS name")
        if _is_ip(self.upstream_tls_name):
            raise _config_error(
                f"the upstream TLS name {self.upstream_tls_name} is an IP address; nginx checks only DNS names",
                "give a DNS name in the SuperLink certificate's SANs, e.g. localhost (init_pki always adds it)",
            )

    @property
    def conf_path(self) -> Path:
        return Path(self.work).absolute() / "nginx.conf"

    @property
    def pid_path(self) -> Path:
        return Path(self.work).absolute() / "nginx.pid"

    @property
    def logs_dir(self) -> Path:
        return Path(self.work).absolute() / "logs"

    @property
    def temp_dir(self) -> Path:
        return Path(self.work).absolute() / "temp"


def _config_error(message: str, hint: str, reason: str = "bad-proxy-config") -> ConfigError:
    return ConfigError(message, hint=hint, reason=reason)


def _safe_token(value: str, what: str) -> str:
    """Refuse anything that could end a directive or inject one into nginx.conf."""
    if not value or any(ch in _UNSAFE_CONF_CHARS or ch.isspace() for ch in value):
        raise _config_error(f"the proxy's {what} {value!r} cannot go into nginx.conf", f"give a plain {what}")
    return value


def _conf_path(path: Path, what: str) -> str:
    """An absolute path, quoted for nginx.conf; characters nginx would interpret are refused."""
    text = str(Path(path).absolute())
    if any(ch in _UNSAFE_CONF_CHARS for ch in text):
        raise _config_error(
            f"the {what} path {text!r} has a character nginx.conf cannot hold (quote, $, ;, braces, #)",
            f"move the {what} to a path without those characters",
            reason="bad-proxy-path",
        )
    return f'"{text}"'


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _host_port(host: str, port: int) -> str:
    """``host:port`` with IPv6 literals bracketed (once), as nginx's listen and server directives want."""
    host = host.strip("[]")
    try:
        if ipaddress.ip_address(host).version == 6:
            return f"[{host}]:{port}"
    except ValueError:
        pass
    return f"{host}:{port}"


# --------------------------------------------------------------------------- nginx.conf


def render_nginx_conf(cfg: FleetProxyConfig) -> str:
    """The whole nginx.conf for ``cfg``: self-contained, every path inside the work dir."""
    return "\n".join([*_main_block(cfg), *_http_block(cfg), ""])


def _main_block(cfg: FleetProxyConfig) -> list[str]:
    lines = [
        "# Written by xkt (server/fleet_proxy.py) on every start; edits are overwritten.",
        "daemon off;",
        "master_process on;",
        "worker_processes 1;",
    ]
    if os.geteuid() == 0:
        user, group = worker_user()
        lines.append(f"user {user} {group};")
    lines += [
        f"pid {_conf_path(cfg.pid_path, 'pid file')};",
        f"lock_file {_conf_path(cfg.work / 'nginx.lock', 'lock file')};",
        f"error_log {_conf_path(cfg.logs_dir / 'error.log', 'error log')} warn;",
        "events { worker_connections 512; }",
    ]
    return lines


def worker_user() -> tuple[str, str]:
    """``("nobody", <nobody's primary group>)``: who nginx's workers run as when started by root."""
    try:
        entry = pwd.getpwnam("nobody")
    except KeyError:
        raise _config_error(
            "there is no user 'nobody' for nginx's worker processes",
            "create it (useradd --system nobody) or run the proxy as an unprivileged user",
            reason="no-worker-user",
        ) from None
    try:
        group = grp.getgrgid(entry.pw_gid).gr_name
    except KeyError:
        group = "nogroup"
    return entry.pw_name, group


def _http_block(cfg: FleetProxyConfig) -> list[str]:
    temp = cfg.temp_dir
    return [
        "http {",
        "    server_tokens off;",
        "    default_type application/octet-stream;",
        "    log_format xkt '$remote_addr [$time_iso8601] \"$request\" $status $body_bytes_sent '",
        "                   '$request_time upstream=$upstream_status';",
        f"    access_log {_conf_path(cfg.logs_dir / 'access.log', 'access log')} xkt;",
        *(f"    {kind}_temp_path {_conf_path(temp / kind, 'temp')};" for kind in _TEMP_KINDS),
        f"    client_max_body_size {cfg.max_body_mib}m;",
        f"    client_header_timeout {cfg.timeout_s}s;",
        f"    client_body_timeout {cfg.timeout_s}s;",
        f"    send_timeout {cfg.timeout_s}s;",
        "    keepalive_timeout 65s;",
        "    upstream superlink {",
        f"        server {_host_port(cfg.upstream_host, cfg.upstream_port)};",
        "        keepalive 8;",
        f"        keepalive_timeout {UPSTREAM_KEEPALIVE_S}s;",
        "    }",
        *_server_block(cfg),
        "}",
    ]


def _server_block(cfg: FleetProxyConfig) -> list[str]:
    return [
        "    server {",
        f"        listen {_host_port(cfg.listen_host, cfg.listen_port)} ssl;",
        f"        ssl_certificate {_conf_path(cfg.tls_cert, 'TLS certificate')};",
        f"        ssl_certificate_key {_conf_path(cfg.tls_key, 'TLS key')};",
        "        ssl_protocols TLSv1.2 TLSv1.3;",
        "        ssl_session_cache shared:xkt_tls:1m;",
        "        ssl_session_tickets off;",
        *(f"        {line}" for line in _upstream_directives(cfg)),
        "        error_page 403 @refused;",
        f'        location @refused {{ default_type text/plain; return 403 "{REFUSAL}\\n"; }}',
        "        location /v1/fleet/ {",
        f'            if ($request_uri !~ "{_FLEET_URI}") {{ return 403; }}',
        "            limit_except POST { deny all; }",
        "            proxy_pass https://superlink;",
        "        }",
        "        location = /health {",
        "            limit_except GET { deny all; }",
        "            proxy_pass https://superlink;",
        "        }",
        "        location / { return 403; }",
        "    }",
    ]


def _upstream_directives(cfg: FleetProxyConfig) -> list[str]:
    """How nginx talks to the SuperLink: HTTP/1.1 keep-alive over TLS verified with the owner's CA."""
    return [
        "proxy_http_version 1.1;",
        'proxy_set_header Connection "";',
        "proxy_set_header Host $host;",
        "proxy_set_header X-Forwarded-For $remote_addr;",
        "proxy_set_header X-Forwarded-Proto https;",
        "proxy_request_buffering off;",
        "proxy_buffering off;",
        "proxy_connect_timeout 10s;",
        f"proxy_send_timeout {cfg.timeout_s}s;",
        f"proxy_read_timeout {cfg.timeout_s}s;",
        "proxy_ssl_protocols TLSv1.2 TLSv1.3;",
        "proxy_ssl_verify on;",
        "proxy_ssl_verify_depth 2;",
        f"proxy_ssl_trusted_certificate {_conf_path(cfg.upstream_ca, 'SuperLink CA')};",
        f"proxy_ssl_name {cfg.upstream_tls_name};",
        "proxy_ssl_server_name on;",
        "proxy_ssl_session_reuse on;",
    ]


# --------------------------------------------------------------------------- the process


def find_nginx(name: str = "nginx") -> str:
    """The nginx executable on PATH (or ``name`` itself if it is a path), else ConfigError missing-nginx."""
    found = shutil.which(name)
    if found is not None:
        return found
    hint = _NGINX_MISSING_HINT
    off_path = [d for d in _SBIN_DIRS if os.sep not in name and os.access(Path(d) / name, os.X_OK)]
    if off_path:  # Debian puts nginx in /usr/sbin, which ordinary users' PATH lacks
        hint += f"; or, since {Path(off_path[0]) / name} exists, add {off_path[0]} to PATH"
    raise ConfigError(
        f"nginx ({name}) was not found on PATH; the fleet proxy needs it", hint=hint, reason="missing-nginx"
    )


def _nginx_args(nginx: str, cfg: FleetProxyConfig) -> list[str]:
    """``-e stderr`` so nginx never opens its compiled-in /var/log path before reading our conf."""
    return [nginx, "-e", "stderr", "-p", f"{Path(cfg.work).absolute()}/", "-c", str(cfg.conf_path)]


def write_conf(cfg: FleetProxyConfig) -> Path:
    """Create the work dir layout and write nginx.conf atomically; return its path."""
    work = Path(cfg.work).absolute()
    work.mkdir(parents=True, exist_ok=True, mode=0o755)
    cfg.logs_dir.mkdir(exist_ok=True, mode=0o750)
    cfg.temp_dir.mkdir(exist_ok=True, mode=0o755)  # workers (maybe nobody) must traverse it to their temp dirs
    replace_file(cfg.conf_path, render_nginx_conf(cfg).encode(), mode=0o644)
    return cfg.conf_path


def check_conf(nginx: str, cfg: FleetProxyConfig) -> None:
    """``nginx -t`` on the written conf; a refusal becomes one ConfigError naming nginx's first error."""
    try:
        done = subprocess.run(
            [*_nginx_args(nginx, cfg), "-t", "-q"], capture_output=True, text=True, timeout=30, check=False
        )
    except subprocess.TimeoutExpired:
        raise _config_error(f"`nginx -t` on {cfg.conf_path} did not finish in 30 s", "run it by hand") from None
    if done.returncode != 0:
        raise ConfigError(
            f"nginx refused the proxy configuration {cfg.conf_path}: {first_error(done.stderr + done.stdout)}",
            hint="fix what nginx names (a certificate/key mismatch, an unreadable file, a bad address)",
            reason="bad-nginx-config",
        )


def first_error(output: str) -> str:
    """nginx's first ``[emerg]``/``[alert]``/``[crit]`` line (else its first line), from the level on.

    ``nginx: 2026/01/02 10:00:00 [emerg] 123#123: bind() ... failed`` becomes
    ``[emerg] bind() ... failed``: the date and process ids say nothing to the reader.
    """
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    serious = [m for m in map(_SERIOUS_LINE.search, lines) if m is not None]
    if serious:
        return f"[{serious[0]['level']}] {serious[0]['text']}"
    return (lines or ["no message"])[0].removeprefix("nginx: ")


def _expected_der(cfg: FleetProxyConfig) -> bytes:
    """The DER of the certificate the proxy must present (also a clear early check of the file)."""
    return load_cert(cfg.tls_cert).public_bytes(serialization.Encoding.DER)


def _probe_host(listen_host: str) -> str:
    """Where to connect to reach a wildcard listener from this machine."""
    host = listen_host.strip("[]")
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "*": "127.0.0.1"}.get(host, host)


def presents_cert(host: str, port: int, expected_der: bytes, timeout_s: float = 1.0) -> bool:
    """True once ``host:port`` completes a TLS handshake presenting exactly ``expected_der``.

    Comparing the certificate (not just "something answers") means a stranger already
    bound to the port is never mistaken for our nginx.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # identity is checked by comparing the exact certificate below
    try:
        with (
            socket.create_connection((host, port), timeout=timeout_s) as raw,
            context.wrap_socket(raw, server_hostname=None) as tls,
        ):
            return tls.getpeercert(binary_form=True) == expected_der
    except (OSError, ssl.SSLError):
        return False


class FleetProxy:
    """nginx in front of the SuperLink for the life of a ``with`` block (or between start and stop).

    ``start`` writes the conf atomically, runs ``nginx -t``, starts nginx as a child in its
    own process group and returns once the public port presents the configured
    certificate; ``stop`` asks for a graceful exit (SIGQUIT), then SIGTERM, then SIGKILL of
    the group it created, always by its own PID.
    """

    def __init__(self, cfg: FleetProxyConfig) -> None:
        self.cfg = cfg
        self._proc: subprocess.Popen[bytes] | None = None
        self._live: FleetProxyConfig | None = None  # cfg with the port actually served
        self._error_log_start = 0

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def port(self) -> int:
        """The public port being served (``cfg.listen_port``, or the free one chosen for 0)."""
        if self._live is None:
            raise RuntimeError("the fleet proxy is not running")
        return self._live.listen_port

    @property
    def address(self) -> str:
        """``host:port`` of the public side, as configured (a wildcard host stays a wildcard)."""
        return _host_port(self.cfg.listen_host, self.port)

    @property
    def stderr_path(self) -> Path:
        return self.cfg.logs_dir / "nginx.stderr"

    def __enter__(self) -> FleetProxy:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Check the files, then serve; with port 0, a port taken between choosing and binding is retried."""
        if self._proc is not None:
            raise RuntimeError("the fleet proxy is already running")
        nginx = find_nginx(self.cfg.nginx)
        expected = _expected_der(self.cfg)
        check_key_permissions(self.cfg.tls_key)
        load_cert(self.cfg.upstream_ca)
        attempts = _FREE_PORT_ATTEMPTS if self.cfg.listen_port == 0 else 1
        for attempt in range(attempts):
            port = self.cfg.listen_port or free_port(
                _probe_host("*") if self.cfg.listen_host == "*" else self.cfg.listen_host
            )
            try:
                self._start_on(nginx, replace(self.cfg, listen_port=port), expected)
                return
            except TransportError as exc:
                if attempt + 1 == attempts or "in use" not in exc.message:
                    raise

    def _start_on(self, nginx: str, live: FleetProxyConfig, expected_der: bytes) -> None:
        write_conf(live)
        check_conf(nginx, live)
        error_log = live.logs_dir / "error.log"
        self._error_log_start = error_log.stat().st_size if error_log.exists() else 0  # report only this start's lines
        with self.stderr_path.open("wb") as err:
            self._proc = subprocess.Popen(
                _nginx_args(nginx, live),
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                start_new_session=True,
                preexec_fn=die_with_parent,  # nginx stops with the command that started it, even on SIGKILL
            )
        self._live = live
        try:
            self._wait_until_serving(self._proc, live, expected_der)
        except BaseException:
            self.stop()
            raise

    def _wait_until_serving(self, proc: subprocess.Popen[bytes], live: FleetProxyConfig, expected_der: bytes) -> None:
        host, port = _probe_host(live.listen_host), live.listen_port
        deadline = time.monotonic() + live.start_timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise TransportError(
                    f"nginx exited with status {proc.returncode} while starting: {self._startup_error()}",
                    hint=f"fix what nginx names (often: the port is in use); its logs are in {live.logs_dir}",
                    reason="proxy-start-failed",
                )
            if presents_cert(host, port, expected_der):
                return
            time.sleep(0.05)
        raise TransportError(
            f"the fleet proxy did not serve TLS on {_host_port(host, port)} within {live.start_timeout_s} s",
            hint=f"check that nothing else holds the port and read {live.logs_dir / 'error.log'}",
            reason="proxy-start-timeout",
        )

    def _startup_error(self) -> str:
        """nginx's first serious line of this start: its stderr (fresh each start), then the new error.log lines."""
        texts = []
        with contextlib.suppress(OSError):
            texts.append(self.stderr_path.read_text(errors="replace"))
        with contextlib.suppress(OSError), (self.cfg.logs_dir / "error.log").open("rb") as log:
            log.seek(self._error_log_start)
            texts.append(log.read().decode(errors="replace"))
        return first_error("\n".join(texts))

    def stop(self) -> None:
        """Graceful (SIGQUIT), then fast (SIGTERM), then SIGKILL of nginx's own process group."""
        proc, self._proc, self._live = self._proc, None, None
        if proc is None:
            return
        for sig, wait_s in ((signal.SIGQUIT, self.cfg.stop_timeout_s), (signal.SIGTERM, 5.0)):
            if proc.poll() is not None:
                return
            proc.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=wait_s)
        if proc.poll() is None:  # still alive, so unreaped: the group id is certainly still ours
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
