"""Where gunicorn's workers keep their Prometheus values: a directory of this run's own on a memory file system.

prometheus_client's multiprocess mode memory-maps one file per worker and metric type and grows it as series appear.
On a full disk the page a new series needs cannot be had, and the kernel kills the worker with SIGBUS; its
replacement dies the same way as it boots. So the files stay off the data disk: on a tmpfs (systemd's
RuntimeDirectory, the user's runtime directory, /dev/shm, /run), in a fresh directory per run that is removed at
exit, while directories left by runs that died are removed at the next start. Only when none of those is writable
do they go to the temporary directory, and last to DATA_DIR. This module does not import prometheus_client.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

log = logging.getLogger(__name__)

RUN_PREFIX = "ollama-proxy-metrics-"  # then the arbiter's pid and a random part: ollama-proxy-metrics-4242-x1y2
MEMORY_DIRS = ("/dev/shm", "/run")  # tmpfs on Linux; /run is writable by root only


def memory_dirs(environ: Mapping[str, str]) -> list[Path]:
    """The memory file systems to try, best first: systemd's and the user's runtime directories, /dev/shm, /run."""
    named = [environ.get("RUNTIME_DIRECTORY", "").split(":")[0], environ.get("XDG_RUNTIME_DIR", "")]
    return [Path(path) for path in [*named, *MEMORY_DIRS] if path]


def create_run_dir(environ: Mapping[str, str], data_dir: str | os.PathLike) -> Path:
    """Make this run's directory in the first writable place, removing those that dead runs left there."""
    fallbacks = [Path(tempfile.gettempdir()), Path(data_dir)]
    for base in [*memory_dirs(environ), *fallbacks]:
        try:
            base.mkdir(parents=True, exist_ok=True)
            remove_stale(base)
            path = Path(tempfile.mkdtemp(prefix=f"{RUN_PREFIX}{os.getpid()}-", dir=base))
        except OSError:
            continue
        if base in fallbacks:
            log.warning("no memory file system is writable; gunicorn's metric files go to %s, so a full disk there "
                        "stops the workers (set PROMETHEUS_MULTIPROC_DIR to a tmpfs directory)", path)  # fmt: skip
        return path
    raise OSError(f"no writable directory for gunicorn's metric files (tried the temporary directory and {data_dir})")


def remove_stale(base: Path) -> list[Path]:
    """Remove the run directories under ``base`` whose arbiter is gone (only ours: same owner); return them."""
    removed = []
    for path in base.glob(RUN_PREFIX + "*"):
        pid = path.name[len(RUN_PREFIX) :].split("-")[0]
        try:
            is_ours = path.is_dir() and path.stat().st_uid == os.geteuid()
        except OSError:
            continue
        if is_ours and pid.isdigit() and not is_running(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def is_running(pid: int) -> bool:
    """True while a process with this pid exists (ours or another user's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_run_dir(path: Path) -> None:
    """Remove a directory made by ``create_run_dir`` (at exit); never one the launcher named."""
    if path.name.startswith(RUN_PREFIX):
        shutil.rmtree(path, ignore_errors=True)
