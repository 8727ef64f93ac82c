"""TLS for the bus and the HTTP gateway: a local certificate authority for a laptop mesh, SSL
contexts from given files, and the rule that nothing listens beyond loopback unprotected.

``aimesh up --tls`` makes a CA and one server certificate (valid for ``localhost``, 127.0.0.1,
::1 and any host the mesh is told to listen on) under ``<data_dir>/tls``; the embedded
nats-server and the router present the certificate, every client trusts the CA.  With your own
PKI, point the settings at your files instead (``nats_tls_*``, ``[router] tls_cert/tls_key``).
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from shared.errors import ConfigError

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
_VALID_DAYS = 365
_RENEW_DAYS = 30  # a certificate this close to expiry is made anew at start


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(what: str, host: str, *, protected: bool, needs: str, override: bool, setting: str) -> None:
    """Refuse to listen beyond loopback without protection, unless explicitly overridden.

    ``protected`` says whether the listener authenticates (and encrypts, where ``needs`` asks it);
    the error names what is missing and the setting that overrides the refusal."""
    if is_loopback(host) or protected or override:
        return
    raise ConfigError(
        f"{what} would listen on {host} without {needs}: anyone who reaches that address could use it. "
        f"Configure {needs}, listen on 127.0.0.1, or set {setting} to accept the exposure"
    )


def check_http_exposure(section: str, host: str, *, has_keys: bool, insecure: bool) -> None:
    """An HTTP service of table ``[section]`` beyond loopback needs its API keys (or ``insecure``)."""
    check_exposure(
        f"the {section} service",
        host,
        protected=has_keys,
        needs=f"API keys ([{section}] api_keys)",
        override=insecure,
        setting=f"[{section}] insecure (AIMESH_{section.upper()}_INSECURE)",
    )


@dataclass(frozen=True)
class LocalPki:
    """The files of a local CA and the server certificate it signed."""

    directory: Path

    @property
    def ca(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.directory / "ca.key"

    @property
    def cert(self) -> Path:
        return self.directory / "server.pem"

    @property
    def key(self) -> Path:
        return self.directory / "server.key"


def ensure_local_pki(directory: Path, hosts: tuple[str, ...] = ()) -> LocalPki:
    """Make (or keep) a CA and a server certificate for ``localhost`` and ``hosts``.  Kept when
    present, valid for another 30 days and covering every host; else made anew."""
    pki = LocalPki(directory)
    names = tuple(dict.fromkeys((*LOOPBACK_NAMES, *hosts)))
    if all(p.is_file() for p in (pki.ca, pki.ca_key)) and certificate_covers(pki.cert, pki.key, names, pki.ca):
        return pki
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    make_ca(pki.ca, pki.ca_key, "aimesh local CA", days=_VALID_DAYS)
    issue_certificate(pki.ca, pki.ca_key, pki.cert, pki.key, names, common_name="aimesh")
    return pki


def make_ca(cert: Path, key: Path, common_name: str, *, days: int) -> None:
    """A self-signed CA that signs leaf certificates only (path length 0): its key 0600."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    ca_key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write_pair(cert, key, ca_cert, ca_key)


def issue_certificate(
    ca: Path, ca_key: Path, cert: Path, key: Path, names: tuple[str, ...], *, common_name: str, client: bool = False
) -> None:
    """A certificate for ``names`` (IP or DNS SANs) signed by the CA in ``ca``/``ca_key``, valid a
    year (never past the CA): for a server, and with ``client`` for a TLS client too (a NATS
    route's certificate is presented on both ends of the connection)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    try:
        issuer = x509.load_pem_x509_certificate(ca.read_bytes())
        signer = serialization.load_pem_private_key(ca_key.read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the CA {ca} / {ca_key}: {exc}") from None
    if not isinstance(signer, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{ca_key}: an EC private key was expected")
    now = datetime.datetime.now(datetime.UTC)
    until = min(now + datetime.timedelta(days=_VALID_DAYS), issuer.not_valid_after_utc)
    if until <= now:
        raise ConfigError(f"the CA {ca} expired on {issuer.not_valid_after_utc:%Y-%m-%d}: make a new one")
    usages = [ExtendedKeyUsageOID.SERVER_AUTH, *([ExtendedKeyUsageOID.CLIENT_AUTH] if client else [])]
    leaf_key = _new_key()
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(issuer.subject)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(until)
        .add_extension(x509.SubjectAlternativeName([_general_name(n) for n in names]), critical=False)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(signer, hashes.SHA256())
    )
    _write_pair(cert, key, leaf, leaf_key)


def certificate_covers(cert: Path, key: Path, names: tuple[str, ...], ca: Path) -> bool:
    """Whether ``cert`` and its ``key`` exist, the certificate signed by the CA in ``ca``, valid
    for another 30 days and naming every one of ``names``: else it is to be made anew."""
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature

    if not key.is_file():
        return False
    try:
        leaf = x509.load_pem_x509_certificate(cert.read_bytes())
        leaf.verify_directly_issued_by(x509.load_pem_x509_certificate(ca.read_bytes()))
        alt = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, TypeError, x509.ExtensionNotFound, InvalidSignature):
        return False
    covered = {str(n) for n in alt.get_values_for_type(x509.IPAddress)} | set(alt.get_values_for_type(x509.DNSName))
    fresh = leaf.not_valid_after_utc - datetime.datetime.now(datetime.UTC) > datetime.timedelta(days=_RENEW_DAYS)
    return fresh and all(str(ipaddress.ip_address(n)) in covered if _is_ip(n) else n in covered for n in names)


def certificate_names(cert: Path) -> set[str]:
    """The IP and DNS names a PEM certificate is valid for."""
    from cryptography import x509

    alt = x509.load_pem_x509_certificate(cert.read_bytes()).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    return {str(n) for n in alt.value.get_values_for_type(x509.IPAddress)} | set(
        alt.value.get_values_for_type(x509.DNSName)
    )


def _new_key() -> ec.EllipticCurvePrivateKey:
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _general_name(host: str) -> x509.GeneralName:
    from cryptography import x509

    return x509.IPAddress(ipaddress.ip_address(host)) if _is_ip(host) else x509.DNSName(host)


def _write_pair(cert_path: Path, key_path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    """The certificate (public) and its key (0600, PKCS#8, unencrypted: the server reads it)."""
    from cryptography.hazmat.primitives import serialization

    from shared.auth import write_private

    pem = serialization.Encoding.PEM
    raw = key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    key_path.parent.mkdir(parents=True, exist_ok=True)
    write_private(key_path, raw)
    cert_path.write_bytes(cert.public_bytes(pem))


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def server_context(cert: str, key: str) -> ssl.SSLContext:
    """An HTTPS server context (TLS 1.2 at least) from PEM files; a clear error when unreadable."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the TLS certificate {cert} / key {key}: {exc}") from None
    return context


def client_context(ca: str | None, cert: str | None = None, key: str | None = None) -> ssl.SSLContext:
    """A client context trusting ``ca`` (else the system's), with a client certificate if given."""
    try:
        context = ssl.create_default_context(cafile=ca)
        if cert:
            context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load TLS files (ca {ca}, cert {cert}): {exc}") from None
    return context
