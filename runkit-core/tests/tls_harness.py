"""Real certificates for the TLS tests: CAs, issued and self-signed, any validity window.

Imported by ``test_transport`` and ``test_engine_cluster`` (through ``sys.path``:
with importlib mode test modules are not importable by name).
"""

from __future__ import annotations

import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

Issuer = tuple[x509.Certificate, ec.EllipticCurvePrivateKey]


def issue(
    tmp: Path,
    name: str,
    issuer: Issuer | None,
    *,
    valid_from: datetime.timedelta = datetime.timedelta(minutes=-1),
    valid_to: datetime.timedelta = datetime.timedelta(days=1),
    usages: list[x509.ObjectIdentifier] | None = None,
) -> tuple[Path, Path]:
    """Write a P-256 key and a certificate for *name* (a CA when *issuer* is None).

    The certificate is valid from *valid_from* to *valid_to* relative to now;
    with *usages*, it names them as its extended key usage.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer[0].subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + valid_from)
        .not_valid_after(now + valid_to)
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if issuer is None:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    if usages is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    cert = builder.sign(issuer[1] if issuer else key, hashes.SHA256())
    cert_file, key_file = tmp / f"{name}.pem", tmp / f"{name}.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


def load_issuer(cert_file: Path, key_file: Path) -> Issuer:
    """The CA written by ``issue(tmp, name, None)``, to issue certificates with."""
    key = serialization.load_pem_private_key(key_file.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return x509.load_pem_x509_certificate(cert_file.read_bytes()), key
