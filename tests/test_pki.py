"""spillway.pki: a CA and mutual-TLS pairs that a real gRPC server and client accept."""

from __future__ import annotations

import ssl
import stat
from pathlib import Path

from cryptography import x509

from spillway.pki import TlsFiles, make_ca, write_mtls_dir


def test_issue_and_verify(tmp_path: Path) -> None:
    ca = make_ca("test-ca")
    cert_pem, key_pem = ca.issue("agent", ["localhost", "10.0.0.7"], client=False, server=True)
    cert = x509.load_pem_x509_certificate(cert_pem)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["10.0.0.7"]
    cert.verify_directly_issued_by(ca.cert)
    assert b"PRIVATE KEY" in key_pem


def test_write_mtls_dir(tmp_path: Path) -> None:
    server, client = write_mtls_dir(tmp_path / "tls")
    assert isinstance(server, TlsFiles) and server.ca == client.ca
    assert stat.S_IMODE(server.key.stat().st_mode) == 0o600
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(client.ca))
    ctx.load_cert_chain(str(client.cert), str(client.key))  # a matching pair loads
    assert TlsFiles(str(server.cert), str(server.key), str(server.ca)) == server
