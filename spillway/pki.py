"""Certificates for mutual TLS between Spillway components (agent TCP endpoint, operator).

`make_ca(name)` makes a CA in memory; `Ca.issue(cn, sans, client=..., server=...)` returns a
PEM certificate and key; `write_mtls_dir(dir)` writes a CA, a server pair (SANs localhost,
127.0.0.1, ::1) and a client pair, returning their paths as `TlsFiles`. ECDSA P-256.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY = dt.timedelta(days=365)


@dataclass(frozen=True, init=False)
class TlsFiles:
    """Paths of a certificate, its key and the CA that verifies the peer (str or Path)."""

    cert: Path
    key: Path
    ca: Path

    def __init__(self, cert: str | Path, key: str | Path, ca: str | Path) -> None:
        object.__setattr__(self, "cert", Path(cert))
        object.__setattr__(self, "key", Path(key))
        object.__setattr__(self, "ca", Path(ca))


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@dataclass
class Ca:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, common_name: str, sans: list[str], *, client: bool, server: bool) -> tuple[bytes, bytes]:
        """A leaf certificate (PEM) and its key (PEM). `sans`: DNS names and IP addresses."""
        if not (client or server):
            raise ValueError("a certificate must be for a client, a server, or both")
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if server else []) + (
            [ExtendedKeyUsageOID.CLIENT_AUTH] if client else [])
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
        )
        names: list[x509.GeneralName] = []
        for san in sans:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(san)))
            except ValueError:
                names.append(x509.DNSName(san))
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def make_ca(common_name: str) -> Ca:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Ca(cert, key)


def _write(path: Path, data: bytes, mode: int) -> None:
    path.write_bytes(data)
    path.chmod(mode)


def write_mtls_dir(directory: str | Path, *, server_names: list[str] | None = None) -> tuple[TlsFiles, TlsFiles]:
    """Write ca.crt, server.crt/key and client.crt/key under `directory`; return (server, client)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    ca = make_ca("spillway-ca")
    _write(d / "ca.crt", ca.cert_pem, 0o644)
    s_cert, s_key = ca.issue("spillway-agent", server_names or ["localhost", "127.0.0.1", "::1"],
                             client=False, server=True)
    c_cert, c_key = ca.issue("spillway-client", [], client=True, server=False)
    _write(d / "server.crt", s_cert, 0o644)
    _write(d / "server.key", s_key, 0o600)
    _write(d / "client.crt", c_cert, 0o644)
    _write(d / "client.key", c_key, 0o600)
    return TlsFiles(d / "server.crt", d / "server.key", d / "ca.crt"), TlsFiles(d / "client.crt", d / "client.key",
                                                                              d / "ca.crt")
