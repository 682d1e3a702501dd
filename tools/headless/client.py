"""ComfyUI's HTTP and WebSocket API: queue a prompt, follow its progress, download its outputs
(needs `requests` and `websocket-client`, tools/requirements.txt)."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from .errors import ExecutionFailed, HeadlessError, PromptRejected, RunTimeout, ServerConnectionError

log = logging.getLogger("comfy_headless")


class ComfyClient:
    """Minimal client for ComfyUI's HTTP and WebSocket API."""

    def __init__(self, base_url: str, *, timeout: float = 60.0):
        import requests        # imported lazily: ui_to_api and friends need only the stdlib
        if "://" not in base_url:
            base_url = "http://" + base_url
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.session = requests.Session()
        self.client_id = uuid.uuid4().hex

    def url(self, route: str) -> str:
        return self.base_url + route

    @property
    def ws_url(self) -> str:
        parts = urlsplit(self.base_url)
        scheme = "wss" if parts.scheme == "https" else "ws"
        return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + "/ws",
                           f"clientId={self.client_id}", ""))

    def _request(self, method: str, route: str, *, timeout: float | None = None, **kw):
        import requests
        try:
            return self.session.request(method, self.url(route), timeout=timeout or self.timeout, **kw)
        except requests.exceptions.ConnectionError as e:
            raise ServerConnectionError(f"cannot connect to ComfyUI at {self.base_url}: {e}") from e
        except requests.exceptions.Timeout as e:
            raise ServerConnectionError(f"ComfyUI at {self.base_url} did not answer {method} {route} "
                                        f"in time") from e
        except requests.exceptions.RequestException as e:
            raise ServerConnectionError(f"{method} {self.url(route)} failed: {e}") from e

    def _json(self, method: str, route: str, **kw) -> Any:
        r = self._request(method, route, **kw)
        if r.status_code != 200:
            raise ServerConnectionError(f"{method} {route}: HTTP {r.status_code}: {r.text[:500]}")
        try:
            return r.json()
        except ValueError as e:
            raise ServerConnectionError(f"{method} {route}: answer is not JSON: {r.text[:200]!r}") from e

    def is_up(self) -> bool:
        try:
            return self._request("GET", "/system_stats", timeout=5).status_code == 200
        except ServerConnectionError:
            return False

    def object_info(self) -> dict:
        return self._json("GET", "/object_info", timeout=max(self.timeout, 300))

    def queue_prompt(self, api: dict, extra_data: dict | None = None) -> dict:
        body = {"prompt": api, "client_id": self.client_id}
        if extra_data:
            body["extra_data"] = extra_data
        r = self._request("POST", "/prompt", json=body)
        try:
            data = r.json()
        except ValueError:
            data = None
        if r.status_code == 400 and isinstance(data, dict):
            raise PromptRejected("the server rejected the prompt", data)
        if r.status_code != 200 or not isinstance(data, dict) or "prompt_id" not in data:
            raise ServerConnectionError(f"POST /prompt: HTTP {r.status_code}: {r.text[:500]}")
        return data

    def history(self, prompt_id: str) -> dict | None:
        return self._json("GET", f"/history/{prompt_id}").get(prompt_id)

    def view(self, filename: str, subfolder: str = "", ftype: str = "output") -> bytes:
        r = self._request("GET", "/view", params={"filename": filename, "subfolder": subfolder,
                                                    "type": ftype})
        if r.status_code != 200:
            raise ServerConnectionError(f"GET /view {filename}: HTTP {r.status_code}")
        return r.content

    def cancel(self, prompt_id: str) -> None:
        """Best effort: drop the prompt from the queue and interrupt it if it runs."""
        with contextlib.suppress(HeadlessError):
            self._request("POST", "/queue", json={"delete": [prompt_id]}, timeout=5)
            self._request("POST", "/interrupt", json={"prompt_id": prompt_id}, timeout=5)

    def connect_ws(self, timeout: float = 10.0):
        import websocket
        try:
            return websocket.create_connection(self.ws_url, timeout=timeout)
        except (OSError, websocket.WebSocketException) as e:
            log.warning("websocket %s unavailable (%s); falling back to polling /history", self.ws_url, e)
            return None


# --------------------------------------------------------------------------------------
# Self-started ComfyUI
# --------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------
# Running a prompt
# --------------------------------------------------------------------------------------

def _node_label(api: dict, nid: Any) -> str:
    node = api.get(str(nid)) or {}
    ctype = node.get("class_type", "?")
    title = (node.get("_meta") or {}).get("title")
    return f"#{nid} {ctype}" + (f" ({title!r})" if title and title != ctype else "")


def _raise_execution_error(data: dict, api: dict) -> None:
    lines = [f"execution error in node {_node_label(api, data.get('node_id'))}: "
             f"{data.get('exception_type', 'Exception')}: {str(data.get('exception_message', '')).strip()}"]
    tb = data.get("traceback") or []
    if tb:
        lines.append("traceback (server side):")
        lines.append("".join(tb).rstrip() if isinstance(tb, list) else str(tb).rstrip())
    raise ExecutionFailed("\n".join(lines))


def _check_history_status(entry: dict, api: dict) -> None:
    status = entry.get("status") or {}
    if status.get("status_str") == "error":
        for name, data in status.get("messages") or []:
            if name == "execution_error":
                _raise_execution_error(data, api)
            if name == "execution_interrupted":
                raise ExecutionFailed(f"execution interrupted at node {_node_label(api, data.get('node_id'))}")
        raise ExecutionFailed("execution failed (history status: error)")


def _wait(client: ComfyClient, ws, prompt_id: str, api: dict, deadline: float) -> dict:
    """Follow the prompt until done; return its history entry."""
    import websocket
    t0 = time.monotonic()
    last_poll = t0
    last_progress = 0.0
    while True:
        now = time.monotonic()
        if now > deadline:
            raise RunTimeout("timed out waiting for the prompt to finish")
        if ws is None or now - last_poll > 5.0:       # fallback / safety net: history is
            last_poll = now                             # written once the prompt is done
            entry = client.history(prompt_id)
            if entry is not None:
                _check_history_status(entry, api)
                return entry
            if ws is None:
                time.sleep(0.25)
                continue
        try:
            ws.settimeout(max(0.05, min(1.0, deadline - time.monotonic())))
            raw = ws.recv()
        except websocket.WebSocketTimeoutException:
            continue
        except (websocket.WebSocketException, OSError) as e:
            log.warning("websocket closed (%s); polling /history instead", e)
            ws = None
            continue
        if not isinstance(raw, str):
            continue                                   # binary frame: a preview image
        try:
            msg = json.loads(raw)
        except ValueError:
            continue
        mtype, data = msg.get("type"), msg.get("data") or {}
        if data.get("prompt_id") not in (None, prompt_id):
            continue
        el = time.monotonic() - t0
        if mtype == "execution_start":
            log.info("[%6.1fs] started", el)
        elif mtype == "execution_cached":
            if data.get("nodes"):
                log.info("[%6.1fs] cached: %s", el, ", ".join(str(n) for n in data["nodes"]))
        elif mtype == "executing":
            node = data.get("node")
            if node is None:
                if data.get("prompt_id") == prompt_id:
                    break                              # done
                continue
            log.info("[%6.1fs] executing %s", el, _node_label(api, data.get("display_node") or node))
        elif mtype == "progress":
            value, maximum = data.get("value"), data.get("max")
            if value == maximum or time.monotonic() - last_progress > 0.5:
                last_progress = time.monotonic()
                log.info("[%6.1fs]   %s: step %s/%s", el, _node_label(api, data.get("node")), value, maximum)
        elif mtype == "execution_error":
            _raise_execution_error(data, api)
        elif mtype == "execution_interrupted":
            raise ExecutionFailed(f"execution interrupted at node {_node_label(api, data.get('node_id'))}")
        elif mtype == "execution_success":
            break
    for _ in range(40):                                # history is written just before "done"
        entry = client.history(prompt_id)
        if entry is not None:
            _check_history_status(entry, api)
            return entry
        time.sleep(0.25)
    raise ServerConnectionError(f"prompt {prompt_id} finished but /history has no entry for it")


def _safe_join(out_dir: Path, subfolder: str, filename: str) -> Path:
    parts = [p for p in re.split(r"[\\/]+", subfolder or "") if p not in ("", ".", "..")]
    name = Path(filename.replace("\\", "/")).name or "output"
    target = out_dir.joinpath(*parts, name)
    if target.exists():                                # never overwrite earlier results
        stem, suffix = target.stem, target.suffix
        i = 1
        while (candidate := target.with_name(f"{stem}-{i}{suffix}")).exists():
            i += 1
        target = candidate
    return target


def download_outputs(client: ComfyClient, entry: dict, out_dir: str | os.PathLike) -> list[Path]:
    """Download every file listed in a history entry's outputs (images, gifs, audio, ...,
    output and temp types). Returns the saved paths."""
    out_dir = Path(out_dir)
    saved: list[Path] = []
    for nid, node_out in (entry.get("outputs") or {}).items():
        for key, items in (node_out or {}).items():
            if not isinstance(items, list):
                continue
            for item in items:
                if not (isinstance(item, dict) and item.get("filename")):
                    if key == "text":
                        log.info("node %s text output: %s", nid, item)
                    continue
                data = client.view(item["filename"], item.get("subfolder", ""), item.get("type", "output"))
                path = _safe_join(out_dir, item.get("subfolder", ""), item["filename"])
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
                saved.append(path)
    return saved


def run_workflow(client: ComfyClient, api: dict, *, ui_workflow: dict | None = None,
                 out_dir: str | os.PathLike = "headless_outputs", timeout: float = 600.0) -> list[Path]:
    """Queue an API graph, follow its progress, and download its outputs into out_dir.
    Raises PromptRejected (HTTP 400), ExecutionFailed, RunTimeout or ServerConnectionError."""
    extra = {"extra_pnginfo": {"workflow": ui_workflow}} if ui_workflow is not None else None
    deadline = time.monotonic() + timeout
    ws = client.connect_ws()                           # before queueing, to miss no message
    try:
        resp = client.queue_prompt(api, extra)
        prompt_id = resp["prompt_id"]
        log.info("queued prompt %s", prompt_id)
        try:
            entry = _wait(client, ws, prompt_id, api, deadline)
        except (RunTimeout, KeyboardInterrupt):
            client.cancel(prompt_id)
            raise
    finally:
        if ws is not None:
            with contextlib.suppress(Exception):
                ws.close()
    saved = download_outputs(client, entry, out_dir)
    if not saved:
        log.warning("the prompt finished but produced no output files")
    return saved


# --------------------------------------------------------------------------------------
# CLI
