"""Node help pages (web/docs/<node id>.md, served through WEB_DIRECTORY to ComfyUI's node help panel): one per
node of the pack, not empty, and exactly what tools/gen_docs.py generates from the node declarations (so no
default or range is typed by hand)."""
from __future__ import annotations

import importlib.util

import pytest

import host

DOCS_DIR = host.PACK_ROOT / "web" / "docs"


@pytest.fixture(scope="module")
def gen_docs():
    spec = importlib.util.spec_from_file_location("tfg_gen_docs", host.PACK_ROOT / "tools" / "gen_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def generated(comfy_root, gen_docs):
    return gen_docs.generate(str(comfy_root))


def test_web_directory_is_declared():
    source = (host.PACK_ROOT / "__init__.py").read_text()
    assert 'WEB_DIRECTORY = "./web"' in source


def test_every_node_has_a_page(generated):
    nodes = host.module_node_classes(host.load_pack())
    assert {f"{n}.md" for n in nodes} == set(generated)
    for name in generated:
        path = DOCS_DIR / name
        assert path.is_file(), f"web/docs/{name} missing: run python tools/gen_docs.py"
        text = path.read_text(encoding="utf-8")
        assert "## What it does" in text and "## Inputs" in text and len(text) > 500, name


def test_committed_pages_equal_the_generator(generated):
    committed = {p.name for p in DOCS_DIR.glob("*.md")}
    assert committed == set(generated), f"stale or missing pages: {sorted(committed ^ set(generated))}"
    differ = [n for n, text in generated.items() if (DOCS_DIR / n).read_text(encoding="utf-8") != text]
    assert not differ, f"out of date (run python tools/gen_docs.py): {differ}"


def test_every_node_has_a_written_part(gen_docs, generated):
    missing = [n[:-3] for n in generated if n[:-3] not in gen_docs.NOTES]
    assert not missing, f"add a summary and modes to NOTES in tools/gen_docs.py for {missing}"


def test_input_tables_list_every_input(generated):
    for node_id, cls in host.module_node_classes(host.load_pack()).items():
        text = generated[f"{node_id}.md"]
        for item in cls.GET_SCHEMA().inputs:
            assert f"| `{item.id}` |" in text, f"{node_id}: input {item.id} not in its help page"
