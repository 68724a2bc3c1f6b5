"""The samantic command: CliRunner for the Typer app, plus real subprocess runs of the installed command."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from samantic.cli.main import app

runner = CliRunner()


def test_help_lists_command_groups():
    r = runner.invoke(app, ["--help"])
    assert r.exit_code == 0
    for name in ("doctor", "demo", "weights"):
        assert name in r.output


def _commands(command, path):
    yield path, command
    for name, sub in getattr(command, "commands", {}).items():
        yield from _commands(sub, path + [name])


def test_help_texts_survive_rich_markup():
    """Typer renders help as Rich markup, which silently drops a lowercase [tag]: "[default: 0.6]" or "samantic[ray]"
    vanished from --help until escaped as \\[."""
    from rich.text import Text
    from typer.main import get_command

    checked = 0
    for path, command in _commands(get_command(app), ["samantic"]):
        texts = [command.help or ""] + [getattr(p, "help", None) or "" for p in command.params]
        for text in texts:
            checked += "[" in text
            assert Text.from_markup(text).plain == text.replace("\\[", "["), (" ".join(path), text)
    assert checked > 10


def test_every_command_and_option_has_help():
    from typer.main import get_command

    missing = []
    for path, command in _commands(get_command(app), ["samantic"]):
        if not command.help:
            missing.append(" ".join(path))
        missing += [f"{' '.join(path)} {p.name}" for p in command.params if not getattr(p, "help", None)]
    assert not missing


def test_segment_help_shows_the_documented_defaults():
    r = runner.invoke(app, ["segment", "--help"], env={"COLUMNS": "400"}, terminal_width=400)
    assert r.exit_code == 0
    assert "[default: 32, or the grid a --samcp head was trained with]" in r.output
    assert "samantic[ray]" in r.output


def test_doctor_json_reports_backends():
    r = runner.invoke(app, ["doctor", "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    kernels = report["kernels"]
    assert "cpu" in kernels["compiled"]
    assert kernels["usable"]["cpu"]["usable"] is True
    from samantic import _C

    # the report agrees with the compiled module itself
    assert kernels["compiled"] == list(_C.build_info()["compiled_backends"])
    # CUDA is usable where a device is visible and this build's kernels load on it
    n = _C.cuda_status()["device_count"]
    assert kernels["usable"]["cuda"]["usable"] == (n > 0 and all(p["kernels_load"] for p in _C.cuda_probe()))
    if "cuda" in kernels["compiled"]:  # the compiled archs: machine code (SASS) and PTX
        archs = kernels["cuda_archs"]
        assert set(archs) == {"sass", "ptx"} and (archs["sass"] or archs["ptx"])
    names = {p["package"] for p in report["packages"]}
    assert {"numpy", "torch", "segment-anything", "onnxruntime", "tensorrt"} <= names


def _samantic_exe() -> str:
    exe = Path(sys.executable).parent / "samantic"
    if exe.exists():
        return str(exe)
    found = shutil.which("samantic")
    if not found:
        pytest.skip("the samantic console script is not installed")
    return found


def test_installed_command_doctor_subprocess():
    out = subprocess.run([_samantic_exe(), "doctor", "--json"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert "cpu" in report["kernels"]["compiled"]
    table = subprocess.run([_samantic_exe(), "doctor"], capture_output=True, text=True, timeout=120)
    assert table.returncode == 0, table.stderr
    assert "Kernel backends" in table.stdout and "cuda" in table.stdout


def test_installed_command_demo_writes_coco_results(tmp_path):
    from pycocotools import mask as mask_utils

    from samantic.demo import demo_images

    out = subprocess.run([_samantic_exe(), "demo", "--out", str(tmp_path), "--no-progress"], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "samantic segment" in out.stdout
    for image in demo_images():
        data = json.loads((tmp_path / f"{image.name}.json").read_text())
        assert data["image"]["height"] == 384 and data["image"]["width"] == 512
        assert data["annotations"], f"no masks on {image.name}"
        for rec in data["annotations"]:
            m = mask_utils.decode(rec["segmentation"])
            assert m.shape == (384, 512) and int(m.sum()) == rec["area"] > 0
        assert (tmp_path / f"{image.name}.overlay.png").stat().st_size > 1000


def test_demo_bad_image_is_one_clear_error(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png at all")
    r = runner.invoke(app, ["demo", "--image", str(bad), "--out", str(tmp_path / "o")])
    assert r.exit_code == 1
    assert "broken.png" in r.output and "not a readable image" in r.output
    assert not (tmp_path / "o" / "broken.png.json").exists()
