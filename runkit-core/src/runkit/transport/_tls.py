"""Node identities (certificate + key) and the TLS contexts built from them.

Two trust models:

* **Fingerprints** (no CA, the default): each node makes a self-signed
  certificate at start and publishes its SHA-256 fingerprint in its heartbeat.
  The standard library's ``ssl`` has no verification callback, so a server that
  asks for a client certificate must chain-verify it and would refuse every
  self-signed one. The server therefore does not ask at the TLS layer; the
  client sends its certificate in ``Hello`` with a signature over this TLS
  session's channel binding and the server's fingerprint (``sign_proof``),
  which the server checks before consulting its authenticator. The client sees
  the server's certificate in the handshake and checks its fingerprint.
* **Operator CA**: both sides present certificates at the TLS layer and both
  chains must verify against the CA (``CERT_REQUIRED``).

Both use TLS 1.3 only. An operator's certificate outside its validity window
is refused at load (``TlsIdentity.load``), naming the file and the dates. In
fingerprint mode nothing verifies a chain, so nothing in OpenSSL checks a
peer's dates either: both sides check them after the handshake
(``peer_certificate_problem``), or pinning a fingerprint would keep an expired
certificate working.
"""

from __future__ import annotations

import datetime
import hashlib
import ssl
import tempfile
from pathlib import Path

import anyio
import attrs
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from runkit._errors import ConfigurationError

__all__ = [
    "CLOCK_SKEW",
    "TlsIdentity",
    "certificate_fingerprint",
    "client_context",
    "handshake_failure",
    "handshake_untrusted",
    "peer_certificate_problem",
    "server_context",
    "sign_proof",
    "validity_problem",
    "verify_proof",
]

# Peers refuse a certificate outside its validity window, so a self-signed one
# must outlast any run of its node (a new one is made at every start). Its
# dates protect nothing: it is trusted by the fingerprint in the node's
# heartbeat, which expires seconds after the node stops. Ten years, not a
# renewal while running, is the simplest lifetime that is always long enough.
_SELF_SIGNED_VALIDITY = datetime.timedelta(days=3650)
# Tolerate peers whose clocks run a little behind ours.
_BACKDATE = datetime.timedelta(minutes=5)
#: How far a certificate's validity window is stretched either side before
#: it is refused: clocks differ by this much, as the backdate allows for.
CLOCK_SKEW = _BACKDATE
_PROOF_LABEL = b"runkit-transport/1 client proof\x00"


def certificate_fingerprint(der: bytes) -> str:
    """Return the fingerprint of a DER certificate: SHA-256, lowercase hex."""
    return hashlib.sha256(der).hexdigest()


def _der(cert_pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)


@attrs.frozen
class TlsIdentity:
    """A node's certificate and private key, plus the operator's CA if any.

    Build one with :meth:`self_signed` or :meth:`load`. Construction validates
    the PEM data and that the key belongs to the certificate; :meth:`load` also
    checks that the certificate is valid now.
    """

    cert_pem: bytes
    key_pem: bytes = attrs.field(repr=False)
    ca_pem: bytes | None = None
    fingerprint: str = attrs.field(init=False)

    @fingerprint.default
    def _fingerprint(self) -> str:
        problems = _check_identity(
            self.cert_pem, self.key_pem, self.ca_pem, cert_name="certificate"
        )
        if problems:
            raise ConfigurationError("invalid TLS identity", problems)
        return certificate_fingerprint(_der(self.cert_pem))

    @property
    def cert_der(self) -> bytes:
        """The certificate in DER (whatever text its PEM file has around it)."""
        return _der(self.cert_pem)

    @property
    def subject(self) -> str:
        """The certificate's subject, as an RFC 4514 string (``CN=node-1``)."""
        return _subject(x509.load_pem_x509_certificate(self.cert_pem))

    @property
    def not_valid_after(self) -> datetime.datetime:
        """When the certificate expires (UTC)."""
        return x509.load_pem_x509_certificate(self.cert_pem).not_valid_after_utc

    @classmethod
    def self_signed(cls, common_name: str) -> TlsIdentity:
        """Make a fresh EC P-256 key and a self-signed certificate valid for ten years.

        The certificate names *common_name* (the node ID) as its subject and as
        a ``urn:runkit:node:`` URI in its subject alternative names.
        """
        key = ec.generate_private_key(ec.SECP256R1())
        # X.509 limits a common name to 64 characters; the SAN has the full ID.
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64] or "node")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + _SELF_SIGNED_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(f"urn:runkit:node:{common_name}")]
                ),
                critical=False,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .sign(key, hashes.SHA256())
        )
        return cls(
            cert_pem=cert.public_bytes(serialization.Encoding.PEM),
            key_pem=key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )

    @classmethod
    def load(cls, cert: str | Path, key: str | Path, ca: str | Path | None = None) -> TlsIdentity:
        """Load an operator-provided certificate, private key and optional CA (PEM files).

        With *ca*, peers are trusted when their certificate chains to it;
        without, by fingerprint as with self-signed identities.

        :raises ConfigurationError: listing every file that is missing,
            unreadable or not valid PEM, a certificate that has expired or is
            not valid yet (beyond ``CLOCK_SKEW``), and a key that does not
            match the certificate.
        """
        problems: list[str] = []
        cert_pem = _read(cert, "certificate", problems)
        key_pem = _read(key, "private key", problems)
        ca_pem = _read(ca, "CA certificate", problems) if ca is not None else None
        if not problems:
            assert cert_pem is not None
            assert key_pem is not None
            problems = _check_identity(
                cert_pem,
                key_pem,
                ca_pem,
                cert_name=str(cert),
                key_name=str(key),
                ca_name=str(ca),
                at=datetime.datetime.now(datetime.UTC),
            )
        if problems:
            raise ConfigurationError("cannot load the node's TLS identity", problems)
        assert cert_pem is not None
        assert key_pem is not None
        return cls(cert_pem=cert_pem, key_pem=key_pem, ca_pem=ca_pem)


def validity_problem(cert: x509.Certificate, at: datetime.datetime) -> str | None:
    """Say how *cert* is outside its validity window at *at*, or return ``None``.

    The window is stretched by ``CLOCK_SKEW`` either side. The answer reads
    ``has expired: valid from ... to ... UTC (now ...)`` or ``is not valid
    yet: ...``.
    """
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    if at < start - CLOCK_SKEW:
        state = "is not valid yet"
    elif at > end + CLOCK_SKEW:
        state = "has expired"
    else:
        return None
    return f"{state}: valid from {_utc(start)} to {_utc(end)} (now {_utc(at)})"


def peer_certificate_problem(der: bytes) -> str | None:
    """Say how a peer's certificate (DER) is outside its validity window now, or ``None``.

    The answer reads ``certificate CN=node-2 has expired: valid from ... to ...
    UTC (now ...)``. ``CLOCK_SKEW`` is allowed either side.
    """
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError:
        return "the certificate is not valid DER"
    problem = validity_problem(cert, datetime.datetime.now(datetime.UTC))
    return None if problem is None else f"certificate {_subject(cert)} {problem}"


#: What to do when peers do not trust each other's certificates.
_ONE_TRUST_MODEL = (
    "give every node and client the same DOGMA_TLS_CA and a certificate it issued, "
    "or none of them a CA (self-signed, trusted by fingerprint)"
)


def handshake_untrusted(exc: BaseException) -> bool:
    """Whether a TLS handshake that failed with *exc* failed over a certificate's trust.

    A certificate that did not verify, or a peer that hung up or sent an alert
    (how a peer refuses this node's certificate).
    """
    if isinstance(
        exc, ssl.SSLCertVerificationError | anyio.EndOfStream | anyio.BrokenResourceError
    ):
        return True
    reason = _ssl_reason(exc)
    return reason is not None and "ALERT" in reason


def _ssl_reason(exc: BaseException) -> str | None:
    """OpenSSL's reason code for an ``ssl.SSLError`` (``SSLV3_ALERT_BAD_CERTIFICATE``), if any."""
    reason = getattr(exc, "reason", None) if isinstance(exc, ssl.SSLError) else None
    return reason if isinstance(reason, str) else None


def handshake_failure(exc: BaseException, *, ca: bool) -> str:
    """Say, for an operator, why a TLS handshake failed with *exc*.

    *ca* tells whether this end verifies peers against an operator's CA. A
    peer that refuses our certificate just closes the connection (or sends an
    alert), which OpenSSL reports with no text at all: the answer says what
    that usually means.
    """
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (
            f"the peer's certificate does not verify against this node's CA "
            f"({exc.verify_message}): it was issued by another CA, or the peer has no CA "
            f"and made a self-signed one; {_ONE_TRUST_MODEL}"
        )
    if handshake_untrusted(exc):
        reason = _ssl_reason(exc)
        detail = reason.lower().replace("_", " ") if reason is not None else "no reason given"
        why = (
            "this node's certificate (a peer without this node's CA does not)"
            if ca
            else "this node's self-signed certificate (a peer with a CA does not)"
        )
        return (
            f"the peer closed the connection ({detail}): it probably does not trust "
            f"{why}; {_ONE_TRUST_MODEL}"
        )
    return str(exc) or repr(exc)


def _utc(moment: datetime.datetime) -> str:
    return f"{moment.astimezone(datetime.UTC):%Y-%m-%d %H:%M:%S} UTC"


def _subject(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string() or "no subject"


def _read(path: str | Path, what: str, problems: list[str]) -> bytes | None:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        problems.append(f"TLS {what} file {path} does not exist")
    except IsADirectoryError:
        problems.append(f"TLS {what} file {path} is a directory, not a PEM file")
    except OSError as exc:
        problems.append(f"cannot read TLS {what} file {path}: {exc.strerror or exc}")
    return None


def _check_identity(
    cert_pem: bytes,
    key_pem: bytes,
    ca_pem: bytes | None,
    *,
    cert_name: str,
    key_name: str = "private key",
    ca_name: str = "CA certificate",
    at: datetime.datetime | None = None,
) -> list[str]:
    """Every problem with the identity; with *at*, also its certificate's dates then."""
    problems: list[str] = []
    cert: x509.Certificate | None = None
    key: object = None
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        problems.append(f"{cert_name} is not a PEM certificate (expected BEGIN CERTIFICATE)")
    else:
        # Checked here, not left to peers: trusted by fingerprint, an expired
        # certificate would otherwise go unnoticed; with a CA, OpenSSL's
        # refusal below names neither the subject nor the dates.
        outside = None if at is None else validity_problem(cert, at)
        if outside is not None:
            problems.append(
                f"the certificate in {cert_name} ({_subject(cert)}) {outside}; "
                "use a certificate valid now"
            )
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        problems.append(f"{key_name} is encrypted; provide an unencrypted PEM private key")
    except (ValueError, UnsupportedAlgorithm):
        problems.append(f"{key_name} is not a PEM private key (expected BEGIN PRIVATE KEY)")
    if ca_pem is not None:
        try:
            x509.load_pem_x509_certificates(ca_pem)
        except ValueError:
            problems.append(f"{ca_name} is not a PEM certificate (expected BEGIN CERTIFICATE)")
    if cert is not None and key is not None:
        if not isinstance(
            key,
            ec.EllipticCurvePrivateKey
            | rsa.RSAPrivateKey
            | ed25519.Ed25519PrivateKey
            | ed448.Ed448PrivateKey,
        ):
            problems.append(f"{key_name} is a {type(key).__name__}; use an EC, RSA or Ed25519 key")
        elif key.public_key() != cert.public_key():
            problems.append(f"{key_name} does not match the certificate in {cert_name}")
        elif ca_pem is not None and not problems:
            refusal = _peer_refusal(cert_pem, key_pem, ca_pem)
            if refusal is not None:
                advice = (
                    # Issued by the CA, but for one side of TLS only.
                    "its extended key usage must allow both serverAuth and clientAuth, "
                    "since a node is a TLS server and a TLS client of its peers"
                    if "purpose" in refusal
                    else "use a certificate the CA issued, or the CA that issued it"
                )
                problems.append(
                    f"the certificate in {cert_name} does not verify against {ca_name} "
                    f"({refusal}): peers trusting that CA would refuse this node; {advice}"
                )
    return problems


def _peer_refusal(cert_pem: bytes, key_pem: bytes, ca_pem: bytes) -> str | None:
    """Why a peer with the same CA would refuse this certificate, or ``None``.

    Runs a TLS handshake in memory between a server and a client that both use
    it, so OpenSSL checks exactly what it checks on a real connection (chain,
    validity dates, key usage) and the node fails at start, not on every call.
    """
    server = _make_context(cert_pem, key_pem, ca_pem, server=True)
    client = _make_context(cert_pem, key_pem, ca_pem, server=False)
    wires = [(ssl.MemoryBIO(), ssl.MemoryBIO()) for _ in range(2)]
    ends = [
        server.wrap_bio(wires[0][0], wires[0][1], server_side=True),
        client.wrap_bio(wires[1][0], wires[1][1], server_side=False),
    ]
    done = [False, False]
    for _ in range(10):  # TLS 1.3 needs two round trips; more means something is wrong
        for i, end in enumerate(ends):
            try:
                end.do_handshake()
                done[i] = True
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLCertVerificationError as exc:
                return str(exc.verify_message)
            except ssl.SSLError as exc:
                return str(exc.reason or exc)
            # Carry what this end wrote to the other end.
            wires[1 - i][0].write(wires[i][1].read())
        if all(done):  # each end verified the other's certificate
            return None
    return "the TLS handshake did not complete"


def _make_context(
    cert_pem: bytes, key_pem: bytes, ca_pem: bytes | None, *, server: bool
) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    # Peers are addressed by IP and trusted by fingerprint or CA, not by name.
    ctx.check_hostname = False
    # load_cert_chain only reads files; the directory is private and short-lived.
    with tempfile.TemporaryDirectory(prefix="runkit-tls-") as tmp:
        cert_file, key_file = Path(tmp, "cert.pem"), Path(tmp, "key.pem")
        key_file.touch(mode=0o600)
        key_file.write_bytes(key_pem)
        cert_file.write_bytes(cert_pem)
        ctx.load_cert_chain(cert_file, key_file)
    if ca_pem is not None:
        # Only the certificates: a bundle's comments (certifi's name issuers in
        # UTF-8) are not ASCII, which cadata= requires of PEM text.
        ctx.load_verify_locations(cadata=_certificates_der(ca_pem))
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:
        # Fingerprint mode: the peer is checked after the handshake (see module doc).
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _certificates_der(pem: bytes) -> bytes:
    """The certificates of a PEM bundle, as concatenated DER (text around them dropped)."""
    return b"".join(
        cert.public_bytes(serialization.Encoding.DER)
        for cert in x509.load_pem_x509_certificates(pem)
    )


def server_context(identity: TlsIdentity) -> ssl.SSLContext:
    """Return the listening side's TLS 1.3 context for *identity*."""
    return _make_context(identity.cert_pem, identity.key_pem, identity.ca_pem, server=True)


def client_context(identity: TlsIdentity) -> ssl.SSLContext:
    """Return the connecting side's TLS 1.3 context (it always presents its certificate)."""
    return _make_context(identity.cert_pem, identity.key_pem, identity.ca_pem, server=False)


def _proof_message(channel_binding: bytes, server_fingerprint: str) -> bytes:
    return _PROOF_LABEL + channel_binding + server_fingerprint.encode("ascii")


def sign_proof(identity: TlsIdentity, channel_binding: bytes, server_fingerprint: str) -> bytes:
    """Sign this TLS session's *channel_binding* and the server's fingerprint.

    Binding both means a proof cannot be replayed on another connection, nor
    relayed by one server to another.
    """
    key = serialization.load_pem_private_key(identity.key_pem, password=None)
    message = _proof_message(channel_binding, server_fingerprint)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(message, ec.ECDSA(hashes.SHA256()))
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(message, _pss(), hashes.SHA256())
    if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        return key.sign(message)
    raise TypeError(f"unsupported key type {type(key).__name__}")


def verify_proof(
    cert_der: bytes, proof: bytes, channel_binding: bytes, server_fingerprint: str
) -> bool:
    """Return whether *proof* was made by the key of *cert_der* for this session."""
    message = _proof_message(channel_binding, server_fingerprint)
    try:
        public = x509.load_der_x509_certificate(cert_der).public_key()
        if isinstance(public, ec.EllipticCurvePublicKey):
            public.verify(proof, message, ec.ECDSA(hashes.SHA256()))
        elif isinstance(public, rsa.RSAPublicKey):
            public.verify(proof, message, _pss(), hashes.SHA256())
        elif isinstance(public, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
            public.verify(proof, message)
        else:
            return False
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def _pss() -> padding.PSS:
    return padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.DIGEST_LENGTH)
