"""The installable package: the wheel built from this checkout ships every file the proxy needs, installs with its
declared dependencies (held to requirements.txt's pins) into a new virtualenv outside the checkout, and the
installed ``ollama-proxy`` serves from an empty directory under waitress and gunicorn."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import tomllib
import venv
import zipfile
from contextlib import closing
from pathlib import Path

import pytest
import requests
from packaging.requirements import Requirement

from tests.conftest import free_port
from tests.processes import ROOT, health, wait_until

ENTRY_POINTS = "[console_scripts]\nollama-proxy = proxy_app.service.cli:cli\n"
VERBS = ["check", "export-csv", "init-db", "keys", "run", "serve"]
PROMPT = {"model": "llama3.2", "prompt": "Why is the sky blue?", "stream": False}


def _pins() -> dict[str, Requirement]:
    lines = (line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines())
    return {pin.name.lower(): pin for pin in map(Requirement, filter(None, lines))}


def test_package_ranges_hold_the_pins():
    """Each dependency in pyproject.toml names a pin of requirements.txt, with its marker, and admits its version."""
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    ranges = {requirement.name.lower(): requirement for requirement in map(Requirement, declared)}
    pins = _pins()
    assert sorted(ranges) == sorted(pins)
    for name, pin in pins.items():
        (exact,) = pin.specifier
        assert exact.operator == "==" and ranges[name].specifier.contains(exact.version), (name, pin, ranges[name])
        assert str(ranges[name].marker) == str(pin.marker), name
    assert str(ranges["gunicorn"].marker) == 'sys_platform != "win32"'
    assert str(ranges["pywin32"].marker) == 'sys_platform == "win32"'


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from this checkout (pip runs the build backend in an isolated environment)."""
    out = tmp_path_factory.mktemp("wheel")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(out), str(ROOT)], ROOT)
    (built,) = out.glob("ollama_analytics_proxy-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A new virtualenv outside the checkout holding the wheel and the dependencies it declares, at the pins."""
    env_dir = tmp_path_factory.mktemp("venv")
    venv.create(env_dir, with_pip=False)  # this interpreter's pip installs into it: no copy of pip to set up
    command = [sys.executable, "-m", "pip", "--python", str(env_dir / "bin" / "python"), "install", "--quiet"]
    _run([*command, str(wheel), "--constraint", str(ROOT / "requirements.txt")], env_dir)
    return env_dir / "bin"


@pytest.fixture
def empty_dir(tmp_path) -> Path:
    """An empty working directory: no checkout, no .env, nothing to import by accident."""
    path = tmp_path / "cwd"
    path.mkdir()
    return path


def _clean_env(**settings: str) -> dict:
    """This environment without OLLAMA_PROXY_* settings or PYTHONPATH, plus ``settings`` (names without prefix)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("OLLAMA_PROXY_")}
    env.pop("PYTHONPATH", None)
    env.update({f"OLLAMA_PROXY_{name}": value for name, value in settings.items()})
    return env


def _run(command: list, cwd: Path, env: dict | None = None) -> str:
    """Run ``command`` to the end; return its stdout, or fail with its output."""
    done = subprocess.run(command, cwd=cwd, env=env or _clean_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{command} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_package_wheel_holds_the_package_templates_and_static_files(wheel):
    """Every file of proxy_app/ in the checkout, plus templates/ as proxy_app/templates/, and the console script."""
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        entry_points = next(archive.read(name) for name in names if name.endswith(".dist-info/entry_points.txt"))
    package = {path.relative_to(ROOT).as_posix() for path in (ROOT / "proxy_app").rglob("*") if path.is_file()}
    package = {name for name in package if "__pycache__" not in name and not name.endswith(".pyc")}
    templates = {f"proxy_app/templates/{path.name}" for path in (ROOT / "templates").iterdir()}
    assert sorted(name for name in names if ".dist-info/" not in name) == sorted(package | templates)
    assert {"proxy_app/templates/dashboard.html", "proxy_app/dashboard/static/dashboard.js"} <= set(names)
    assert "proxy_app/service/gunicorn_conf.py" in names
    assert entry_points.decode().replace("\r\n", "\n").strip() == ENTRY_POINTS.strip()


def test_package_imports_from_the_install_not_the_checkout(installed, empty_dir):
    """The installed proxy_app, its packaged templates and every module import with only the declared dependencies."""
    script = (
        "import pkgutil, importlib, proxy_app\n"
        "print(proxy_app.__file__)\nprint(proxy_app.templates_folder())\n"
        "for module in pkgutil.walk_packages(proxy_app.__path__, 'proxy_app.'):\n"
        "    if not module.name.endswith('gunicorn_conf'):  # settings with side effects, run by the gunicorn test\n"
        "        importlib.import_module(module.name)\n"
    )
    package_file, templates = _run([str(installed / "python"), "-c", script], empty_dir).splitlines()
    env_dir = installed.parent.resolve()
    assert Path(package_file).resolve().is_relative_to(env_dir), package_file
    assert Path(templates).resolve().is_relative_to(env_dir) and Path(templates).name == "templates"
    assert sorted(path.name for path in Path(templates).iterdir()) == sorted(
        path.name for path in (ROOT / "templates").iterdir()
    )


def _search(url: str) -> list[dict]:
    """The stored calls as the dashboard's JSON search API lists them."""
    return requests.get(url + "/analytics/search", timeout=10).json()["results"]


def _verbs(help_text: str) -> list[str]:
    """The command names listed under 'Commands:' in click's help."""
    commands = help_text.split("Commands:\n", 1)[1]
    return [match.group(1) for match in re.finditer(r"^  (\S+)", commands, re.MULTILINE)]


def test_package_console_script_lists_the_module_verbs(installed, empty_dir):
    """``ollama-proxy --help`` (installed) and ``python -m proxy_app --help`` (checkout) offer the same commands."""
    installed_help = _run([str(installed / "ollama-proxy"), "--help"], empty_dir)
    module_help = _run([sys.executable, "-m", "proxy_app", "--help"], ROOT)
    assert installed_help.startswith("Usage: ollama-proxy ")
    assert module_help.startswith("Usage: python -m proxy_app ")
    assert _verbs(installed_help) == _verbs(module_help) == VERBS


@pytest.mark.parametrize("server", ["waitress", "gunicorn"])
def test_package_serves_relays_stores_and_renders_from_an_empty_directory(installed, empty_dir, upstream, server):
    """The installed ``ollama-proxy serve`` relays a call with the upstream's body, renders /analytics with the
    packaged templates and script, and stores the call in DATA_DIR's default place under the working directory."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = empty_dir.parent / "serve.log"
    command = [str(installed / "ollama-proxy"), "serve", "--port", str(port), "--server", server]
    with open(log_path, "wb") as output:
        process = subprocess.Popen(command, cwd=empty_dir, env=_clean_env(UPSTREAM=upstream.url, LOG_LEVEL="WARNING"),
                                   stdout=output, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        wait_until(lambda: process.poll() is not None or health(url), timeout=30, message=f"serve on {url}")
        assert process.poll() is None, log_path.read_text()
        assert health(url)["proxy"] == "up" and health(url)["upstream"]["reachable"] is True

        direct = requests.post(upstream.url + "/api/generate", json=PROMPT, timeout=10).json()
        relayed = requests.post(url + "/api/generate", json=PROMPT, timeout=10)
        assert relayed.status_code == 200
        assert {**relayed.json(), "created_at": None} == {**direct, "created_at": None}

        # The writer stores rows in the background of another process: the JSON search API shows when it has.
        (row,) = wait_until(lambda: _search(url), timeout=10, message="the call stored")
        assert (row["endpoint"], row["model"], row["output_tokens"]) == (
            "/api/generate",
            "llama3.2",
            direct["eval_count"],
        )
        page = requests.get(url + "/analytics", timeout=10)
        assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
        assert "<title>Ollama analytics</title>" in page.text
        assert re.search(r'data-card="calls"><div class="label">Calls</div><div class="value ">1</div>', page.text)
        assert ">llama3.2</a>" in page.text and '<script src="/analytics/static/dashboard.js"' in page.text
        script = requests.get(url + "/analytics/static/dashboard.js", timeout=10)
        assert script.content == (ROOT / "proxy_app/dashboard/static/dashboard.js").read_bytes()
    finally:
        process.send_signal(signal.SIGTERM)  # a graceful stop flushes the store before the process exits
        code = process.wait(30)
    assert code == 0, log_path.read_text()
    with closing(sqlite3.connect(empty_dir / "ollama_analytics" / "ollama-proxy.db")) as db:
        rows = db.execute("SELECT endpoint, model, http_status, outcome, input_tokens, output_tokens FROM calls")
        assert rows.fetchall() == [
            ("/api/generate", "llama3.2", 200, "completed", direct["prompt_eval_count"], direct["eval_count"])
        ]
