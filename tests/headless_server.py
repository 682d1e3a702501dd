"""A real ComfyUI server in a subprocess, for headless acceptance tests.

`ComfyServer` starts `main.py --cpu` (through the pack's one launcher, tools/headless/server.py) on a free
loopback port with its own base directory, in which
the pack (repo root, as custom_nodes/tfg_guidance), the test-only pack (tests/testing_pack, as
custom_nodes/tfg_testing_pack) and the tiny SD1.5 checkpoint (models/checkpoints/tiny_sd15.safetensors)
are linked. tests/conftest.py registers this module as a plugin, so `comfy_server` is one server per session.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from io import BytesIO
from pathlib import Path

import pytest

logger = logging.getLogger(__name__)

TESTS_DIR = Path(__file__).resolve().parent
PACK_ROOT = TESTS_DIR.parent
WORKFLOWS_API_DIR = PACK_ROOT / "workflows" / "api"
PACK_DIR_NAME = "tfg_guidance"
TESTING_PACK_DIR_NAME = "tfg_testing_pack"
TINY_SD15_NAME = "tiny_sd15.safetensors"
READY_NODE = "TFG_AdaptiveGuidance"
HOST = "127.0.0.1"

TINY_LOADERS = {"sdxl": "TFGTest_TinySDXLLoader", "flux": "TFGTest_TinyFluxLoader", "sd3": "TFGTest_TinySD3Loader",
                "wan21": "TFGTest_TinyWan21Loader", "qwen_image": "TFGTest_TinyQwenImageLoader"}
# the family a workflow's file name ends with (ag_ab_sdxl.json, ag_ab_qwen_image.json); longest first
FAMILIES = ("qwen_image", "wan21", "sd15", "sdxl", "sd3", "flux")
# loader class -> {its output index: output index of a TFGTest_Tiny*Loader (MODEL 0, CLIP 1, VAE 2)}
_LOADER_OUTPUTS = {
    "CheckpointLoaderSimple": {0: 0, 1: 1, 2: 2},
    "UNETLoader": {0: 0},
    "CLIPLoader": {0: 1},
    "DualCLIPLoader": {0: 1},
    "TripleCLIPLoader": {0: 1},
    "VAELoader": {0: 2},
}
_LATENT_NODES = ("EmptyLatentImage", "EmptySD3LatentImage", "EmptyHunyuanLatentVideo")
VIDEO_FRAMES = 5                 # `length` of shrunk video latents: 2 latent frames (Wan's VAE packs 4 per latent)
VIDEO_EXTENSIONS = (".mp4", ".webm", ".mov", ".mkv")


def ensure_tiny_files(comfy_path: Path) -> Path:
    """The cached tiny SD1.5 checkpoint (and the tiny SD3 file the testing pack loads), built in this
    process through ComfyUI's classes if they are not cached yet."""
    import tiny_models
    sd15 = tiny_models.CACHE_DIR / f"tiny_sd15_{tiny_models.CACHE_VERSION}.safetensors"
    sd3 = tiny_models.CACHE_DIR / f"tiny_sd3_{tiny_models.CACHE_VERSION}.safetensors"
    if not (sd15.is_file() and sd3.is_file()):
        import host
        host.setup_inprocess_comfyui(Path(comfy_path))
        sd15 = tiny_models.tiny_sd15_checkpoint()
        tiny_models.tiny_sd3_file()
    return sd15


def server_threads() -> str:
    """One intra-op thread unless told otherwise (TFG_SERVER_THREADS, else OMP_NUM_THREADS): the tiny models
    gain little from more, and on a busy 2-core machine OpenMP's spin-waiting made 2 threads ~6x slower."""
    return os.environ.get("TFG_SERVER_THREADS") or os.environ.get("OMP_NUM_THREADS") or "1"


class ComfyServer:
    """`with ComfyServer(comfy_path) as server: server.run_prompt(prompt)`.

    The process is started and stopped by the runner's launcher (tools/headless/server.py, `LocalComfyUI`: the
    one launcher of the pack); this class adds the test base directory and the HTTP helpers."""

    def __init__(self, comfy_path, startup_timeout: float = 240.0, extra_args=(), sd15_checkpoint=None):
        self.comfy_path = Path(comfy_path)
        self.startup_timeout = startup_timeout
        self.extra_args = list(extra_args)
        self.sd15_checkpoint = Path(sd15_checkpoint) if sd15_checkpoint else None
        self.base = None
        self.port = None
        self.url = None
        self.launcher = None

    @property
    def proc(self):
        return self.launcher.proc if self.launcher is not None else None

    # -- lifecycle ------------------------------------------------------------------------------
    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def _prepare_base(self) -> Path:
        base = Path(tempfile.mkdtemp(prefix="tfg_comfy_"))
        (base / "custom_nodes").mkdir()
        os.symlink(PACK_ROOT, base / "custom_nodes" / PACK_DIR_NAME, target_is_directory=True)
        os.symlink(TESTS_DIR / "testing_pack", base / "custom_nodes" / TESTING_PACK_DIR_NAME,
                   target_is_directory=True)
        # the benchmark-only eval-model nodes, so the benchmark's headless graph runs on a real server too
        os.symlink(PACK_ROOT / "benchmarks" / "comfy_nodes", base / "custom_nodes" / "tfg_digits_eval",
                   target_is_directory=True)
        ckpts = base / "models" / "checkpoints"
        ckpts.mkdir(parents=True)
        if self.sd15_checkpoint is not None:
            os.symlink(self.sd15_checkpoint, ckpts / TINY_SD15_NAME)
        for d in ("input", "output", "temp", "user"):
            (base / d).mkdir()
        _write_example_image(base / "input" / "example.png")
        return base

    def start(self, attempts: int = 3) -> None:
        import host
        headless = host.headless()
        self.base = self._prepare_base()
        threads = server_threads()
        self.launcher = headless.LocalComfyUI(
            self.comfy_path, cpu=True, base_directory=self.base, log_path=self.base / "server.log",
            extra_args=["--database-url", "sqlite:///:memory:", "--disable-api-nodes", *self.extra_args],
            startup_timeout=self.startup_timeout, ready_node=READY_NODE, attempts=attempts,
            env={"PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
                 "PYTHONPATH": None})
        try:
            self.launcher.start()
        except headless.HeadlessError as e:
            log = self.log_text()
            self.stop()
            raise RuntimeError(f"ComfyUI server did not become ready: {str(e).splitlines()[0]}\n"
                               f"--- server log (tail) ---\n{log[-6000:]}") from e
        self.port, self.url = self.launcher.port, self.launcher.url
        logger.info("ComfyUI test server ready at %s (base %s)", self.url, self.base)

    def stop(self) -> None:
        if self.launcher is not None:
            self.launcher.stop()
        if self.base is not None and os.environ.get("TFG_KEEP_SERVER_BASE") != "1":
            shutil.rmtree(self.base, ignore_errors=True)
            self.base = None

    def log_text(self) -> str:
        return self.launcher.log_text() if self.launcher is not None else ""

    # -- HTTP API -------------------------------------------------------------------------------
    def get(self, route: str, **params):
        import requests
        r = requests.get(f"{self.url}{route}", params=params or None, timeout=30)
        r.raise_for_status()
        return r.json()

    def post_prompt(self, prompt: dict, client_id: str | None = None) -> tuple[int, dict]:
        import requests
        body = {"prompt": prompt, "client_id": client_id or uuid.uuid4().hex}
        r = requests.post(f"{self.url}/prompt", json=body, timeout=30)
        try:
            data = r.json()
        except ValueError:
            data = {"raw": r.text}
        return r.status_code, data

    def free(self, unload_models: bool = True, free_memory: bool = True, settle: float = 0.5) -> None:
        """POST /free: unload models and (free_memory) reset the executor's output cache. The worker
        applies it between prompts, so this waits `settle` seconds before returning (check with
        `executed_nodes` that a later prompt really ran from scratch)."""
        import requests
        r = requests.post(f"{self.url}/free", json={"unload_models": unload_models, "free_memory": free_memory},
                          timeout=30)
        r.raise_for_status()
        time.sleep(settle)

    def run_prompts(self, prompts: list[dict], timeout: float = 180.0, check: bool = True) -> list[dict]:
        """Queue all prompts at once, wait until every one has finished, return their /history entries
        (in order). Each entry gets "ws_messages": the websocket events [(type, data)] of its prompt."""
        import websocket
        client_id = uuid.uuid4().hex
        ws = websocket.create_connection(f"ws://{HOST}:{self.port}/ws?clientId={client_id}", timeout=10)
        try:
            ids = []
            for p in prompts:
                status, data = self.post_prompt(p, client_id)
                if status != 200 or "prompt_id" not in data:
                    raise RuntimeError(f"POST /prompt failed ({status}): {json.dumps(data)[:4000]}")
                ids.append(data["prompt_id"])
            messages = {pid: [] for pid in ids}
            pending = set(ids)
            deadline = time.monotonic() + timeout
            while pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{len(pending)} prompt(s) not finished after {timeout:.0f} s\n"
                                       f"--- server log (tail) ---\n{self.log_text()[-4000:]}")
                if self.proc is not None and self.proc.poll() is not None:
                    raise RuntimeError(f"server died\n{self.log_text()[-4000:]}")
                ws.settimeout(min(left, 5.0))
                try:
                    raw = ws.recv()
                except websocket.WebSocketTimeoutException:
                    continue
                except (websocket.WebSocketException, OSError) as e:
                    raise RuntimeError(f"websocket failed while waiting: {e!r}\n--- server log (tail) ---\n"
                                       f"{self.log_text()[-4000:]}") from e
                if not isinstance(raw, str):
                    continue                       # binary preview frames
                msg = json.loads(raw)
                data = msg.get("data") or {}
                pid = data.get("prompt_id")
                if pid in messages:
                    messages[pid].append((msg.get("type"), data))
                    if msg.get("type") == "executing" and data.get("node") is None:
                        pending.discard(pid)
        finally:
            ws.close()
        entries = []
        for pid in ids:
            entry = self.history(pid)
            entry["prompt_id"] = pid
            entry["ws_messages"] = messages[pid]
            if check and entry.get("status", {}).get("status_str") != "success":
                raise RuntimeError(f"prompt {pid} failed: {json.dumps(entry.get('status'))[:4000]}")
            entries.append(entry)
        return entries

    def run_prompt(self, prompt: dict, timeout: float = 180.0, check: bool = True) -> dict:
        """Post one prompt, wait on the websocket until it has finished, return its /history entry."""
        return self.run_prompts([prompt], timeout=timeout, check=check)[0]

    def history(self, prompt_id: str, timeout: float = 10.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            h = self.get(f"/history/{prompt_id}")
            if prompt_id in h:
                return h[prompt_id]
            if time.monotonic() > deadline:
                raise TimeoutError(f"no /history entry for {prompt_id}")
            time.sleep(0.1)

    def _view(self, item: dict) -> bytes:
        import requests
        r = requests.get(f"{self.url}/view", params={"filename": item["filename"],
                                                     "subfolder": item.get("subfolder", ""),
                                                     "type": item.get("type", "output")}, timeout=30)
        r.raise_for_status()
        return r.content

    def images_by_node(self, entry: dict) -> dict:
        """{output node id: [HxWxC uint8 arrays]} for every image in a /history entry; a saved video
        (SaveVideo) gives its frames, in order."""
        import numpy as np
        from PIL import Image
        out = {}
        for node_id in sorted(entry.get("outputs", {}), key=_node_sort_key):
            for img in entry["outputs"][node_id].get("images", []):
                content = self._view(img)
                if img["filename"].lower().endswith(VIDEO_EXTENSIONS):
                    out.setdefault(node_id, []).extend(video_frames(content))
                    continue
                with Image.open(BytesIO(content)) as im:
                    out.setdefault(node_id, []).append(np.array(im))
        return out

    def videos_by_node(self, entry: dict) -> dict:
        """{output node id: [TxHxWx3 uint8 arrays]} for every saved video file in a /history entry."""
        import numpy as np
        out = {}
        for node_id in sorted(entry.get("outputs", {}), key=_node_sort_key):
            for item in entry["outputs"][node_id].get("images", []):
                if item["filename"].lower().endswith(VIDEO_EXTENSIONS):
                    out.setdefault(node_id, []).append(np.stack(video_frames(self._view(item))))
        return out

    def latents_by_node(self, entry: dict) -> dict:
        """{output node id: [latent tensors]} for every SaveLatent output of a /history entry."""
        import safetensors.torch
        out = {}
        for node_id in sorted(entry.get("outputs", {}), key=_node_sort_key):
            for lat in entry["outputs"][node_id].get("latents", []):
                out.setdefault(node_id, []).append(safetensors.torch.load(self._view(lat))["latent_tensor"])
        return out

    def image_arrays(self, entry: dict) -> list:
        """All output images of a /history entry as numpy arrays, ordered by output node id."""
        return [a for arrays in self.images_by_node(entry).values() for a in arrays]


def video_frames(content: bytes) -> list:
    """The frames of a video file (bytes) as HxWx3 uint8 arrays, decoded with PyAV (a ComfyUI requirement)."""
    import av
    with av.open(BytesIO(content)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def _node_sort_key(node_id: str):
    return (0, int(node_id), "") if str(node_id).isdigit() else (1, 0, str(node_id))


def executed_nodes(entry: dict) -> set[str]:
    """Node ids that actually ran (not served from the cache) in a run_prompt(s) entry."""
    cached = set()
    for kind, data in entry.get("ws_messages", []):
        if kind == "execution_cached":
            cached.update(str(n) for n in data.get("nodes", []))
    return set(entry.get("prompt", [None, None, {}])[2].keys()) - cached


# ----------------------------------------------------------------------------------------------
# Workflows
# ----------------------------------------------------------------------------------------------

def workflow_family(path) -> str:
    """The family a workflow's file name ends with: "sd15", "sdxl", "sd3", "flux", "wan21" or "qwen_image"
    (ag_ab_sdxl.json -> "sdxl", ag_ab_qwen_image.json -> "qwen_image")."""
    stem = Path(path).stem.lower()
    for family in FAMILIES:
        if stem.endswith("_" + family):
            return family
    raise ValueError(f"{Path(path).name}: cannot tell the model family (expected the name to end with one of "
                     f"{', '.join('_' + f for f in FAMILIES)})")


def swap_loaders(prompt: dict, family: str) -> dict:
    """Replace the model loaders of an API-format prompt by the tiny ones of `family` (in place)."""
    if family == "sd15":
        for node in prompt.values():
            if node.get("class_type") == "CheckpointLoaderSimple":
                node["inputs"]["ckpt_name"] = TINY_SD15_NAME
            elif node.get("class_type") in _LOADER_OUTPUTS:
                raise ValueError(f"no tiny SD1.5 stand-in for {node['class_type']}")
        return prompt
    tiny = TINY_LOADERS[family]
    remap = {}                                   # node id -> {old output index: new}
    for node_id, node in prompt.items():
        if node.get("class_type") in _LOADER_OUTPUTS:
            remap[node_id] = _LOADER_OUTPUTS[node["class_type"]]
            node["class_type"] = tiny
            name = node["inputs"].get("ckpt_name") or node["inputs"].get("unet_name") or ""
            node["inputs"] = {"ckpt_name": str(name)}
    for node in prompt.values():
        for key, value in node.get("inputs", {}).items():
            if isinstance(value, list) and len(value) == 2 and str(value[0]) in remap:
                node["inputs"][key] = [value[0], remap[str(value[0])][value[1]]]
    return prompt


def load_api_workflow(path, family_swaps: bool = True, size: int | None = 64, steps: int | None = None) -> dict:
    """An API-format workflow from workflows/api/, made runnable on the tiny CPU models: loaders
    swapped by the family in the file name, empty latents shrunk to `size` (video latents also to
    VIDEO_FRAMES frames), and (optionally) every `steps` input set to `steps`."""
    path = Path(path)
    if not path.is_absolute() and not path.exists():
        path = WORKFLOWS_API_DIR / path
    prompt = json.loads(path.read_text(encoding="utf-8"))
    if family_swaps and any(node.get("class_type") in _LOADER_OUTPUTS for node in prompt.values()):
        swap_loaders(prompt, workflow_family(path))   # the digits quick start loads its own shipped model
    for node in prompt.values():
        inputs = node.get("inputs", {})
        if size is not None and node.get("class_type") in _LATENT_NODES:
            inputs["width"] = size
            inputs["height"] = size
            if "length" in inputs:
                inputs["length"] = min(inputs["length"], VIDEO_FRAMES)
        if steps is not None and isinstance(inputs.get("steps"), int):
            inputs["steps"] = steps
    return prompt


# ----------------------------------------------------------------------------------------------
# Fixture
# ----------------------------------------------------------------------------------------------

def _write_example_image(path: Path, size: int = 64) -> None:
    """The input image shipped workflows load (`LoadImage example.png`): a deterministic gradient."""
    import numpy as np
    from PIL import Image
    ramp = np.linspace(0, 255, size, dtype=np.uint8)
    pixels = np.stack([np.tile(ramp, (size, 1)), np.tile(ramp[:, None], (1, size)),
                       np.full((size, size), 128, np.uint8)], axis=-1)
    Image.fromarray(pixels).save(path)


@pytest.fixture(scope="session")
def comfy_server(comfy_host_path):
    """One real ComfyUI server for the test session (skips like `comfy_host_path` when no host)."""
    ckpt = ensure_tiny_files(comfy_host_path)
    with ComfyServer(comfy_host_path, sd15_checkpoint=ckpt) as server:
        yield server
