"""tools/device_bundle.py: the trimmed ComfyUI tree a device run carries imports what the benchmarks import,
and stays small enough to travel with the wheels (64 MiB in all)."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[1]


def _bundle():
    spec = importlib.util.spec_from_file_location("tfg_device_bundle", PACK_ROOT / "tools" / "device_bundle.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_selection_keeps_code_and_drops_data_the_benchmarks_never_read():
    bundle = _bundle()
    assert bundle.carried(Path("comfy/samplers.py")) and bundle.carried(Path("nodes.py"))
    assert bundle.carried(Path("comfy/text_encoders/llama.py"))
    assert not bundle.carried(Path("comfy/text_encoders/llama_tokenizer/tokenizer.json"))
    assert not bundle.carried(Path("comfy/sd1_tokenizer/vocab.json"))
    assert not bundle.carried(Path("tests-unit/app_test/x.py")) and not bundle.carried(Path(".git/HEAD"))
    assert not bundle.carried(Path("comfy/__pycache__/sd.cpython-312.pyc"))
    assert not bundle.carried(Path("models/checkpoints/model.safetensors"))
    assert not bundle.carried(Path("extra_model_paths.yaml"))


def test_the_trimmed_tree_imports_what_the_benchmarks_import(comfy_root, tmp_path):
    bundle = _bundle()
    tree = tmp_path / "ComfyUI"
    copied = bundle.copy_host(Path(comfy_root), tree)
    assert copied < 12 * 2 ** 20, copied  # the host tree is ~25 MiB; av's wheel alone is ~34 MiB
    check = ("import sys; sys.path.insert(0, 'benchmarks'); import _host; _host.setup(cpu=True); "
             "_host.host.pack_module('benchmarks.harness'); _host.host.pack_module('nodes.negtome'); "
             "import comfy.supported_models, comfy.samplers, nodes; print('ok')")
    env = dict(os.environ, COMFYUI_PATH=str(tree))
    done = subprocess.run([sys.executable, "-c", check], cwd=PACK_ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]
