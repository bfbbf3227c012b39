"""Every TLS misconfiguration is refused, and the refusal names its cause.

One table, one row per way a site and an owner's server can disagree about TLS: the
certificate of either side expired or not yet valid, a name or IP the server certificate
does not list, a CA the client does not trust, a client certificate from another CA, a
site certificate revoked with ``xkt-server provision revoke``, plaintext against TLS in
both directions, and keys too weak for xkt (RSA-1024: see ``xkt.shared.tls_checks`` for
what "weak" means).  Each row runs the real ``xkt-client fetch`` (in-process, ``--json``)
against a real server on 127.0.0.1 port 0 (``run_server``) and asserts three things: the
exit code, the error's ``reason`` slug, and words in the message that name the cause
("expired", "not yet valid", "does not match", "unknown CA", "revoked", "plaintext",
"weak key"), so a person reading one line knows what to fix.  Nothing is ever downloaded.

gRPC says little more than "handshake failed" for most of these; the client finds the
cause with a probe of its own (``xkt.client.tls_diagnosis``), and checks its own
certificate and key before connecting.  The server checks its certificate, key and
client CA when it starts (second table), so a bad certificate stops ``xkt-server serve``
with a message instead of failing every client; to show what a client says about a
server whose certificate went bad *while it ran*, those rows start the server with the
start-up check bypassed.  One cause has no client-side row: a server presenting a weak key.
gRPC's client accepts an RSA-1024 server certificate and gives Python no hook to inspect
it after the handshake, so that is enforced where the key is loaded: ``xkt-server serve``
refuses to start with it (second table).

Rows that test_fetch.py covered before (another CA's client certificate, an untrusted
server CA, a hostname mismatch, plaintext against TLS) moved here; test_fetch keeps the
wrong owner key, which is not TLS.  Runs in about 10 s.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from typer.testing import CliRunner

import xkt.server.serving as serving
from xkt.client.cli import app
from xkt.protos import source_model_pb2 as pb
from xkt.protos import source_model_pb2_grpc as pb_grpc
from xkt.server.provision import add_site, init_pki, revoke_site
from xkt.server.serving import ServeConfig, run_server
from xkt.shared.errors import ConfigError
from xkt.shared.grpc_options import client_options
from xkt.shared.models import ArchSpec

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from owner_fixtures import BIN, OwnerFiles, make_owner  # noqa: E402
from tls_fixtures import Issued  # noqa: E402

ARCH = ArchSpec("resnet_tiny", num_classes=4)  # the smallest model: nothing is downloaded anyway
pytestmark = pytest.mark.timeout(120)

NOW = dt.datetime.now(dt.UTC)
EXPIRED = (NOW - dt.timedelta(days=30), NOW - dt.timedelta(days=1))
NOT_YET_VALID = (NOW + dt.timedelta(days=1), NOW + dt.timedelta(days=30))


@dataclass(frozen=True)
class Cast:
    """The owner's files plus every bad certificate the rows need, all issued by the owner's CA."""

    owner: OwnerFiles
    expired_server: Issued
    future_server: Issued
    weak_server: Issued
    expired_site: Issued
    weak_site: Issued
    revoked_pki: Path  # a PKI made by `xkt-server provision`, whose site "clinic-7" was revoked
    revoked_kit: Path


def _weak_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=1024)


@pytest.fixture(scope="module")
def cast(tmp_path_factory: pytest.TempPathFactory) -> Cast:
    root = tmp_path_factory.mktemp("tls-matrix")
    owner = make_owner(root, arch=ARCH, class_names=list("abcd"))
    ca, server_names = owner.pki.ca, {"dns": ("localhost",), "ips": ("127.0.0.1",), "server": True}
    issued = {
        "expired_server": ca.issue("expired-server", "xkt-server", valid=EXPIRED, **server_names),  # type: ignore[arg-type]
        "future_server": ca.issue("future-server", "xkt-server", valid=NOT_YET_VALID, **server_names),  # type: ignore[arg-type]
        "weak_server": ca.issue("weak-server", "xkt-server", key=_weak_key(), **server_names),  # type: ignore[arg-type]
        "expired_site": ca.issue("expired-site", "site-a", valid=EXPIRED, server=False),
        "weak_site": ca.issue("weak-site", "site-a", key=_weak_key(), server=False),
    }
    for path in (root / "pki").glob("*.key"):
        path.chmod(0o600)
    pki = root / "product-pki"
    init_pki(pki)
    kit = add_site(pki, "clinic-7")
    revoke_site(pki, "clinic-7")
    return Cast(owner, **issued, revoked_pki=pki, revoked_kit=kit)


# ------------------------------------------------------------------ servers


ServerFor = Callable[[Cast], ServeConfig]


def tls_server(cast: Cast) -> ServeConfig:
    return cast.owner.serve_config()


def mtls_server(cast: Cast) -> ServeConfig:
    return cast.owner.serve_config(client_ca=cast.owner.pki.ca.cert_path, tokens=None)


def plaintext_server(cast: Cast) -> ServeConfig:
    return cast.owner.serve_config(insecure=True, tls_cert=None, tls_key=None)


def server_presenting(name: str) -> ServerFor:
    """A TLS server presenting ``cast.<name>`` (its start-up check bypassed: the certificate went bad later)."""

    def config(cast: Cast) -> ServeConfig:
        issued: Issued = getattr(cast, name)
        return cast.owner.serve_config(tls_cert=issued.cert_path, tls_key=issued.key_path)

    config.went_bad_while_running = True  # type: ignore[attr-defined]  # read by the `serve` fixture
    return config


def wrong_ip_server(cast: Cast) -> ServeConfig:
    """A certificate for elsewhere.example only, dialled at 127.0.0.1."""
    pki = cast.owner.pki
    return cast.owner.serve_config(tls_cert=pki.wrong_host_server.cert_path, tls_key=pki.wrong_host_server.key_path)


def revoking_server(cast: Cast) -> ServeConfig:
    """Mutual TLS with the product's own PKI and its revoked.json."""
    pki = cast.revoked_pki
    return cast.owner.serve_config(
        tls_cert=pki / "server.crt", tls_key=pki / "server.key", client_ca=pki / "ca.crt", pki=pki, tokens=None
    )


# ------------------------------------------------------------------ what the site passes


def token(cast: Cast) -> list[str]:
    """The usual site: trusts the owner's CA, presents its bearer token."""
    return ["--ca-cert", str(cast.owner.pki.ca.cert_path), "--token-file", str(cast.owner.token_file)]


def token_dialling_another_name(cast: Cast) -> list[str]:
    return [*token(cast), "--server-name", "elsewhere.example"]


def token_trusting_another_ca(cast: Cast) -> list[str]:
    return ["--ca-cert", str(cast.owner.pki.other_ca.cert_path), "--token-file", str(cast.owner.token_file)]


def token_trusting_a_weak_ca(cast: Cast) -> list[str]:
    """The CA file holds a certificate with an RSA-1024 key."""
    return ["--ca-cert", str(cast.weak_server.cert_path), "--token-file", str(cast.owner.token_file)]


def token_in_plaintext(cast: Cast) -> list[str]:
    return ["--insecure", "--token-file", str(cast.owner.token_file)]


def kit_of_revoked_site(cast: Cast) -> list[str]:
    return ["--kit", str(cast.revoked_kit)]


def site_cert(issued: Callable[[Cast], Issued]) -> Callable[[Cast], list[str]]:
    """Mutual TLS with the certificate and key ``issued`` picks."""

    def flags(cast: Cast) -> list[str]:
        site = issued(cast)
        ca = ["--ca-cert", str(cast.owner.pki.ca.cert_path)]
        return [*ca, "--client-cert", str(site.cert_path), "--client-key", str(site.key_path)]

    return flags


other_ca_site = site_cert(lambda cast: cast.owner.pki.impostor)
expired_site = site_cert(lambda cast: cast.expired_site)
weak_site = site_cert(lambda cast: cast.weak_site)


@dataclass(frozen=True)
class Row:
    """One misconfiguration: the server, the client's flags, and what the refusal must say."""

    case: str
    server: ServerFor
    client: Callable[[Cast], list[str]]
    exit_code: int
    reason: str
    names: tuple[str, ...]  # words the message must contain (any case)


EXPIRED_SERVER, FUTURE_SERVER = server_presenting("expired_server"), server_presenting("future_server")
ROWS = [
    Row("expired-server-cert", EXPIRED_SERVER, token, 5, "tls-server-cert-expired", ("expired",)),
    Row("not-yet-valid-server-cert", FUTURE_SERVER, token, 5, "tls-server-cert-not-yet-valid", ("not yet valid",)),
    Row("wrong-san-name", tls_server, token_dialling_another_name, 5, "tls-hostname-mismatch", ("does not match",)),
    Row("wrong-san-ip", wrong_ip_server, token, 5, "tls-hostname-mismatch", ("does not match", "127.0.0.1")),
    Row("untrusted-server-ca", tls_server, token_trusting_another_ca, 5, "tls-untrusted-server", ("unknown ca",)),
    Row("client-cert-from-another-ca", mtls_server, other_ca_site, 5, "tls-client-cert-refused", ("unknown ca",)),
    Row("expired-client-cert", mtls_server, expired_site, 3, "cert-expired", ("expired",)),
    Row("revoked-site", revoking_server, kit_of_revoked_site, 6, "certificate-revoked", ("revoked",)),
    Row("plaintext-client-vs-tls-server", tls_server, token_in_plaintext, 5, "tls-handshake-failed", ("plaintext",)),
    Row("tls-client-vs-plaintext-server", plaintext_server, token, 5, "tls-server-plaintext", ("plaintext",)),
    Row("weak-client-key", mtls_server, weak_site, 3, "weak-key", ("weak", "rsa-1024")),
    Row("weak-ca-key", tls_server, token_trusting_a_weak_ca, 3, "weak-key", ("weak key", "rsa-1024")),
]


@pytest.fixture
def serve(cast: Cast, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[ServerFor], int]]:
    """Start the row's server in-process; its port.  Bad certificates bypass the start-up check (see above)."""
    with contextlib.ExitStack() as servers:

        def start(server_for: ServerFor) -> int:
            if getattr(server_for, "went_bad_while_running", False):
                unchecked = lambda cert, key, **_: (cert.read_bytes(), key.read_bytes())  # noqa: E731
                monkeypatch.setattr(serving, "load_tls_identity", unchecked)
            return servers.enter_context(run_server(server_for(cast))).port

        yield start


def fetch_json(cast: Cast, port: int, flags: list[str], out: Path) -> tuple[int, dict[str, Any]]:
    args = ["fetch", "--server", f"127.0.0.1:{port}", "--owner-key", str(cast.owner.owner_pub), "--out", str(out)]
    result = CliRunner().invoke(app, [*args, *flags, "--json"])
    assert result.stdout.strip(), (result.exit_code, result.stderr, result.exception)
    return result.exit_code, json.loads(result.stdout)


@pytest.mark.parametrize("row", ROWS, ids=[row.case for row in ROWS])
def test_each_misconfiguration_is_refused_with_its_cause(
    cast: Cast, serve: Callable[[ServerFor], int], tmp_path: Path, row: Row
) -> None:
    port = serve(row.server)
    code, result = fetch_json(cast, port, row.client(cast), tmp_path / "cache")
    error = result.get("error", {})
    assert (code, error.get("reason")) == (row.exit_code, row.reason), result
    message = error["message"].lower()
    assert all(word in message for word in row.names), (row.names, error["message"])
    assert error["hint"], error
    assert not any((tmp_path / "cache").glob("*/weights.safetensors*")), "nothing may be downloaded"


# ------------------------------------------------------------------ the server refuses to start


def presenting(cert: Callable[[Cast], Issued], key: Callable[[Cast], Issued] | None = None) -> ServerFor:
    """The owner's TLS server with the certificate ``cert`` picks (and the key ``key`` picks, if given)."""

    def config(cast: Cast) -> ServeConfig:
        key_path = (key or cert)(cast).key_path
        return cast.owner.serve_config(tls_cert=cert(cast).cert_path, tls_key=key_path)

    return config


def trusting_an_expired_client_ca(cast: Cast) -> ServeConfig:
    """Mutual TLS whose client CA file holds an expired certificate."""
    return cast.owner.serve_config(client_ca=cast.expired_server.cert_path, tokens=None)


SERVER_ROWS = [  # case, server config, reason, words the message must contain
    ("expired-server-cert", presenting(lambda c: c.expired_server), "cert-expired", "expired on"),
    ("not-yet-valid-server-cert", presenting(lambda c: c.future_server), "cert-not-yet-valid", "not yet valid"),
    ("weak-server-key", presenting(lambda c: c.weak_server), "weak-key", "weak key: rsa-1024"),
    (
        "key-of-another-certificate",
        presenting(lambda c: c.owner.pki.server, lambda c: c.owner.pki.site),
        "key-cert-mismatch",
        "does not belong",
    ),  # fmt: skip
    ("expired-client-ca", trusting_an_expired_client_ca, "cert-expired", "client ca"),
]


@pytest.mark.parametrize(("case", "server", "reason", "words"), SERVER_ROWS, ids=[row[0] for row in SERVER_ROWS])
def test_server_refuses_to_start_with_a_bad_certificate_or_key(
    cast: Cast, case: str, server: Callable[[Cast], ServeConfig], reason: str, words: str
) -> None:
    with pytest.raises(ConfigError) as info, run_server(server(cast)):
        pytest.fail(f"the server started with {case}")
    assert info.value.reason == reason and words in info.value.message.lower(), info.value.message


def test_xkt_server_serve_exits_3_naming_the_expired_certificate(cast: Cast) -> None:
    owner = cast.owner
    args = [str(BIN / "xkt-server"), "serve", "--model", str(owner.model_dir), "--owner-key", str(owner.owner_pub)]
    args += ["--listen", "127.0.0.1:0", "--tokens", str(owner.tokens), "--json"]
    args += ["--tls-cert", str(cast.expired_server.cert_path), "--tls-key", str(cast.expired_server.key_path)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=60)
    error = json.loads(done.stdout)["error"]
    assert done.returncode == 3 and error["reason"] == "cert-expired", done.stdout + done.stderr
    assert "expired on" in error["message"] and str(cast.expired_server.cert_path) in error["message"]


# ------------------------------------------------------------------ the server's own refusal


def test_server_itself_refuses_an_expired_client_certificate(cast: Cast, serve: Callable[[ServerFor], int]) -> None:
    """The client's own check is a courtesy: a client that skips it is still refused by the server's handshake."""
    port = serve(mtls_server)
    owner = cast.owner
    credentials = grpc.ssl_channel_credentials(
        root_certificates=owner.pki.ca.cert, private_key=cast.expired_site.key, certificate_chain=cast.expired_site.cert
    )
    with (
        grpc.secure_channel(f"127.0.0.1:{port}", credentials, options=client_options()) as channel,
        pytest.raises(grpc.RpcError) as info,
    ):
        pb_grpc.SourceModelStub(channel).GetManifest(pb.GetManifestRequest(), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # the handshake failed: no RPC was served
