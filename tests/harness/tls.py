"""A certificate authority made at test time (trustme) and one server certificate from it.

The certificate names IP 127.0.0.1 and ``localhost``; it serves Dovecot (IMAPS and
STARTTLS) and the https identity-provider stand-in. Nothing here trusts it by default:
a client trusts it only through ``ca_bundle_path`` (or ``client_context()``).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import trustme


@dataclass(frozen=True)
class LocalCA:
    ca: trustme.CA
    ca_bundle_path: str  # the CA certificate (PEM): verify=, cafile=, REQUESTS_CA_BUNDLE
    cert_path: str  # server certificate chain (PEM), for Dovecot's ssl_cert
    key_path: str  # its private key (PEM), for Dovecot's ssl_key
    server_context: ssl.SSLContext  # for the https token server

    def client_context(self) -> ssl.SSLContext:
        """A verifying client context that trusts the test CA (and only it)."""
        return ssl.create_default_context(cafile=self.ca_bundle_path)


def make_local_ca(directory: Path) -> LocalCA:
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA(organization_name="mail_syncer tests")
    cert = ca.issue_cert("127.0.0.1", "localhost")
    ca_path, cert_path, key_path = (directory / n for n in ("ca.pem", "server-cert.pem", "server-key.pem"))
    ca.cert_pem.write_to_path(str(ca_path))
    cert_path.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(key_path))
    key_path.chmod(0o600)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_context)
    return LocalCA(ca, str(ca_path), str(cert_path), str(key_path), server_context)
