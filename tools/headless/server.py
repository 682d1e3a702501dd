"""The one ComfyUI server launcher (the runner's --comfyui, the quick start and the tests' `comfy_server`):
start `main.py` from a ComfyUI checkout on a free loopback port, wait until it answers, stop it again.

The host is found like everywhere else in the pack (tools/host.py): COMFYUI_PATH, else the ComfyUI root the pack
is installed in (ComfyUI/custom_nodes/<pack>), else the host cache (~/comfy/ComfyUI-0.3.75)."""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

from .errors import RunTimeout, ServerConnectionError

log = logging.getLogger("comfy_headless")

LOOPBACK = "127.0.0.1"
_HOST_SCRIPT = Path(__file__).resolve().parents[1] / "host.py"


def host_script():
    """tools/host.py as a module (loaded by path: the runner is also run as a plain script)."""
    name = "tfg_tools_host"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, _HOST_SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def looks_like_comfyui(path: Path) -> bool:
    return (Path(path) / "main.py").is_file() and (Path(path) / "comfy").is_dir()


def default_comfyui_path() -> Path:
    """$COMFYUI_PATH, else the ComfyUI root this pack is installed in, else the host cache of tools/host.py
    (where `python tools/host.py` brings ComfyUI 0.3.75). The path may not exist yet."""
    env = os.environ.get("COMFYUI_PATH")
    if env:
        return Path(env).expanduser()
    found = host_script().find_host()
    return Path(found) if found is not None else host_script().default_cache()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child before exec (Linux): get SIGTERM when the parent dies (prctl PR_SET_PDEATHSIG)."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)
    except Exception:                                   # best effort
        pass


class LocalComfyUI:
    """Context manager: start ``main.py`` from a ComfyUI checkout on a loopback port, wait until it answers, and
    stop it (its whole process group) on exit. ``url`` and ``port`` are set once started.

    * ``base_directory``: passed as ``--base-directory`` (its ``custom_nodes`` folder is created when missing).
    * ``ready_node``: ready only once ``GET /object_info/<node>`` lists it (custom nodes loaded), else once
      ``/system_stats`` answers.
    * ``env``: environment changes for the server (a value of None removes the variable).
    * A port taken between choosing and binding it is retried with another free port (``attempts``)."""

    def __init__(self, comfyui: str | os.PathLike, *, cpu: bool = False, extra_args: Iterable[str] = (),
                 port: int | None = None, python: str | None = None, startup_timeout: float = 300.0,
                 log_path: str | os.PathLike | None = None, base_directory: str | os.PathLike | None = None,
                 ready_node: str | None = None, env: Mapping[str, str | None] | None = None, attempts: int = 3):
        self.root = Path(comfyui).expanduser().resolve()
        self.cpu = cpu
        self.extra_args = list(extra_args)
        self.port = port
        self.fixed_port = port is not None
        self.python = python or sys.executable
        self.startup_timeout = startup_timeout
        self.log_path = Path(log_path) if log_path else None
        self.keep_log = log_path is not None
        self.base_directory = Path(base_directory) if base_directory is not None else None
        self.ready_node = ready_node
        self.env = dict(env or {})
        self.attempts = attempts
        self.proc: subprocess.Popen | None = None
        self.url: str | None = None
        self._log_file = None

    def command(self) -> list[str]:
        cmd = [self.python, str(self.root / "main.py"), "--listen", LOOPBACK, "--port", str(self.port),
               "--disable-auto-launch"]
        if self.cpu:
            cmd.append("--cpu")
        if self.base_directory is not None:
            cmd += ["--base-directory", str(self.base_directory)]
        return cmd + self.extra_args

    def log_text(self) -> str:
        if not self.log_path or not self.log_path.exists():
            return ""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def _base_from_args(self) -> Path | None:
        if self.base_directory is not None:
            return self.base_directory
        for i, arg in enumerate(self.extra_args):
            if arg.startswith("--base-directory="):
                return Path(arg.split("=", 1)[1]).expanduser()
            if arg == "--base-directory" and i + 1 < len(self.extra_args):
                return Path(self.extra_args[i + 1]).expanduser()
        return None

    def _environment(self) -> dict:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        for key, value in self.env.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = str(value)
        return env

    def _spawn(self) -> None:
        if self._log_file is None:
            self._log_file = open(self.log_path, "ab")
        cmd = self.command()
        log.info("starting ComfyUI: %s", " ".join(cmd))
        kwargs: dict[str, Any] = {}
        if os.name == "posix":
            kwargs["start_new_session"] = True          # Ctrl-C reaches us only; we stop it
        if sys.platform.startswith("linux"):
            kwargs["preexec_fn"] = _die_with_parent     # no orphaned server if we are killed
        try:
            self.proc = subprocess.Popen(cmd, cwd=str(self.root), stdout=self._log_file, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=self._environment(), **kwargs)
        except OSError as e:
            raise ServerConnectionError(f"cannot start ComfyUI ({cmd[0]}): {e}") from e
        self.url = f"http://{LOOPBACK}:{self.port}"

    def is_ready(self) -> bool:
        """True once the server answers (and lists `ready_node`). ComfyUI loads custom nodes before it listens, so
        a server that answers without `ready_node` never gets it: that is an error, raised at once."""
        import requests
        try:
            if self.ready_node:
                r = requests.get(f"{self.url}/object_info/{self.ready_node}", timeout=2)
                if r.status_code == 200 and self.ready_node in r.json():
                    return True
                if r.status_code in (200, 404):
                    self.keep_log = True
                    raise ServerConnectionError(
                        f"ComfyUI at {self.url} started without the node {self.ready_node} (did the pack fail to "
                        f"import? see 'IMPORT FAILED' / 'Error while calling comfy_entrypoint' in the log {self.log_path}):"
                        f"\n" + self.log_tail())
                return False
            return requests.get(f"{self.url}/system_stats", timeout=2).status_code == 200
        except (requests.RequestException, ValueError):
            return False

    def start(self) -> str:
        if not looks_like_comfyui(self.root):
            raise ServerConnectionError(f"{self.root} is not a ComfyUI checkout (no main.py / comfy/); use "
                                        "--comfyui PATH or --server URL, or run `python tools/host.py` to bring "
                                        "ComfyUI")
        base = self._base_from_args()
        if base is not None and not (base / "custom_nodes").is_dir():
            # main.py lists <base>/custom_nodes before anything else and dies if it is missing
            log.info("creating %s (ComfyUI needs it under --base-directory)", base / "custom_nodes")
            (base / "custom_nodes").mkdir(parents=True, exist_ok=True)
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="comfyui-headless-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        t0 = time.monotonic()
        deadline = t0 + self.startup_timeout
        for attempt in range(max(1, self.attempts)):
            if not self.fixed_port:
                self.port = free_port()
            self._spawn()
            while True:
                if self.proc.poll() is not None:
                    break
                try:
                    ready = self.is_ready()
                except ServerConnectionError:
                    self._terminate()
                    raise
                if ready:
                    log.info("ComfyUI ready at %s after %.1f s (log: %s)", self.url, time.monotonic() - t0,
                             self.log_path)
                    return self.url
                if time.monotonic() > deadline:
                    self.keep_log = True
                    self._terminate()
                    raise RunTimeout(f"ComfyUI did not answer within {self.startup_timeout:.0f} s; "
                                     f"log {self.log_path}:\n" + self.log_tail())
                time.sleep(0.25)
            port_taken = "address already in use" in self.log_tail(20).lower()
            if not port_taken or self.fixed_port or attempt + 1 >= self.attempts:
                break
            log.info("port %s was taken; retrying on another", self.port)
        self.keep_log = True
        code = self.proc.returncode
        raise ServerConnectionError(f"ComfyUI exited with code {code} during startup; log {self.log_path}:\n"
                                    + self.log_tail())

    def _terminate(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            def signal_group(sig):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    if os.name == "posix":
                        os.killpg(self.proc.pid, sig)
                    else:
                        self.proc.send_signal(sig)
            signal_group(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                signal_group(signal.SIGKILL if os.name == "posix" else signal.SIGTERM)
                self.proc.wait(timeout=15)

    def stop(self) -> None:
        self._terminate()
        self.proc = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self.log_path is not None and not self.keep_log:
            with contextlib.suppress(OSError):
                self.log_path.unlink()

    def __enter__(self) -> "LocalComfyUI":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and exc_type is not SystemExit:
            self.keep_log = True
            if self.log_path:
                log.info("ComfyUI log kept at %s", self.log_path)
        self.stop()
