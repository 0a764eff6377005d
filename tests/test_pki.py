"""spillway.pki: one CA type for the agent's mutual TLS and the local control plane.

Chains verify, SANs and usages are what was asked, groups land in the subject O, keys are 0600,
bad input is refused before anything is written, and a real TLS handshake with mutual
authentication succeeds with the files `write_mtls_dir` writes (and fails with a foreign CA).
"""

from __future__ import annotations

import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from spillway.pki import CertPair, KeyPair, TlsFiles, make_ca, service_account_keys, write_mtls_dir


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _usages(cert: x509.Certificate) -> set[x509.ObjectIdentifier]:
    return set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def test_ca_is_a_ca_and_self_signed() -> None:
    ca = make_ca("test-ca")
    bc = ca.cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert bc.ca is True
    assert ca.cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    ca.cert.verify_directly_issued_by(ca.cert)
    assert ca.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "test-ca"


def test_server_cert_sans_usages_and_chain() -> None:
    ca = make_ca("test-ca")
    cert_pem, key_pem = ca.issue("agent", ["localhost", "node-1.example", "10.0.0.7", "::1"],
                                 client=False, server=True)
    cert = x509.load_pem_x509_certificate(cert_pem)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost", "node-1.example"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["10.0.0.7", "::1"]
    assert _usages(cert) == {ExtendedKeyUsageOID.SERVER_AUTH}
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    cert.verify_directly_issued_by(ca.cert)
    with pytest.raises(ValueError):  # another CA did not sign it
        cert.verify_directly_issued_by(make_ca("other-ca").cert)
    key = serialization.load_pem_private_key(key_pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    spki = serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    assert key.public_key().public_bytes(*spki) == cert.public_key().public_bytes(*spki)


def test_client_cert_groups_land_in_subject_o() -> None:
    ca = make_ca("test-ca")
    cert_pem, _ = ca.issue("spillway-admin", client=True, server=False,
                           organizations=["system:masters", "spillway:operators"])
    cert = x509.load_pem_x509_certificate(cert_pem)
    assert [a.value for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)] == [
        "system:masters", "spillway:operators"]
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "spillway-admin"
    assert _usages(cert) == {ExtendedKeyUsageOID.CLIENT_AUTH}
    with pytest.raises(x509.ExtensionNotFound):  # a client certificate without SANs has none
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    cert.verify_directly_issued_by(ca.cert)


def test_client_and_server_usages_together() -> None:
    cert_pem, _ = make_ca("c").issue("both", ["127.0.0.1"], client=True, server=True)
    cert = x509.load_pem_x509_certificate(cert_pem)
    assert _usages(cert) == {ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"common_name": "x", "sans": ["a"], "client": False, "server": False}, "client, a server, or both"),
        ({"common_name": "x", "sans": [], "client": False, "server": True}, "needs at least one"),
        ({"common_name": "x", "sans": ["bad name"], "client": False, "server": True}, "'bad name'"),
        ({"common_name": "x", "sans": [""], "client": False, "server": True}, "neither a DNS name"),
        ({"common_name": "x", "sans": "localhost", "client": False, "server": True}, "not the string"),
        ({"common_name": "x", "client": True, "server": False, "organizations": "system:masters"}, "not the string"),
        ({"common_name": "", "client": True, "server": False}, "common name"),
    ],
)
def test_bad_input_is_refused_and_writes_nothing(tmp_path: Path, kwargs: dict[str, object], message: str) -> None:
    ca = make_ca("test-ca")
    with pytest.raises(ValueError, match=message):
        ca.issue(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=message):
        ca.issue_files(tmp_path / "out", "leaf", **kwargs)  # type: ignore[arg-type]
    assert not (tmp_path / "out").exists()


def test_issue_files_writes_modes_and_verifies(tmp_path: Path) -> None:
    ca = make_ca("test-ca")
    ca_path = ca.write(tmp_path)
    assert ca_path == tmp_path / "ca.crt" and _mode(ca_path) == 0o644
    assert not list(tmp_path.glob("*.key"))  # the CA's key stays in memory
    pair = ca.issue_files(tmp_path, "apiserver", "kube-apiserver", ["kubernetes.default.svc", "10.96.0.1"],
                          client=False, server=True)
    assert pair == CertPair(tmp_path / "apiserver.crt", tmp_path / "apiserver.key")
    assert _mode(pair.key) == 0o600 and _mode(pair.cert) == 0o644
    cert = x509.load_pem_x509_certificate(pair.cert.read_bytes())
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca_path.read_bytes()))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(pair.cert), str(pair.key))  # the key matches the certificate
    # Re-issuing over existing files replaces them and keeps the key private.
    pair.key.chmod(0o644)
    again = ca.issue_files(tmp_path, "apiserver", "kube-apiserver", ["localhost"], client=False, server=True)
    assert _mode(again.key) == 0o600
    assert x509.load_pem_x509_certificate(again.cert.read_bytes()).serial_number != cert.serial_number


def test_service_account_keys(tmp_path: Path) -> None:
    pair = service_account_keys(tmp_path)
    assert pair == KeyPair(tmp_path / "sa.pub", tmp_path / "sa.key")
    assert _mode(pair.private) == 0o600
    private = serialization.load_pem_private_key(pair.private.read_bytes(), password=None)
    public = serialization.load_pem_public_key(pair.public.read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(public, ec.EllipticCurvePublicKey)
    assert private.public_key().public_numbers() == public.public_numbers()


def test_write_mtls_dir(tmp_path: Path) -> None:
    server, client = write_mtls_dir(tmp_path / "tls")
    assert isinstance(server, TlsFiles) and server.ca == client.ca == tmp_path / "tls" / "ca.crt"
    assert _mode(server.key) == 0o600 and _mode(client.key) == 0o600
    assert TlsFiles(str(server.cert), str(server.key), str(server.ca)) == server
    ca = x509.load_pem_x509_certificate(server.ca.read_bytes())
    s = x509.load_pem_x509_certificate(server.cert.read_bytes())
    c = x509.load_pem_x509_certificate(client.cert.read_bytes())
    s.verify_directly_issued_by(ca)
    c.verify_directly_issued_by(ca)
    assert _usages(s) == {ExtendedKeyUsageOID.SERVER_AUTH} and _usages(c) == {ExtendedKeyUsageOID.CLIENT_AUTH}
    sans = s.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1"}
    custom, _ = write_mtls_dir(tmp_path / "custom", server_names=["agent.node-3", "192.0.2.3"])
    sans = x509.load_pem_x509_certificate(custom.cert.read_bytes()).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["agent.node-3"]


def _handshake(server: TlsFiles, client: TlsFiles) -> str:
    """A real mutual-TLS handshake over a loopback socket; returns the CN the server saw."""
    sctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(server.ca))
    sctx.load_cert_chain(str(server.cert), str(server.key))
    sctx.verify_mode = ssl.CERT_REQUIRED
    cctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(client.ca))
    cctx.load_cert_chain(str(client.cert), str(client.key))
    seen: list[str] = []
    errors: list[BaseException] = []
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(10)
        port = listener.getsockname()[1]

        def serve() -> None:
            try:
                conn, _ = listener.accept()
                conn.settimeout(10)
                with sctx.wrap_socket(conn, server_side=True) as tls:
                    der = tls.getpeercert(binary_form=True)
                    assert der is not None
                    peer = x509.load_der_x509_certificate(der)
                    seen.extend(str(a.value) for a in peer.subject.get_attributes_for_oid(NameOID.COMMON_NAME))
                    tls.sendall(b"ok")
            except BaseException as e:
                errors.append(e)

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                    cctx.wrap_socket(raw, server_hostname="localhost") as tls:
                assert tls.recv(2) == b"ok"
        finally:
            t.join(10)
    if errors:
        raise errors[0]
    return seen[0]


def test_mtls_handshake_with_written_files(tmp_path: Path) -> None:
    server, client = write_mtls_dir(tmp_path / "tls")
    assert _handshake(server, client) == "spillway-client"


def test_mtls_handshake_refuses_a_foreign_client(tmp_path: Path) -> None:
    server, _ = write_mtls_dir(tmp_path / "a")
    _, foreign = write_mtls_dir(tmp_path / "b")
    client = TlsFiles(foreign.cert, foreign.key, server.ca)  # trusts the server, but its CA is unknown there
    with pytest.raises((ssl.SSLError, ConnectionError)):
        _handshake(server, client)
