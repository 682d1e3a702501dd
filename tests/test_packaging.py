"""Packaging rules of the pack: metadata, dependencies, import hygiene, stable node ids."""
from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import tomllib


import host

ROOT = host.PACK_ROOT
PACK_SOURCES = [p for p in ROOT.rglob("*.py")   # hidden folders (.git, caches, local staging) are not the pack
                if "tests" not in p.relative_to(ROOT).parts
                and not any(part.startswith(".") for part in p.relative_to(ROOT).parts)]


def _requirements() -> list[str]:
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def test_pyproject_dependencies_mirror_requirements():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["dependencies"] == _requirements()
    assert "dynamic" not in project["project"]


def test_pyproject_registry_metadata():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    name = meta["project"]["name"]
    assert "comfyui" not in name.lower()
    assert re.fullmatch(r"[a-zA-Z0-9](?:[a-zA-Z0-9._-]*[a-zA-Z0-9])?", name) and len(name) < 100
    comfy = meta["tool"]["comfy"]
    for key in ("PublisherId", "DisplayName", "Icon", "requires-comfyui"):
        assert comfy.get(key), key
    assert meta["project"]["urls"]["Repository"]


def test_no_torch_or_numpy_pins():
    for req in _requirements():
        assert not re.match(r"(torch|torchvision|numpy)\b", req), req


def test_init_exports_only_the_v3_entrypoint_and_imports_lightly():
    tree = ast.parse((ROOT / "__init__.py").read_text())
    names = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    assigned = {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
    assert "comfy_entrypoint" in names and "NODE_CLASS_MAPPINGS" not in assigned
    top_imports = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert not top_imports, "the pack's __init__ must not import anything at module level"


def test_pack_import_without_comfyui_is_fast():
    code = ("import sys, time, importlib.util; t=time.perf_counter(); "
            f"spec=importlib.util.spec_from_file_location('p', {str(ROOT / '__init__.py')!r}, "
            f"submodule_search_locations=[{str(ROOT)!r}]); m=importlib.util.module_from_spec(spec); "
            "spec.loader.exec_module(m); print(time.perf_counter()-t); "
            "assert 'comfy' not in sys.modules and 'torch' not in sys.modules")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert float(out.stdout.strip()) < 0.3


def test_kernels_do_not_import_comfyui():
    for path in (ROOT / "kernels").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            mods = []
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                mods = [node.module or ""]
            for m in mods:
                assert m.split(".")[0] not in {"comfy", "comfy_api", "comfy_extras", "folder_paths", "nodes",
                                               "server", "execution"}, f"{path}: imports {m}"


def test_pack_uses_relative_imports_and_logging():
    for path in PACK_SOURCES:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                assert (node.module or "").split(".")[0] not in {"nodes", "kernels"}, f"{path}: absolute import"
            if isinstance(node, ast.Import):
                assert all(a.name.split(".")[0] not in {"kernels"} for a in node.names), path
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id != "print", f"{path}: print() in the pack"


def test_node_ids_and_inputs_match_the_golden_schema(comfy_root):
    """Shipped node ids and input ids never change; new ones are added to the golden file."""
    import asyncio
    extension = asyncio.run(host.load_pack().comfy_entrypoint())
    current = {}
    for node in asyncio.run(extension.get_node_list()):
        schema = node.GET_SCHEMA()
        current[schema.node_id] = [i.id for i in schema.inputs]
        assert schema.node_id.startswith("TFG_")
        assert schema.description and all(i.tooltip for i in schema.inputs), schema.node_id
    golden = json.loads((ROOT / "tests" / "golden" / "node_schema.json").read_text())
    for node_id, inputs in golden.items():
        assert node_id in current, f"shipped node {node_id} disappeared"
        assert current[node_id][:len(inputs)] == inputs, f"{node_id}: shipped inputs changed"
    missing = set(current) - set(golden)
    assert not missing, f"add new nodes to tests/golden/node_schema.json: {sorted(missing)}"


def test_the_runner_is_a_tool_left_out_of_the_registry_package():
    """tools/headless (and its requirements) are development tools: not at the pack root, not shipped."""
    assert not (ROOT / "headless.py").exists()
    assert (ROOT / "tools" / "headless" / "__main__.py").is_file()
    ignored = {line.strip() for line in (ROOT / ".comfyignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {"tools/headless/", "tools/requirements.txt", "tests/", ".ci/"} <= ignored
    runner_reqs = (ROOT / "tools" / "requirements.txt").read_text().split()
    assert "requests" in runner_reqs and "websocket-client" in runner_reqs
