"""Certificates and keys: mutual TLS between Spillway components, and the local control plane's PKI.

One CA type and one way to issue a leaf. ECDSA P-256 everywhere (fast to generate).

- `make_ca(name)` makes a CA in memory; `Ca.write(dir)` stores its certificate as `ca.crt`.
- `Ca.issue(cn, sans, client=..., server=..., organizations=...)` returns a PEM certificate and
  key. `sans` are DNS names and IP addresses (told apart by parsing); `organizations` land in
  the subject O (Kubernetes reads them as the user's groups, CN as the user name).
- `Ca.issue_files(dir, stem, ...)` does the same and writes `<stem>.crt` (0644) and
  `<stem>.key` (0600), returning their paths as a `CertPair`.
- `write_mtls_dir(dir)` writes a CA, a server pair (SANs localhost, 127.0.0.1, ::1) and a client
  pair for the agent's TCP endpoint, returning `(server, client)` as `TlsFiles`.
- `service_account_keys(dir)` writes the key pair that signs and verifies service-account tokens.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY = dt.timedelta(days=365)
_BACKDATE = dt.timedelta(minutes=5)  # tolerate a little clock skew between peers


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


def tls_signature(files: TlsFiles) -> tuple[tuple[int, int, int], ...]:
    """What changes when any of the three files is replaced (inode, size, mtime; stat follows
    links, so a Secret volume's swapped `..data` link counts). A missing file reads as zeros."""
    out = []
    for path in (files.cert, files.key, files.ca):
        try:
            st = path.stat()
            out.append((st.st_ino, st.st_size, st.st_mtime_ns))
        except OSError:
            out.append((0, 0, 0))
    return tuple(out)


def read_tls(files: TlsFiles) -> tuple[bytes, bytes, bytes]:
    """(cert, key, ca) PEM bytes, after checking that the key belongs to the certificate.
    Raises ValueError naming the files when it does not (a rotation caught half-way, or a
    wrong Secret), so a server keeps what it has instead of serving a broken pair."""
    cert, key, ca = files.cert.read_bytes(), files.key.read_bytes(), files.ca.read_bytes()
    try:
        public = x509.load_pem_x509_certificate(cert).public_key()
        private = serialization.load_pem_private_key(key, password=None)
    except ValueError as exc:
        raise ValueError(f"{files.cert} / {files.key}: not a PEM certificate and key: {exc}") from exc
    der = serialization.Encoding.DER
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if public.public_bytes(der, spki) != private.public_key().public_bytes(der, spki):
        raise ValueError(f"the key {files.key} does not belong to the certificate {files.cert}")
    return cert, key, ca


@dataclass(frozen=True)
class CertPair:
    """Paths of a certificate and its private key."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class KeyPair:
    """Paths of a public key and its private key (PEM)."""

    public: Path
    private: Path


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write `data` to `path` with `mode`; a key is never readable by others, not even briefly."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    path.touch(mode=0o600)
    path.write_bytes(data)
    path.chmod(mode)


def _name(common_name: str, organizations: Sequence[str] = ()) -> x509.Name:
    if not common_name:
        raise ValueError("a certificate needs a common name (CN)")
    if isinstance(organizations, str):
        raise ValueError(f"organizations must be a list of names, not the string {organizations!r}")
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in organizations]
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attrs)


def _general_names(sans: Sequence[str]) -> list[x509.GeneralName]:
    if isinstance(sans, str):
        raise ValueError(f"sans must be a list of DNS names and IP addresses, not the string {sans!r}")
    names: list[x509.GeneralName] = []
    for san in sans:
        if not san or san != san.strip() or any(c.isspace() for c in san):
            raise ValueError(f"subject alternative name {san!r} is neither a DNS name nor an IP address")
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(san)))
        except ValueError:
            names.append(x509.DNSName(san))
    return names


@dataclass
class Ca:
    """A certificate authority held in memory (its key is never written by this module)."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def write(self, directory: str | Path, name: str = "ca.crt") -> Path:
        """Write the CA certificate (0644) under `directory`; return its path."""
        path = Path(directory) / name
        _write(path, self.cert_pem, 0o644)
        return path

    def issue(self, common_name: str, sans: Sequence[str] = (), *, client: bool, server: bool,
              organizations: Sequence[str] = ()) -> tuple[bytes, bytes]:
        """A leaf certificate (PEM) and its key (PEM).

        `sans`: DNS names and IP addresses; a server certificate needs at least one.
        `client` / `server`: the extended key usages. `organizations`: the subject O (groups).
        """
        if not (client or server):
            raise ValueError("a certificate must be for a client, a server, or both (client=True and/or server=True)")
        names = _general_names(sans)
        if server and not names:
            raise ValueError(f"server certificate {common_name!r} needs at least one DNS name or IP address in sans")
        subject = _name(common_name, organizations)
        key = _new_key()
        now = dt.datetime.now(dt.UTC)
        usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if server else []) + (
            [ExtendedKeyUsageOID.CLIENT_AUTH] if client else [])
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
        )
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)

    def issue_files(self, directory: str | Path, stem: str, common_name: str, sans: Sequence[str] = (), *,
                    client: bool, server: bool, organizations: Sequence[str] = ()) -> CertPair:
        """`issue`, written to `<stem>.crt` (0644) and `<stem>.key` (0600) under `directory`."""
        cert_pem, key_pem = self.issue(common_name, sans, client=client, server=server, organizations=organizations)
        d = Path(directory)
        pair = CertPair(d / f"{stem}.crt", d / f"{stem}.key")
        _write(pair.key, key_pem, 0o600)
        _write(pair.cert, cert_pem, 0o644)
        return pair


def make_ca(common_name: str) -> Ca:
    """A new self-signed CA (may sign leaves only, not other CAs)."""
    key = _new_key()
    now = dt.datetime.now(dt.UTC)
    name = _name(common_name)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Ca(cert, key)


def write_mtls_dir(directory: str | Path, *, server_names: Sequence[str] | None = None) -> tuple[TlsFiles, TlsFiles]:
    """Write ca.crt, server.crt/key and client.crt/key under `directory`; return (server, client)."""
    d = Path(directory)
    ca = make_ca("spillway-ca")
    ca_path = ca.write(d)
    server = ca.issue_files(d, "server", "spillway-agent", server_names or ("localhost", "127.0.0.1", "::1"),
                            client=False, server=True)
    client = ca.issue_files(d, "client", "spillway-client", client=True, server=False)
    return TlsFiles(server.cert, server.key, ca_path), TlsFiles(client.cert, client.key, ca_path)


def service_account_keys(directory: str | Path) -> KeyPair:
    """The key pair that signs service-account tokens (`sa.key`, 0600) and verifies them (`sa.pub`)."""
    key = _new_key()
    d = Path(directory)
    pair = KeyPair(d / "sa.pub", d / "sa.key")
    _write(pair.private, _key_pem(key), 0o600)
    _write(pair.public, key.public_key().public_bytes(serialization.Encoding.PEM,
                                                      serialization.PublicFormat.SubjectPublicKeyInfo), 0o644)
    return pair
