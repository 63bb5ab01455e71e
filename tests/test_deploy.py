"""The example deploy files: nginx in front streams over TLS unbuffered; the systemd units fit the shutdown timings."""

from __future__ import annotations

import configparser
import json
import shutil
import subprocess
import time

import pytest
import requests

from proxy_app import config
from proxy_app.relay.drain import SETTLE_SECONDS
from proxy_app.service.supervisor import is_listening
from tests.conftest import free_port, need
from tests.processes import ROOT, wait_until

NGINX_SITE = ROOT / "deploy" / "nginx" / "ollama-proxy.conf"
SYSTEMD = ROOT / "deploy" / "systemd"
# A self-signed certificate for 127.0.0.1, valid for a century: test data, so that no test needs openssl.
CERT, KEY = ROOT / "tests" / "tls" / "cert.pem", ROOT / "tests" / "tls" / "key.pem"


def nginx_config(tmp_path, proxy_port: int, tls_port: int, cert, key) -> str:
    """The example site, pointed at the test proxy and port and wrapped in a minimal main configuration."""
    site = NGINX_SITE.read_text()
    site = site[: site.rindex("server {")]  # the port-80 redirect server is not needed here
    site = site.replace("127.0.0.1:11434", f"127.0.0.1:{proxy_port}").replace("listen [::]:443 ssl;", "")
    site = site.replace("listen 443 ssl;", f"listen 127.0.0.1:{tls_port} ssl;")
    site = site.replace("/etc/ssl/certs/ollama.example.com.pem", str(cert))
    site = site.replace("/etc/ssl/private/ollama.example.com.key", str(key))
    temp = " ".join(
        f"{kind}_temp_path {tmp_path}/{kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"pid {tmp_path}/nginx.pid; daemon off; events {{}}\nhttp {{ access_log off; {temp}\n{site}\n}}\n"


def test_deploy_nginx_streams_over_tls_without_buffering(live_proxy, tmp_path):
    need(shutil.which("nginx") is not None, "nginx (Debian's nginx-light)")
    tls_port = free_port()
    conf = tmp_path / "nginx.conf"
    conf.write_text(nginx_config(tmp_path, int(live_proxy.port), tls_port, CERT, KEY))
    nginx = subprocess.Popen(["nginx", "-p", str(tmp_path), "-c", str(conf), "-e", str(tmp_path / "error.log")])
    try:
        wait_until(lambda: is_listening(tls_port) or nginx.poll() is not None, message="nginx")
        assert nginx.poll() is None, (tmp_path / "error.log").read_text()
        started = time.monotonic()
        headers = {"X-Fake-Tokens": "5", "X-Fake-Token-Delay": "0.2"}
        with requests.post(f"https://127.0.0.1:{tls_port}/api/generate", json={"model": "llama3.2", "prompt": "hi"},
                           headers=headers, stream=True, verify=CERT, timeout=10) as answer:  # fmt: skip
            arrivals = [(time.monotonic() - started, json.loads(line)) for line in answer.iter_lines() if line]
        assert answer.status_code == 200 and arrivals[-1][1]["done"] is True
        assert arrivals[0][0] < arrivals[-1][0] - 0.5, "the first token must arrive before the stream ends"
    finally:
        nginx.terminate()
        nginx.wait(10)


def read_unit(path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read(path)
    return parser


def test_deploy_systemd_unit_leaves_time_to_drain():
    service = read_unit(SYSTEMD / "ollama-proxy.service")["Service"]
    grace = config.merge(environ={})["GRACE_SECONDS"]
    assert service["ExecStart"].endswith("python -m proxy_app serve")
    assert service["KillMode"] == "mixed"  # SIGTERM to the launcher only: it stops gunicorn, then Ollama
    assert int(service["TimeoutStopSec"]) > grace + SETTLE_SECONDS
    drop_in = read_unit(SYSTEMD / "ollama.service.d" / "behind-proxy.conf")["Service"]
    assert drop_in["Environment"] == '"OLLAMA_HOST=127.0.0.1:11435"'


def test_deploy_systemd_unit_verifies(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    unit = tmp_path / "ollama-proxy.service"
    unit.write_text((SYSTEMD / "ollama-proxy.service").read_text().replace("/opt/ollama-proxy/.venv/bin/python",
                                                                           shutil.which("python3")))  # fmt: skip
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert result.returncode == 0 and "ollama-proxy.service" not in result.stderr, result.stderr
