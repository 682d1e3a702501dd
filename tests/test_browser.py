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

`python tests/test_browser.py --thumbnails` writes workflows/<name>.jpg, the template browser's thumbnails, from a
real run of each API twin on the tiny test models (labelled so on the image; the digits quick start on its real
model). `python tests/test_browser.py --layout` re-places the nodes of every UI workflow from the sizes the frontend
gives them (see `layout`) and writes the files back; the API twins are unaffected (positions are UI-only).
Both take `--only NAME[,NAME…]` (workflow file stems) to redo just those workflows.
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
# A returning user (no first-run template browser over the canvas), no minimap, full detail at any zoom.
FRONTEND_SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False,
                     "LiteGraph.Canvas.MinFontSizeForLOD": 0}
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

    def fit_view(self, margins=(70, 110, 20, 20)):
        """Zoom and pan so every node and group is visible right of the sidebar and under the top bar."""
        self.driver.execute_script("""
            const [left, top, right, bottom] = arguments[0];
            const c = window.app.canvas; const g = window.app.graph;
            const boxes = g._nodes.map(n => Array.from(n.getBounding()))
              .concat((g._groups || []).map(gr => Array.from(gr._bounding || gr.boundingRect || [])).filter(b => b.length === 4));
            const x0 = Math.min(...boxes.map(b => b[0])), y0 = Math.min(...boxes.map(b => b[1]));
            const x1 = Math.max(...boxes.map(b => b[0] + b[2])), y1 = Math.max(...boxes.map(b => b[1] + b[3]));
            const dpr = window.devicePixelRatio || 1;
            const w = c.canvas.width / dpr - left - right, h = c.canvas.height / dpr - top - bottom;
            const scale = Math.min(w / (x1 - x0), h / (y1 - y0), 1.0);
            c.ds.scale = scale;
            c.ds.offset[0] = left / scale - x0 + (w / scale - (x1 - x0)) / 2;
            c.ds.offset[1] = top / scale - y0;
            c.setDirty(true, true); c.draw(true, true);""", list(margins))
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
    requests.post(f"{comfy_server.url}/settings", json=FRONTEND_SETTINGS, timeout=10)
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
    frontend.close_dialogs()
    frontend.problems()                                   # drain what came before
    frontend.load_workflow(workflow, path.name)
    nodes = frontend.nodes()
    problems = frontend.problems()
    messages = frontend.ui_messages()
    frontend.close_dialogs()
    frontend.fit_view()
    frontend.screenshot(ARTIFACTS / (path.stem + ".png"))
    allowed = THIRD_PARTY_TYPES if path.parent.name == "extras" else set()
    unknown = {n["type"] for n in nodes if not n["known"]} - allowed
    assert not unknown, f"{path.name}: node types the frontend does not know: {sorted(unknown)}"
    if allowed:   # the missing-nodes dialog names exactly the third-party nodes
        messages = [m for m in messages if not all(t in m for t in allowed & {n["type"] for n in nodes})]
    assert not problems, f"{path.name}: while loading:\n" + "\n".join(problems)
    assert not messages, f"{path.name}: error toasts or dialogs:\n" + "\n".join(messages)
    long_titles = [n["title"] for n in nodes if len(n["title"] or "") > MAX_TITLE]
    assert not long_titles, f"{path.name}: titles over {MAX_TITLE} characters: {long_titles}"
    overlaps = overlapping_pairs(nodes)
    assert not overlaps, f"{path.name}: {len(overlaps)} overlapping node pairs:\n" + "\n".join(overlaps)


@pytest.mark.parametrize("path", sorted(WORKFLOWS_DIR.glob("*.json")), ids=lambda p: p.name)
def test_template_thumbnail_is_served(frontend, comfy_server, path):
    """The template browser lists the pack's workflows/ and shows <name>.jpg from there as the thumbnail."""
    from headless_server import PACK_DIR_NAME
    listed = comfy_server.get("/workflow_templates").get(PACK_DIR_NAME, [])
    assert path.stem in listed, f"{path.name} is not in the template browser's list {listed}"
    assert path.with_suffix(".jpg").is_file(), \
        f"workflows/{path.stem}.jpg missing: run python tests/test_browser.py --thumbnails"
    frontend.problems()
    result = frontend.driver.execute_async_script("""
        const done = arguments[arguments.length - 1];
        const img = new Image();
        img.onload = () => done({ok: true, w: img.naturalWidth, h: img.naturalHeight});
        img.onerror = () => done({ok: false});
        img.src = '/api/workflow_templates/' + arguments[0] + '/' + arguments[1] + '.jpg';""",
        PACK_DIR_NAME, path.stem)
    assert result["ok"] and result["w"] > 0, f"{path.stem}.jpg did not load in the frontend: {result}"
    assert not frontend.problems()


def test_template_browser_shows_the_packs_thumbnails(frontend):
    """Templates → the pack's category: one card per workflow, each thumbnail loaded."""
    from headless_server import PACK_DIR_NAME
    frontend.close_dialogs()
    frontend.problems()
    frontend.driver.execute_script("window.app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    deadline = time.monotonic() + 20
    clicked = False
    while time.monotonic() < deadline and not clicked:
        time.sleep(0.5)
        clicked = frontend.driver.execute_script("""
            const item = Array.from(document.querySelectorAll('.p-dialog span, .p-dialog button, .p-dialog li'))
              .find(e => e.children.length === 0 && (e.innerText || '').trim() === arguments[0]);
            if (item) item.click();
            return !!item;""", PACK_DIR_NAME)
    assert clicked, f"no '{PACK_DIR_NAME}' category in the template browser"
    time.sleep(3)
    frontend.screenshot(ARTIFACTS / "template_browser.png")
    names = sorted(p.stem for p in WORKFLOWS_DIR.glob("*.json"))
    seen, widths = set(), []
    for step in range(12):           # the grid renders (and drops) cards as it is scrolled
        state = frontend.driver.execute_script("""
            const texts = Array.from(document.querySelectorAll('.p-dialog *'))
              .filter(e => e.children.length === 0).map(e => (e.innerText || '').trim());
            const widths = Array.from(document.querySelectorAll('.p-dialog img')).filter(i => i.complete)
              .map(i => [i.getAttribute('src') || '', i.naturalWidth]);
            for (const el of document.querySelectorAll('.p-dialog *'))
              if (el.scrollHeight > el.clientHeight + 10) el.scrollTop += 400;
            return {texts, widths};""")
        seen |= set(state["texts"]) & set(names)
        # frontend 1.32 loads thumbnails by URL, 1.27 (ComfyUI 0.3.64) through blob: URLs and keeps empty-src
        # placeholder <img>s in the grid: every image with a source must have loaded
        widths += [(src, w) for src, w in state["widths"] if src]
        time.sleep(0.8)
    problems = frontend.problems()
    frontend.close_dialogs()
    assert seen == set(names), f"template cards missing: {sorted(set(names) - seen)}"
    assert widths and all(w > 0 for _, w in widths), \
        f"thumbnails that did not load: {sorted({src for src, w in widths if w == 0})}"
    assert not problems, "while browsing the templates:\n" + "\n".join(problems)


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

# ----------------------------------------------------------------------------------------------
# Layout (python tests/test_browser.py --layout)
# ----------------------------------------------------------------------------------------------

OUTPUT_TYPES = ("SaveImage", "PreviewImage", "SaveVideo")
NOT_LAID_OUT = {"quickstart_digits_ab.json"}   # laid out by hand by its owner (tools/quickstart.py)
UI_ONLY = ("Note", "MarkdownNote")
GAP_X, GAP_Y = 60, 40            # between node boxes
GROUP_PAD, GROUP_TITLE = 20, 40  # group padding and title bar
OUTPUT_SIZE = (420, 460)         # output nodes large enough to show the images side by side
GROUP_COLORS = {"A": "#3f789e", "B": "#8A8", "C": "#a1309b", "Results": "#b58b2a"}


def _branch(title: str | None) -> str | None:
    head = (title or "").split(":", 1)[0].strip()
    return head if head in ("A", "B") and ":" in (title or "") else None


def layout(workflow: dict, measured: dict) -> dict:
    """Place every node of a UI workflow from the frontend's boxes `measured` {id: node()}: a Note on top;
    the shared nodes in columns by link depth on the left; each branch (the nodes that feed only the A or only
    the B outputs, named by the outputs' "A:"/"B:" titles) in its own band and group; all outputs side by side
    on the right, in a Results group. Returns the workflow with new positions, sizes and groups."""
    nodes = {n["id"]: n for n in workflow["nodes"]}
    parents = {i: set() for i in nodes}
    children = {i: set() for i in nodes}
    for link in workflow["links"]:
        src, dst = link[1], link[3]
        parents[dst].add(src)
        children[src].add(dst)

    depth = {}

    def _depth(i):
        if i not in depth:
            depth[i] = 0 if not parents[i] else 1 + max(_depth(p) for p in parents[i])
        return depth[i]

    for i in nodes:
        _depth(i)

    def _reaches(i, seen=None):
        seen = set() if seen is None else seen
        for c in children[i]:
            if c not in seen:
                seen.add(c)
                _reaches(c, seen)
        return seen

    outputs = [i for i, n in nodes.items() if n["type"] in OUTPUT_TYPES]
    notes = [i for i, n in nodes.items() if n["type"] in UI_ONLY]
    branch_of_output = {i: _branch(nodes[i].get("title")) for i in outputs}
    branch = {}
    for i in nodes:
        if i in outputs or i in notes:
            continue
        labels = {branch_of_output[o] for o in _reaches(i) & set(outputs) if branch_of_output[o]}
        branch[i] = labels.pop() if len(labels) == 1 else None
    shared = [i for i, b in branch.items() if b is None]
    bands = sorted({b for b in branch.values() if b})

    def box(i):
        return measured[i]["box"]

    def place(i, x, y):
        """Put node i's box (title bar included) at x, y."""
        m = measured[i]
        dx, dy = m["pos"][0] - m["box"][0], m["pos"][1] - m["box"][1]
        nodes[i]["pos"] = [round(x + dx), round(y + dy)]
        nodes[i]["size"] = [round(v) for v in m["size"]]
        return x, y, m["box"][2], m["box"][3]

    placed = {}
    y_top = 0
    for i in notes:                                   # the explanation first
        placed[i] = place(i, 0, y_top)
        y_top += box(i)[3] + GAP_Y
    y_top += GROUP_TITLE

    def columns(ids, x0, y0):
        """Columns by depth, stacked top-down; returns the right edge and the bottom."""
        by_col = {}
        for i in sorted(ids, key=lambda i: (depth[i], i)):
            by_col.setdefault(depth[i], []).append(i)
        x, bottom = x0, y0
        for col in sorted(by_col):
            y, width = y0, 0
            for i in by_col[col]:
                placed[i] = place(i, x, y)
                y += box(i)[3] + GAP_Y
                width = max(width, box(i)[2])
            bottom = max(bottom, y - GAP_Y)
            x += width + GAP_X
        return x - GAP_X, bottom

    right, bottom = columns(shared, 0, y_top) if shared else (-GAP_X, y_top)
    groups = []
    x_branch = right + GAP_X + GROUP_PAD
    y = y_top
    branch_right = x_branch
    for b in bands:
        ids = [i for i, lb in branch.items() if lb == b]
        min_depth = min(depth[i] for i in ids)
        for i in ids:
            depth[i] -= min_depth
        r, btm = columns(ids, x_branch, y)
        title = next(nodes[o]["title"] for o in outputs if branch_of_output[o] == b)
        groups.append((title, ids, b))
        branch_right = max(branch_right, r)
        y = btm + GAP_Y + 2 * GROUP_PAD + GROUP_TITLE
    x = (branch_right if bands else right) + GAP_X + 2 * GROUP_PAD
    order = sorted(outputs, key=lambda o: (branch_of_output[o] is None, branch_of_output[o] or "", o))
    for o in order:
        placed[o] = place(o, x, y_top)
        x += box(o)[2] + GAP_X
    if bands:
        groups.append(("Results: " + " | ".join(nodes[o]["title"].split(":")[0] for o in order if branch_of_output[o])
                       + " side by side", outputs, "Results"))
    workflow["groups"] = []
    for title, ids, key in groups:
        x0 = min(placed[i][0] for i in ids) - GROUP_PAD
        y0 = min(placed[i][1] for i in ids) - GROUP_PAD - GROUP_TITLE
        x1 = max(placed[i][0] + placed[i][2] for i in ids) + GROUP_PAD
        y1 = max(placed[i][1] + placed[i][3] for i in ids) + GROUP_PAD
        workflow["groups"].append({"title": title, "bounding": [x0, y0, x1 - x0, y1 - y0],
                                   "color": GROUP_COLORS.get(key, "#3f789e"), "font_size": 24, "flags": {}})
    workflow.setdefault("extra", {})["ds"] = {"scale": 0.6, "offset": [40, 40]}
    return workflow


def _selected(path: Path, only) -> bool:
    """`--only NAME[,NAME…]`: just these workflows (file stems), so a tool run leaves the others untouched."""
    return not only or path.stem in only


def relayout(url: str, only=None) -> None:
    page = Frontend(url)
    try:
        page.open()
        for path in UI_WORKFLOWS:
            if path.name in NOT_LAID_OUT or not _selected(path, only):
                continue
            workflow = json.loads(path.read_text(encoding="utf-8"))
            for n in workflow["nodes"]:
                if n["type"] in OUTPUT_TYPES:
                    n["size"] = [max(n["size"][0], OUTPUT_SIZE[0]), max(n["size"][1], OUTPUT_SIZE[1])]
            page.load_workflow(workflow, path.name)
            measured = {n["id"]: n for n in page.nodes()}
            layout(workflow, measured)
            path.write_text(json.dumps(workflow, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
            sys.stdout.write(f"laid out {path.relative_to(PACK_ROOT)}\n")
    finally:
        page.quit()


# ----------------------------------------------------------------------------------------------
# Thumbnails for the template browser (python tests/test_browser.py --thumbnails)
# ----------------------------------------------------------------------------------------------
# ComfyUI serves a pack's workflows/ folder at /api/workflow_templates/<pack folder>/ and the frontend shows
# <workflow name>.jpg from there as the template's thumbnail (mediaSubtype "jpg" for custom-node templates).

THUMB_SIZE = (512, 384)
TINY_LABEL = "TINY TEST MODEL (random weights)\nshows that the graph runs, not the technique"


def _label_image(images: dict, title: str, label: str):
    """images {caption: HxWx3 uint8} side by side under a title, with `label` in a red band at the bottom."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    def font(size):
        try:
            return ImageFont.load_default(size=size)
        except TypeError:                     # Pillow < 10.1: one bitmap size
            return ImageFont.load_default()

    canvas = Image.new("RGB", THUMB_SIZE, (28, 28, 28))
    draw = ImageDraw.Draw(canvas)
    draw.text((14, 10), title, fill=(240, 240, 240), font=font(26))
    n = max(1, len(images))
    cell = min((THUMB_SIZE[0] - 14 * (n + 1)) // n, THUMB_SIZE[1] - 150)
    x = (THUMB_SIZE[0] - n * cell - (n - 1) * 14) // 2
    for caption, array in images.items():
        tile = Image.fromarray(np.asarray(array)[..., :3]).resize((cell, cell), Image.NEAREST)
        canvas.paste(tile, (x, 50))
        draw.text((x, 56 + cell), caption[:max(8, cell // 9)], fill=(220, 220, 220), font=font(16))
        x += cell + 14
    draw.rectangle([0, THUMB_SIZE[1] - 64, THUMB_SIZE[0], THUMB_SIZE[1]], fill=(150, 30, 30))
    for i, line in enumerate(label.split("\n")):
        draw.text((14, THUMB_SIZE[1] - 58 + 28 * i), line, fill=(255, 255, 255), font=font(22))
    return canvas


def make_thumbnails(server, only=None) -> None:
    from headless_server import load_api_workflow
    for path in sorted(WORKFLOWS_DIR.glob("*.json")):
        if not _selected(path, only):
            continue
        api_path = WORKFLOWS_DIR / "api" / path.name
        digits = "digits" in path.name
        entry = None
        for size in (64, 128):        # 128: ASGDiffusion needs 64 px per patch side
            try:
                producer = api_path.with_name(api_path.name.replace("_2_apply_", "_1_fit_"))
                if producer != api_path:
                    server.run_prompt(load_api_workflow(producer, size=size, steps=4), timeout=600)
                prompt = load_api_workflow(api_path, family_swaps=not digits, size=None if digits else size,
                                           steps=None if digits else 4)
                entry = server.run_prompt(prompt, timeout=600)
                break
            except Exception as error:   # noqa: BLE001  (a report per workflow; the others still get theirs)
                message = str(error)
                found = message.find("exception_message")
                sys.stdout.write(f"no thumbnail for {path.name} at {size} px: "
                                 f"{message[found:found + 400] if found >= 0 else message[:400]}\n")
        if entry is None:
            continue
        titles = {str(n["id"]): n.get("title") or n["type"] for n in json.loads(path.read_text())["nodes"]}
        images = {titles.get(node_id, node_id): arrays[0]
                  for node_id, arrays in server.images_by_node(entry).items()}
        images = dict(sorted(images.items()))
        label = "the pack's digits model (real weights)\n8x8 digits, upscaled" if digits else TINY_LABEL
        _label_image(images, path.stem, label).save(path.with_suffix(".jpg"), quality=85)
        sys.stdout.write(f"wrote {path.with_suffix('.jpg').relative_to(PACK_ROOT)}\n")


def _main(argv) -> int:
    only = None
    if "--only" in argv:
        i = argv.index("--only")
        only = set(argv[i + 1].replace(".json", "").split(","))
        argv = argv[:i] + argv[i + 2:]
    if "--layout" in argv or "--thumbnails" in argv:
        sys.path.insert(0, str(TESTS_DIR))
        import headless_server
        import host
        comfy = host.find_comfyui()
        ckpt = headless_server.ensure_tiny_files(comfy) if "--thumbnails" in argv else None
        with headless_server.ComfyServer(comfy, startup_timeout=180, sd15_checkpoint=ckpt) as server:
            if "--layout" in argv:
                import requests
                requests.post(f"{server.url}/settings", json=FRONTEND_SETTINGS, timeout=10)
                relayout(server.url, only)
            if "--thumbnails" in argv:
                make_thumbnails(server, only)
        return 0
    return pytest.main([__file__, "-q", *argv])


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
