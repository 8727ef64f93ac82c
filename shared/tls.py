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

from shared.errors import ConfigError

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
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    from shared.auth import write_private

    pki = LocalPki(directory)
    names = tuple(dict.fromkeys((*LOOPBACK_NAMES, *hosts)))
    if _still_good(pki, names):
        return pki
    now = datetime.datetime.now(datetime.UTC)
    until = now + datetime.timedelta(days=_VALID_DAYS)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "aimesh local CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(until)
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
    key = ec.generate_private_key(ec.SECP256R1())
    alt: list[x509.GeneralName] = []
    for host in names:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            alt.append(x509.DNSName(host))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "aimesh")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(until)
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    private = serialization.PrivateFormat.PKCS8
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    write_private(pki.ca_key, ca_key.private_bytes(pem, private, serialization.NoEncryption()))
    write_private(pki.key, key.private_bytes(pem, private, serialization.NoEncryption()))
    pki.ca.write_bytes(ca_cert.public_bytes(pem))
    pki.cert.write_bytes(cert.public_bytes(pem))
    return pki


def _still_good(pki: LocalPki, names: tuple[str, ...]) -> bool:
    from cryptography import x509

    if not all(p.is_file() for p in (pki.ca, pki.ca_key, pki.cert, pki.key)):
        return False
    try:
        cert = x509.load_pem_x509_certificate(pki.cert.read_bytes())
        alt = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        return False
    covered = {str(n) for n in alt.get_values_for_type(x509.IPAddress)} | set(alt.get_values_for_type(x509.DNSName))
    fresh = cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC) > datetime.timedelta(days=_RENEW_DAYS)
    return fresh and all(str(ipaddress.ip_address(n)) in covered if _is_ip(n) else n in covered for n in names)


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
