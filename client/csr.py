"""A site's own TLS key and certificate signing request (the CSR path of provisioning).

``xkt-client csr --site-id ID --out DIR`` writes ``DIR/site.key`` (ECDSA P-256, mode 0600
from creation) and ``DIR/site.csr``.  Only the CSR goes to the owner, who runs
``xkt-server provision sign-csr`` and sends back ``site.crt`` and ``ca.crt``; putting those
two next to ``site.key`` gives the same kit layout as ``provision add-site``, but the
private key never left the site.
"""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from xkt.shared.errors import ConfigError
from xkt.shared.files import write_new_file
from xkt.shared.tls import site_uri, validate_site_id

KEY_NAME = "site.key"
CSR_NAME = "site.csr"


def make_csr(site_id: str, out_dir: Path) -> tuple[Path, Path]:
    """Generate the site's key pair and a CSR naming ``site_id``; return (key path, CSR path).

    The CSR carries the id as CN and as the URI SAN the owner will issue; the owner
    ignores requested extensions anyway, so this is only a convenience for inspection.
    Existing files are never overwritten: replacing a key would orphan an issued cert.
    """
    validate_site_id(site_id)
    out_dir = Path(out_dir)
    key_path, csr_path = out_dir / KEY_NAME, out_dir / CSR_NAME
    for path in (key_path, csr_path):
        if path.exists() or path.is_symlink():
            raise ConfigError(
                f"refusing to overwrite the existing file {path}",
                hint="choose another --out folder, or move the old key and request away yourself",
                reason="file-exists",
            )
    out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, site_id)]))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(site_uri(site_id))]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_new_file(key_path, key_pem, mode=0o600)
    write_new_file(csr_path, csr.public_bytes(serialization.Encoding.PEM), mode=0o644)
    return key_path, csr_path
