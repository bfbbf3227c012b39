"""The pure rules behind xkt's TLS refusals (``xkt.shared.tls_checks``): weak keys, dates, names, issuers.

The integration matrix (tests/integration/test_tls_matrix.py) shows each rule refusing a
real connection; here each rule is pinned on hand-made certificates, including the
edges: exactly 2048 bits, P-192, wildcards, IP literals, and the order in which a server
certificate's problems are reported (issuer before dates before names).
"""

from __future__ import annotations

import datetime as dt
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed25519, rsa

from xkt.shared.errors import ConfigError
from xkt.shared.tls_checks import (
    diagnose_client_certificate,
    diagnose_server_certificate,
    key_weakness,
    load_tls_identity,
    load_trust_anchors,
    name_matches,
    validity_problem,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tls_fixtures import make_ca  # noqa: E402

NOW = dt.datetime.now(dt.UTC)
DAY = dt.timedelta(days=1)


@pytest.mark.parametrize(
    ("key", "weak"),
    [
        (rsa.generate_private_key(65537, 1024), "RSA-1024"),
        (rsa.generate_private_key(65537, 2048), None),
        (ec.generate_private_key(ec.SECP192R1()), "secp192r1"),
        (ec.generate_private_key(ec.SECP256R1()), None),
        (ec.generate_private_key(ec.SECP384R1()), None),
        (ed25519.Ed25519PrivateKey.generate(), None),
        (dsa.generate_private_key(2048), "DSAPublicKey"),
    ],
    ids=["rsa-1024", "rsa-2048", "p-192", "p-256", "p-384", "ed25519", "dsa"],
)
def test_what_weak_means(key: object, weak: str | None) -> None:
    found = key_weakness(key.public_key())  # type: ignore[attr-defined]
    assert (found is None) if weak is None else (found is not None and weak in found), found


def test_names_dates_and_issuer(tmp_path: Path) -> None:
    ca, other = make_ca(tmp_path, "ca"), make_ca(tmp_path, "other")
    good = ca.issue("s", "s", dns=("owner.example", "*.sites.example"), ips=("10.0.0.1",), server=True)
    cert = x509.load_pem_x509_certificate(good.cert)
    assert name_matches(cert, "owner.example") and name_matches(cert, "OWNER.example.")
    assert name_matches(cert, "a.sites.example") and not name_matches(cert, "a.b.sites.example")
    assert name_matches(cert, "10.0.0.1") and not name_matches(cert, "10.0.0.2")
    assert not name_matches(cert, "elsewhere.example")
    assert validity_problem(cert) is None
    assert validity_problem(cert, NOW + 2 * DAY) is not None and validity_problem(cert, NOW + 2 * DAY)[0] == "expired"  # type: ignore[index]
    assert validity_problem(cert, NOW - DAY)[0] == "not-yet-valid"  # type: ignore[index]
    assert diagnose_server_certificate(cert, [ca.certificate], "owner.example") is None
    assert diagnose_server_certificate(cert, [other.certificate], "nowhere", NOW + 2 * DAY)[0] == "tls-untrusted-server"  # type: ignore[index]
    assert diagnose_server_certificate(cert, [ca.certificate], "nowhere", NOW + 2 * DAY)[0] == "tls-server-cert-expired"  # type: ignore[index]
    assert diagnose_server_certificate(cert, [ca.certificate], "nowhere")[0] == "tls-hostname-mismatch"  # type: ignore[index]
    assert "unknown CA" in (diagnose_client_certificate(cert, [other.certificate]) or "")
    assert diagnose_client_certificate(cert, [ca.certificate]) is None


def test_loading_refuses_expired_weak_and_mismatched(tmp_path: Path) -> None:
    ca = make_ca(tmp_path, "ca")
    expired = ca.issue("old", "old", server=False, valid=(NOW - 3 * DAY, NOW - DAY))
    weak = ca.issue("weak", "weak", server=False, key=rsa.generate_private_key(65537, 1024))
    good = ca.issue("good", "good", server=False)
    for issued in (expired, weak, good):
        issued.key_path.chmod(0o600)
    cases = [
        (lambda: load_tls_identity(expired.cert_path, expired.key_path, what="client certificate"), "cert-expired"),
        (lambda: load_tls_identity(weak.cert_path, weak.key_path, what="client certificate"), "weak-key"),
        (lambda: load_tls_identity(good.cert_path, weak.key_path, what="client certificate"), "weak-key"),
        (lambda: load_tls_identity(good.cert_path, expired.key_path, what="client certificate"), "key-cert-mismatch"),
        (lambda: load_trust_anchors(weak.cert_path), "weak-key"),
    ]
    for load, reason in cases:
        with pytest.raises(ConfigError) as info:
            load()
        assert info.value.reason == reason, (reason, info.value.message)
    chain, key = load_tls_identity(good.cert_path, good.key_path, what="client certificate")
    assert chain == good.cert and key == good.key
    good.key_path.chmod(0o644)
    with pytest.raises(ConfigError, match="accessible by other users"):
        load_tls_identity(good.cert_path, good.key_path, what="client certificate")
    assert load_tls_identity(good.cert_path, good.key_path, what="server certificate", private=False)[1] == good.key
