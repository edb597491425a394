"""A throw-away local Orthanc PACS with its DICOMweb plugin (for tests, the tutorial and trying the pipeline).

Orthanc and the plugin come from Debian's ``orthanc`` and ``orthanc-dicomweb`` packages (``make orthanc`` installs
them; ``make test`` depends on it). :class:`LocalOrthanc` writes a configuration into a temporary folder (storage,
index, a free localhost HTTP port, DICOM network off, no authentication, loopback only), starts the ``Orthanc``
binary, waits until the REST API answers, and stops it (and removes the folder) on :meth:`stop` / ``with`` exit.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

__all__ = ["ORTHANC_BINARY", "DICOMWEB_PLUGIN", "orthanc_available", "LocalOrthanc"]

ORTHANC_BINARY = os.environ.get("MEDFUSION_ORTHANC", shutil.which("Orthanc") or "/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = os.environ.get("MEDFUSION_ORTHANC_DICOMWEB", "/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def orthanc_available() -> str | None:
    """``None`` when Orthanc and its DICOMweb plugin are installed, else what is missing."""
    if not Path(ORTHANC_BINARY).is_file():
        return f"Orthanc binary not found at {ORTHANC_BINARY} (Debian package 'orthanc'; run `make orthanc`)"
    if not Path(DICOMWEB_PLUGIN).is_file():
        return f"Orthanc DICOMweb plugin not found at {DICOMWEB_PLUGIN} (Debian package 'orthanc-dicomweb')"
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalOrthanc:
    """Run Orthanc on ``127.0.0.1:<free port>`` with a temporary storage folder.

    Args:
        workdir: folder for storage, index and log (default: a new temporary folder, removed on stop).
        startup_timeout: seconds to wait for the REST API.

    Attributes:
        url: the REST root (``http://127.0.0.1:PORT``).
        dicomweb_url: the DICOMweb root (``http://127.0.0.1:PORT/dicom-web``).
    """

    def __init__(self, workdir: str | os.PathLike | None = None, startup_timeout: float = 60.0) -> None:
        missing = orthanc_available()
        if missing:
            raise FileNotFoundError(missing)
        self._own_dir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="medfusion-orthanc-")) if workdir is None else Path(workdir)
        self.startup_timeout = startup_timeout
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dicomweb_url = f"{self.url}/dicom-web"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> LocalOrthanc:
        """Start the server and wait until it answers.

        Raises:
            RuntimeError: it exited or did not answer in time (the message quotes its log).
        """
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "medfusion-test",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "HttpPort": self.port,
            "DicomServerEnabled": False,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "HttpDescribeErrors": True,
            "OverwriteInstances": False,
            "Plugins": [DICOMWEB_PLUGIN],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "StudiesMetadata": "Full", "SeriesMetadata": "Full"},
        }
        path = self.workdir / "orthanc.json"
        path.write_text(json.dumps(config, indent=2))
        log = open(self.workdir / "orthanc.log", "wb")  # noqa: SIM115 - kept open for the process' lifetime
        self.process = subprocess.Popen([ORTHANC_BINARY, str(path)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                with urllib.request.urlopen(f"{self.url}/system", timeout=2) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.2)
        text = (self.workdir / "orthanc.log").read_text(errors="replace")[-3000:]
        self.stop()
        raise RuntimeError(f"Orthanc did not start on port {self.port}; its log ends with:\n{text}")

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 20 s) and remove a temporary workdir."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> LocalOrthanc:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
