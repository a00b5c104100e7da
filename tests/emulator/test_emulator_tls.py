"""The emulator over HTTPS with a throwaway CA: trusted only by a client that is given that CA."""

from __future__ import annotations

import ipaddress
import os
import re
import signal
import ssl
import stat
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
import requests

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
x509 = pytest.importorskip("cryptography.x509")

from airflow_provider_ppio.testing.server import EmulatorServer  # noqa: E402
from airflow_provider_ppio.testing.tls import create_tls_files  # noqa: E402

pytestmark = pytest.mark.integration

PATH = "/gpus/v2/prewarm-tasks"
Factory = Callable[..., EmulatorServer]
#: Where requests and OpenSSL look for CAs besides an explicit ``verify``.
CA_VARIABLES = ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE", "SSL_CERT_DIR")


@pytest.fixture
def no_ca_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forget any CA bundle the environment points at, so only what a test passes is trusted."""
    for name in CA_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def test_https_with_the_ca_verifies(ppio_emulator_tls: EmulatorServer, no_ca_env: None) -> None:
    emu = ppio_emulator_tls
    assert re.fullmatch(r"https://127\.0\.0\.1:\d+", emu.base_url)
    assert emu.ca_bundle is not None and Path(emu.ca_bundle).is_file()
    emu.control.seed_task(task_id="pwt-tls", state="running")  # the control client trusts the CA too

    response = requests.get(f"{emu.base_url}{PATH}/pwt-tls", headers=emu.auth_headers, verify=emu.ca_bundle, timeout=10)

    assert response.status_code == 200
    assert response.json()["status"]["status"] == "running"


def test_https_without_the_ca_fails_verification(ppio_emulator_tls: EmulatorServer, no_ca_env: None) -> None:
    with pytest.raises(requests.exceptions.SSLError, match="CERTIFICATE_VERIFY_FAILED"):
        requests.get(f"{ppio_emulator_tls.base_url}{PATH}", headers=ppio_emulator_tls.auth_headers, timeout=10)
    assert ppio_emulator_tls.control.requests_log() == []  # refused in the handshake: no request got through


def test_https_with_another_ca_fails_verification(
    ppio_emulator_tls: EmulatorServer, no_ca_env: None, tmp_path: Path
) -> None:
    other = create_tls_files(tmp_path)
    with pytest.raises(requests.exceptions.SSLError, match="CERTIFICATE_VERIFY_FAILED"):
        requests.get(f"{ppio_emulator_tls.base_url}/_emulator/health", verify=str(other.ca_bundle), timeout=10)


def test_ca_from_requests_ca_bundle(
    ppio_emulator_tls: EmulatorServer, no_ca_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert ppio_emulator_tls.ca_bundle is not None
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", ppio_emulator_tls.ca_bundle)
    response = requests.get(f"{ppio_emulator_tls.base_url}{PATH}", headers=ppio_emulator_tls.auth_headers, timeout=10)
    assert response.status_code == 200


def test_ca_from_ssl_cert_file(
    ppio_emulator_tls: EmulatorServer, no_ca_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert ppio_emulator_tls.ca_bundle is not None
    monkeypatch.setenv("SSL_CERT_FILE", ppio_emulator_tls.ca_bundle)
    context = ssl.create_default_context()  # OpenSSL's default paths honour SSL_CERT_FILE
    with urllib.request.urlopen(f"{ppio_emulator_tls.base_url}/_emulator/health", context=context, timeout=10) as r:
        assert r.status == 200


def test_certificate_covers_the_loopback_names(ppio_emulator_tls: EmulatorServer, no_ca_env: None) -> None:
    files = ppio_emulator_tls.tls_files
    assert files is not None
    cert = x509.load_pem_x509_certificate(files.certfile.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in names.get_values_for_type(x509.DNSName)
    assert {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")} <= set(
        names.get_values_for_type(x509.IPAddress)
    )
    ca = x509.load_pem_x509_certificate(files.ca_bundle.read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.issuer == ca.subject
    assert stat.S_IMODE(files.keyfile.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" not in files.ca_bundle.read_bytes()  # the CA's key is never written

    url = ppio_emulator_tls.base_url.replace("127.0.0.1", "localhost")
    assert requests.get(f"{url}/_emulator/health", verify=ppio_emulator_tls.ca_bundle, timeout=10).status_code == 200


def test_plain_emulator_has_no_ca(ppio_emulator: EmulatorServer) -> None:
    assert ppio_emulator.base_url.startswith("http://")
    assert ppio_emulator.ca_bundle is None
    assert ppio_emulator.tls_files is None


def test_factory_starts_https_emulators_with_their_own_ca(
    ppio_emulator_factory: Factory, ppio_emulator_tls: EmulatorServer, no_ca_env: None
) -> None:
    emu = ppio_emulator_factory(api_key="k-tls", quota=1, tls=True)
    assert emu.base_url.startswith("https://")
    assert emu.ca_bundle != ppio_emulator_tls.ca_bundle
    response = requests.post(
        f"{emu.base_url}{PATH}",
        headers={"Authorization": "Bearer k-tls"},
        json={"image": "nginx", "region_id": "r"},
        verify=emu.ca_bundle,
        timeout=10,
    )
    assert response.status_code == 200
    with pytest.raises(requests.exceptions.SSLError):  # trusting one emulator's CA does not trust another's
        requests.get(f"{emu.base_url}/_emulator/health", verify=ppio_emulator_tls.ca_bundle, timeout=10)


def test_temporary_certificates_are_removed_on_stop(tmp_path: Path, no_ca_env: None) -> None:
    with EmulatorServer(tls=True) as emu:
        temporary = emu.ca_bundle
        assert temporary is not None and os.path.exists(temporary)
    assert not os.path.exists(temporary)
    with pytest.raises(RuntimeError):
        _ = emu.ca_bundle

    with EmulatorServer(tls=True, tls_dir=tmp_path / "tls") as emu:
        assert emu.ca_bundle == str(tmp_path / "tls" / "ca.pem")
    assert (tmp_path / "tls" / "ca.pem").is_file()  # a chosen directory is kept


def test_tls_dir_needs_tls(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tls"):
        EmulatorServer(tls_dir=tmp_path)


def test_cli_serves_https_and_prints_the_ca(tmp_path: Path, no_ca_env: None) -> None:
    tls_dir = tmp_path / "tls"
    command = [sys.executable, "-m", "airflow_provider_ppio.testing.cli", "--port", "0", "--api-key", "k1"]
    process = subprocess.Popen(
        [*command, "--tls", "--tls-dir", str(tls_dir)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        ca_line, url_line = process.stdout.readline(), process.stdout.readline()
        assert ca_line == f"PPIO emulator CA bundle: {tls_dir / 'ca.pem'}\n"
        match = re.fullmatch(r"PPIO emulator listening on (https://127\.0\.0\.1:\d+)\n", url_line)
        assert match, url_line
        response = requests.get(
            f"{match.group(1)}{PATH}", headers={"Authorization": "Bearer k1"}, verify=str(tls_dir / "ca.pem"), timeout=5
        )
        assert response.status_code == 200
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(f"{match.group(1)}{PATH}", headers={"Authorization": "Bearer k1"}, timeout=5)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert (tls_dir / "ca.pem").is_file()


def test_cli_tls_dir_needs_tls(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from airflow_provider_ppio.testing.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--port", "0", "--tls-dir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "--tls-dir needs --tls" in capsys.readouterr().err
