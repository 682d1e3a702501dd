"""The shipped UI workflows and the node help pages in the real ComfyUI frontend.

The frontend is the `comfyui-frontend-package` the host's requirements installed, served by the session's
headless server (`comfy_server`, tests/headless_server.py) and driven by selenium with Debian's `chromium` and
`chromium-driver` (`apt-get install -y chromium chromium-driver`). Without chromium the module skips, except under
CI (CI=true or TFG_REQUIRE_HOST=1), where a missing browser fails.

Per workflow in workflows/ (and workflows/extras/, whose third-party nodes are allowed to be missing):
- every node type is known to the frontend, no error toast or dialog, no failed request and no console error
  while it loads;
- zero overlapping node pairs as the frontend sizes them (`node.getBounding()`, title bar included), with a
  margin of MARGIN px; titles of at most 40 characters;
- a screenshot in tests/.artifacts/browser/<workflow>.png (TFG_BROWSER_ARTIFACTS moves it).
Per node of the pack: the frontend's help panel (node library → help) shows the page from web/docs/<node id>.md.

`python tests/test_browser.py --layout` re-places the nodes of every UI workflow from the sizes the frontend
gives them (see `layout`) and writes the files back; the API twins are unaffected (positions are UI-only).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
PACK_ROOT = TESTS_DIR.parent
WORKFLOWS_DIR = PACK_ROOT / "workflows"
UI_WORKFLOWS = sorted(WORKFLOWS_DIR.glob("*.json")) + sorted((WORKFLOWS_DIR / "extras").glob("*.json"))
DOCS_DIR = PACK_ROOT / "web" / "docs"
ARTIFACTS = Path(os.environ.get("TFG_BROWSER_ARTIFACTS") or TESTS_DIR / ".artifacts" / "browser")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
MARGIN = 10                 # px between any two node boxes
MAX_TITLE = 40
WINDOW = (1920, 1080)
# Third-party node packs that workflows/extras/ name in their notes; not installed on the test server.
THIRD_PARTY_TYPES = {"IPAdapterAdvanced", "IPAdapterUnifiedLoader"}
# Requests the frontend makes for every fresh user whatever the workflow (optional user files; the help panel's
# localized page, which it tries before docs/<node id>.md).
EXPECTED_404 = ("/api/userdata", "/user.css", "/favicon.ico", "/api/i18n")


def _ci() -> bool:
    return os.environ.get("CI", "").lower() == "true" or os.environ.get("TFG_REQUIRE_HOST") == "1"


def _browser_missing() -> str | None:
    missing = [name for name, path in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER)) if not path]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip)")
    if not missing:
        return None
    return (f"BROWSER TEST NEEDS {', '.join(missing)}: apt-get install -y chromium chromium-driver; "
            f"pip install selenium")


def _require_browser():
    reason = _browser_missing()
    if reason:
        if _ci():
            pytest.fail(reason + " (required under CI)", pytrace=False)
        pytest.skip(reason)


# ----------------------------------------------------------------------------------------------
# The page
# ----------------------------------------------------------------------------------------------

class Frontend:
    """One chromium page on the ComfyUI frontend of a running server."""

    def __init__(self, url: str):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
        opts = webdriver.ChromeOptions()
        opts.binary_location = CHROMIUM
        for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                    f"--window-size={WINDOW[0]},{WINDOW[1]}", "--hide-scrollbars"):
            opts.add_argument(arg)
        opts.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
        self.url = url
        self._urls = {}
        self.driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
        self.driver.set_script_timeout(60)

    def open(self, timeout: float = 120.0) -> list[str]:
        """Load the app; returns the problems seen while it started (failed requests of the pack, errors)."""
        self.driver.get(self.url)
        deadline = time.monotonic() + timeout
        while not self.driver.execute_script(
                "return !!(window.app && window.app.graph && window.app.canvas && window.LiteGraph"
                " && Object.keys(window.LiteGraph.registered_node_types).length > 0)"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the frontend at {self.url} did not start within {timeout:.0f} s")
            time.sleep(0.5)
        time.sleep(2.0)
        self.close_dialogs()
        return self.problems(startup=True)

    def quit(self):
        self.driver.quit()

    # -- what went wrong --------------------------------------------------------------------------
    def problems(self, startup: bool = False) -> list[str]:
        """Failed requests to the server and console errors since the last call. At start-up only those that
        concern the pack count (the frontend logs some errors of its own on a fresh profile)."""
        found = []
        for entry in self.driver.get_log("performance"):
            msg = json.loads(entry["message"])["message"]
            params = msg.get("params", {})
            if msg.get("method") == "Network.requestWillBeSent":
                self._urls[params.get("requestId")] = params.get("request", {}).get("url", "")
            elif msg.get("method") == "Network.responseReceived":
                resp = params.get("response", {})
                url, status = resp.get("url", ""), resp.get("status", 0)
                if status >= 400 and url.startswith(self.url) and not self._expected_404(url, status):
                    found.append(f"HTTP {status} {url}")
            elif msg.get("method") == "Network.loadingFailed" and not params.get("canceled"):
                url = self._urls.get(params.get("requestId"), "")
                if url.startswith(self.url):          # outside hosts are unreachable here (and CSP-blocked)
                    found.append(f"request failed: {params.get('errorText')} {url}")
        for entry in self.driver.get_log("browser"):
            text = entry.get("message", "")
            if entry.get("level") != "SEVERE" or entry.get("source") in ("network", "security"):
                continue                      # network: reported above; security: the CSP blocks the internet
            found.append(f"console: {text[:400]}")
        if startup:
            found = [p for p in found if "tfg" in p.lower()]
        return found

    def _expected_404(self, url: str, status: int) -> bool:
        path = url[len(self.url):]
        if status == 404 and path.startswith(EXPECTED_404):
            return True
        # the help panel asks for docs/<id>/<locale>.md first, then docs/<id>.md
        return status == 404 and "/docs/" in path and path.count("/") >= 5 and path.endswith(".md")

    def ui_messages(self) -> list[str]:
        """Visible dialogs and error/warning toasts."""
        return self.driver.execute_script("""
            const seen = [];
            for (const el of document.querySelectorAll('.p-dialog, .p-toast-message-error, .p-toast-message-warn,'
                                                       + ' .comfy-modal')) {
              const style = getComputedStyle(el);
              if (style.display === 'none' || style.visibility === 'hidden' || !el.offsetParent && style.position !== 'fixed') continue;
              seen.push(el.className.split(' ')[0] + ': ' + el.innerText.trim().slice(0, 300));
            }
            return seen;""")

    def close_dialogs(self):
        from selenium.webdriver.common.keys import Keys
        for _ in range(3):
            if not self.ui_messages():
                return
            self.driver.find_element("tag name", "body").send_keys(Keys.ESCAPE)
            time.sleep(0.5)

    # -- workflows --------------------------------------------------------------------------------
    def load_workflow(self, workflow: dict, name: str) -> None:
        result = self.driver.execute_async_script("""
            const done = arguments[arguments.length - 1];
            window.app.loadGraphData(arguments[0], true, true, arguments[1])
              .then(() => done('ok'), (e) => done('error: ' + e));""", workflow, name)
        if result != "ok":
            raise AssertionError(f"{name}: app.loadGraphData failed: {result}")
        time.sleep(1.5)                               # let the canvas draw (node sizes settle on the first draw)

    def fit_view(self):
        self.driver.execute_script("""
            const c = window.app.canvas; const g = window.app.graph;
            const boxes = g._nodes.map(n => n.getBounding()).concat((g._groups || []).map(gr => gr._bounding));
            const x0 = Math.min(...boxes.map(b => b[0])) - 20, y0 = Math.min(...boxes.map(b => b[1])) - 20;
            const x1 = Math.max(...boxes.map(b => b[0] + b[2])) + 20, y1 = Math.max(...boxes.map(b => b[1] + b[3])) + 20;
            const w = c.canvas.width / (window.devicePixelRatio || 1), h = c.canvas.height / (window.devicePixelRatio || 1);
            const scale = Math.min(w / (x1 - x0), (h - 80) / (y1 - y0), 1.0);
            c.ds.scale = scale; c.ds.offset[0] = -x0 + (w / scale - (x1 - x0)) / 2; c.ds.offset[1] = -y0 + 40 / scale;
            c.setDirty(true, true); c.draw(true, true);""")
        time.sleep(0.5)

    def nodes(self) -> list[dict]:
        return self.driver.execute_script("""
            const known = window.LiteGraph.registered_node_types;
            return window.app.graph._nodes.map(n => ({id: n.id, type: n.type, title: n.title,
              known: !!known[n.type], box: Array.from(n.getBounding()), size: Array.from(n.size),
              pos: Array.from(n.pos)}));""")

    def screenshot(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.driver.save_screenshot(str(path))

    # -- help pages -------------------------------------------------------------------------------
    def help_page(self, node_id: str, timeout: float = 20.0) -> dict:
        """Open the node library and the help panel of `node_id` as a user does; returns the panel's text,
        whether the page came from the server (no fallback) and the URL base it used."""
        self.driver.execute_script("""
            const pinia = document.querySelector('#vue-app').__vue_app__.config.globalProperties.$pinia;
            const sidebar = pinia._s.get('workspace') && pinia._s.get('workspace').sidebarTab;
            if (sidebar && sidebar.activeSidebarTabId !== 'node-library') sidebar.toggleSidebarTab('node-library');
            const defs = pinia._s.get('nodeDef');
            pinia._s.get('nodeHelp').openHelp(defs.nodeDefsByName[arguments[0]]);""", node_id)
        deadline = time.monotonic() + timeout
        while True:
            state = self.driver.execute_script("""
                const pinia = document.querySelector('#vue-app').__vue_app__.config.globalProperties.$pinia;
                const help = pinia._s.get('nodeHelp');
                const panel = document.querySelector('.node-help-content');
                return {loading: help.isLoading, error: help.error, base: help.baseUrl,
                        html: help.renderedHelpHtml, text: panel ? panel.innerText : null};""")
            if not state["loading"] and state["text"] is not None:
                return state
            if time.monotonic() > deadline:
                return state
            time.sleep(0.2)


# ----------------------------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------------------------

def overlapping_pairs(nodes: list[dict], margin: float = MARGIN) -> list[str]:
    """Pairs of node boxes [x, y, w, h] closer than `margin` (or overlapping)."""
    pairs = []
    for i, a in enumerate(nodes):
        ax, ay, aw, ah = a["box"]
        for b in nodes[i + 1:]:
            bx, by, bw, bh = b["box"]
            dx = max(bx - (ax + aw), ax - (bx + bw))
            dy = max(by - (ay + ah), ay - (by + bh))
            if dx < margin and dy < margin:
                pairs.append(f"#{a['id']} {a['title']!r} and #{b['id']} {b['title']!r} "
                             f"(gap x {dx:.0f}, y {dy:.0f} px)")
    return pairs


# ----------------------------------------------------------------------------------------------
# Fixtures and tests
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def frontend(comfy_server):
    _require_browser()
    import requests
    # a returning user: no first-run template browser over the canvas
    requests.post(f"{comfy_server.url}/settings", json={"Comfy.TutorialCompleted": True}, timeout=10)
    assert (comfy_server.base / "input" / "example.png").is_file(), "the server's input/example.png is missing"
    page = Frontend(comfy_server.url)
    try:
        startup = page.open()
        assert not startup, "problems while the frontend started:\n" + "\n".join(startup)
        yield page
    finally:
        page.quit()


def _workflow_id(path: Path) -> str:
    return str(path.relative_to(WORKFLOWS_DIR))


def _input_images(workflow: dict) -> set[str]:
    return {n["widgets_values"][0] for n in workflow["nodes"]
            if n["type"] in ("LoadImage", "LoadImageMask") and n.get("widgets_values")}


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=_workflow_id)
def test_workflow_in_the_frontend(frontend, comfy_server, path):
    workflow = json.loads(path.read_text(encoding="utf-8"))
    for image in _input_images(workflow):
        assert (comfy_server.base / "input" / image).is_file(), f"input image {image} missing on the test server"
    frontend.problems()                                   # drain what came before
    frontend.load_workflow(workflow, path.name)
    frontend.fit_view()
    frontend.screenshot(ARTIFACTS / (path.stem + ".png"))
    nodes = frontend.nodes()
    allowed = THIRD_PARTY_TYPES if path.parent.name == "extras" else set()
    unknown = {n["type"] for n in nodes if not n["known"]} - allowed
    assert not unknown, f"{path.name}: node types the frontend does not know: {sorted(unknown)}"
    problems = frontend.problems()
    messages = frontend.ui_messages()
    if allowed:   # the missing-nodes dialog names exactly the third-party nodes
        messages = [m for m in messages if not all(t in m for t in allowed & {n["type"] for n in nodes})]
    frontend.close_dialogs()
    assert not problems, f"{path.name}: while loading:\n" + "\n".join(problems)
    assert not messages, f"{path.name}: error toasts or dialogs:\n" + "\n".join(messages)
    long_titles = [n["title"] for n in nodes if len(n["title"] or "") > MAX_TITLE]
    assert not long_titles, f"{path.name}: titles over {MAX_TITLE} characters: {long_titles}"
    overlaps = overlapping_pairs(nodes)
    assert not overlaps, f"{path.name}: {len(overlaps)} overlapping node pairs:\n" + "\n".join(overlaps)


def _pack_node_ids() -> list[str]:
    return sorted(p.stem for p in DOCS_DIR.glob("*.md"))


@pytest.mark.parametrize("node_id", _pack_node_ids())
def test_help_page_in_the_frontend(frontend, node_id):
    frontend.problems()
    state = frontend.help_page(node_id)
    assert state["error"] is None, f"{node_id}: the help panel could not fetch its page: {state['error']}"
    assert state["base"].startswith("/extensions/"), state["base"]
    expected = (DOCS_DIR / f"{node_id}.md").read_text(encoding="utf-8").splitlines()[0].lstrip("# ").strip()
    text = (state["text"] or "").strip()
    assert expected and expected in text, f"{node_id}: help panel shows {text[:200]!r}, not the page"
    problems = frontend.problems()
    assert not problems, f"{node_id}: while opening its help:\n" + "\n".join(problems)
    if node_id == _pack_node_ids()[0]:
        frontend.screenshot(ARTIFACTS / "help_panel.png")


def test_every_pack_node_has_a_help_page(comfy_server):
    info = comfy_server.get("/object_info")
    pack_nodes = {name for name, d in info.items() if d.get("python_module", "").endswith("tfg_guidance")}
    assert pack_nodes, "no node of the pack on the server"
    assert pack_nodes <= set(_pack_node_ids()), f"no web/docs page for {sorted(pack_nodes - set(_pack_node_ids()))}"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
