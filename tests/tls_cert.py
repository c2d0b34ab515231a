"""A self-signed certificate for 127.0.0.1, for tests that speak TLS to a real redis-server or Sentinel."""
import shutil
import subprocess
from pathlib import Path

import pytest


def self_signed_cert(folder: Path) -> tuple[Path, Path]:
    """(cert, key) written into `folder`; skips the test where openssl is not installed."""
    if not shutil.which("openssl"):
        pytest.skip("openssl not installed (makes the test certificate)")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key
