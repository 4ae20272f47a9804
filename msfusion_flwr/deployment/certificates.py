"""TLS for a SuperLink: a CA and a server certificate it signed, made with the ``openssl`` command line tool."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from .processes import DeploymentError


def generate_certificates(cert_dir: Path, extra_sans: Sequence[str] = (), openssl: str = "openssl") -> dict[str, Path]:
    """A CA (``ca.pem``/``ca.key``) and a server certificate/key (``server.pem``/``server.key``) it signed.

    The server certificate is valid for 127.0.0.1, ::1 and localhost (the
    SuperLink's own SuperExec always connects through loopback) and for
    ``extra_sans`` (``"DNS:server.example"``, ``"IP:10.0.0.5"``) where SuperNodes
    on other machines reach the SuperLink.
    """
    if shutil.which(openssl) is None:
        raise DeploymentError("TLS needs the openssl command line tool")
    for san in extra_sans:
        if not re.fullmatch(r"(DNS|IP):[A-Za-z0-9.:*-]+", san):
            raise ValueError(f"subject alternative name {san!r} must look like DNS:name or IP:address")
    cert_dir.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = cert_dir / "ca.key", cert_dir / "ca.pem"
    key, csr, cert, ext = cert_dir / "server.key", cert_dir / "server.csr", cert_dir / "server.pem", cert_dir / "server.ext"
    ext.write_text(
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
        f"subjectAltName={','.join(['DNS:localhost', 'IP:127.0.0.1', 'IP:::1', *extra_sans])}\n"
        "subjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid,issuer\n"
    )
    commands = [
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "30",
         "-keyout", str(ca_key), "-out", str(ca_cert), "-subj", "/CN=msfusion-flwr local CA",
         "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
        [openssl, "req", "-newkey", "rsa:2048", "-nodes", "-sha256",
         "-keyout", str(key), "-out", str(csr), "-subj", "/CN=localhost"],
        [openssl, "x509", "-req", "-sha256", "-days", "30", "-in", str(csr), "-CA", str(ca_cert),
         "-CAkey", str(ca_key), "-CAcreateserial", "-out", str(cert), "-extfile", str(ext)],
    ]  # fmt: skip
    for command in commands:
        done = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            raise DeploymentError(f"{' '.join(command[:2])} failed: {done.stderr.strip()}")
    for private in (ca_key, key):
        private.chmod(0o600)
    return {"ca": ca_cert, "cert": cert, "key": key}
