"""The Python API where a user looks: ``from samantic import Segmenter`` and the README's examples.

The README's ```python blocks are executed as written, in a working directory
prepared the way the README says (a photo, a bundle exported from the shipped
sam_nano), and their results are checked.
"""

import ast
import builtins
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
DEMO = Path(__file__).resolve().parents[1] / "sdk" / "samantic" / "assets" / "demo"
HEAVY = ("torch", "onnxruntime", "cv2")


def python_blocks(text: str):
    """(first line number, code) of every fenced ```python block."""
    blocks = []
    for m in re.finditer(r"^```python[ \t]*\n(.*?)^```[ \t]*$", text, flags=re.S | re.M):
        blocks.append((text[: m.start()].count("\n") + 2, m.group(1)))
    return blocks


def undefined_names(code: str):
    """Names a block reads that it never binds (and that are not builtins): what a reader cannot run."""
    tree = ast.parse(code)
    bound = set(dir(builtins))
    missing = []
    # statements run top to bottom; a name must be bound by an earlier statement (or earlier in the same one)
    for stmt in tree.body:
        loads, stores = [], set()
        for node in ast.walk(stmt):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
                loads.append(node.id)
            elif isinstance(node, ast.Name):
                stores.add(node.id)
            elif isinstance(node, ast.alias):
                stores.add((node.asname or node.name).split(".")[0])
            elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                stores.add(node.name)
            elif isinstance(node, ast.arg):
                stores.add(node.arg)
        missing += [n for n in loads if n not in bound and n not in stores]
        bound |= stores
    return sorted(set(missing))


def test_readme_has_python_blocks_that_name_only_what_they_define():
    blocks = python_blocks(README.read_text())
    assert blocks, "README.md has no ```python block"
    for line, code in blocks:
        compile(code, f"README.md:{line}", "exec")
        assert undefined_names(code) == [], f"README.md block at line {line} uses undefined names"


def test_undefined_names_catches_what_a_reader_could_not_run():
    assert undefined_names("import numpy as np\nx = np.zeros(3)\ny = seg(image)\n") == ["image", "seg"]
    assert undefined_names("from a.b import c\nd = [c(i) for i in range(3)]\n") == []


def test_import_is_light_and_segmenter_is_at_the_top():
    code = (
        "import sys, samantic\n"
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "from samantic import Segmenter, Result, Bundle, BundleError, read_image, ImageReadError\n"
        "import samantic.runtime, samantic.io\n"
        "assert Segmenter is samantic.runtime.Segmenter and read_image is samantic.io.read_image\n"
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "assert not heavy, heavy\n"  # the runtime itself is torch-, onnxruntime- and OpenCV-free until used
        "assert set(samantic.__all__) <= set(dir(samantic)), set(samantic.__all__) - set(dir(samantic))\n"
        "for name in samantic.__all__:\n"
        "    getattr(samantic, name)\n"
        "try:\n"
        "    samantic.Segmentor\n"
        "except AttributeError as e:\n"
        "    assert 'Segmentor' in str(e)\n"
        "else:\n"
        "    raise AssertionError('no AttributeError')\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


@pytest.mark.slow  # segment-everything twice at 32 x 32 points: about a minute on 2 busy CPU cores
def test_readme_python_blocks_run_as_written(tmp_path, monkeypatch):
    from PIL import Image

    from samantic.export.bundle import export_bundle

    # step: the working directory the README assumes: a photo and a bundle of the shipped sam_nano
    Image.open(DEMO / "scene_900001.png").convert("RGB").save(tmp_path / "photo.jpg", quality=95)
    export_bundle("sam_nano", tmp_path / "bundles" / "nano", int8=False)
    monkeypatch.chdir(tmp_path)
    blocks = python_blocks(README.read_text())
    assert blocks
    for line, code in blocks:
        scope = {"__name__": "__readme__"}
        exec(compile(code, f"README.md:{line}", "exec"), scope)
    # step: what the last block promised
    image = scope["image"]
    assert image.dtype == np.uint8 and image.shape == (384, 512, 3)
    assert scope["masks"] and all(m["segmentation"].shape == image.shape[:2] for m in scope["masks"])
    coco = scope["coco"]
    assert 1 <= len(coco) <= 3 and all(c["size"] == [384, 512] and isinstance(c["counts"], str) for c in coco)
    result = scope["result"]
    assert len(result) > 0 and result.masks.rles.to_dicts(compressed=True)[0]["size"] == [384, 512]
    shutil.rmtree(tmp_path / "bundles")
