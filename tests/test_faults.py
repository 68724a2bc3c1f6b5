"""What batch runs meet in the wild: corrupt and hostile files, and concurrency (threads sharing a
Segmenter, two runs writing one folder). The CLI cases run the installed command in a subprocess."""

import json
import os
import pickle
import subprocess
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
from cli_helpers import run_segment, samantic_exe

FAST = ["--points-per-side", "4", "--no-progress"]






@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from samantic.train.data.shapes import render_scene

    root = tmp_path_factory.mktemp("fault_in")
    for i in range(4):
        cv2.imwrite(str(root / f"im{i}.png"), cv2.cvtColor(render_scene(70 + i, size=(160, 200)).image,
                                                          cv2.COLOR_RGB2BGR))
    return root


class _Payload:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _hostile_files(tmp: Path, marker: Path):
    import torch

    shipped = Path(__import__("samantic").__file__).parent / "assets" / "sam_nano.safetensors"
    data = shipped.read_bytes()
    files = {}
    files["truncated.safetensors"] = data[: len(data) // 2]
    files["empty.safetensors"] = b""
    files["random.pth"] = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    files["code.pth"] = pickle.dumps({"model": _Payload(marker)})  # a plain pickle that would run code
    paths = {}
    for name, blob in files.items():
        (tmp / name).write_bytes(blob)
        paths[name] = tmp / name
    torch.save({"state_dict": {"w": torch.zeros(2)}, "hook": _Payload(marker)}, tmp / "code_torch.pth")
    paths["code_torch.pth"] = tmp / "code_torch.pth"
    return paths


def test_corrupt_and_hostile_weights_give_one_clear_error_and_run_no_code(images, tmp_path):
    from typer.testing import CliRunner

    from samantic.cli.main import app

    marker = tmp_path / "CODE_RAN"
    for name, path in _hostile_files(tmp_path, marker).items():
        for flag in ("--checkpoint", "--head", "--samcp"):
            r = CliRunner().invoke(app, ["segment", str(images / "im0.png"), "--out", str(tmp_path / "o"), flag,
                                         str(path), *FAST], terminal_width=10_000)
            assert r.exit_code == 1 and r.exception is None or isinstance(r.exception, SystemExit), (name, flag)
            errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
            assert r.exit_code == 1 and len(errors) == 1 and str(path) in errors[0], (name, flag, r.output)
            if name.startswith("code") and flag == "--checkpoint":
                assert "nothing in it ran" in errors[0]
            assert not marker.exists(), f"{flag} {name}: unpickling ran code"
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").glob("*.json"))
    # the marker is what the payload would create: prove the payload works when unpickled unsafely
    pickle.loads(pickle.dumps(_Payload(marker)))
    assert marker.exists()


def test_a_segmenter_shared_by_threads_gives_the_sequential_results(images):
    from samantic.io import read_image
    from samantic.models import create_model
    from samantic.runtime import Segmenter

    seg = Segmenter(create_model("sam_nano"), points_per_side=6)
    frames = [read_image(p) for p in sorted(images.glob("*.png"))]
    want = [[r["segmentation"]["counts"] for r in seg(f).instances] for f in frames]
    assert any(want)
    got = {}
    errors = []
    barrier = threading.Barrier(4)

    def work(k):
        try:
            barrier.wait()
            for rep in range(2):
                for i, f in enumerate(frames):
                    got[(k, rep, i)] = [r["segmentation"]["counts"] for r in seg(f).instances]
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors
    assert len(got) == 4 * 2 * len(frames)
    for (k, rep, i), counts in got.items():
        assert counts == want[i], (k, rep, i)


def test_two_runs_writing_one_folder_leave_whole_files(images, tmp_path):
    ref = tmp_path / "ref"
    assert run_segment([str(images), "--out", str(ref), *FAST]).returncode == 0
    shared = tmp_path / "shared"
    cmd = [samantic_exe(), "segment", str(images), "--out", str(shared), "--overwrite", *FAST]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    names = sorted(p.relative_to(shared).as_posix() for p in shared.rglob("*"))
    assert names == sorted(p.relative_to(ref).as_posix() for p in ref.rglob("*"))  # no temporary files left
    for p in ref.rglob("*.json"):
        assert json.loads((shared / p.name).read_bytes()) == json.loads(p.read_bytes())
    for p in ref.rglob("*.png"):
        assert (shared / p.name).read_bytes() == p.read_bytes()


def test_device_cuda_without_a_gpu_is_one_clear_error(images, tmp_path):
    import torch
    from typer.testing import CliRunner

    from samantic.cli.main import app

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible: --device cuda is valid here")
    r = CliRunner().invoke(app, ["segment", str(images / "im0.png"), "--out", str(tmp_path), "--device", "cuda",
                                 *FAST], terminal_width=10_000)
    assert r.exit_code == 1 and "--device cuda: torch sees no CUDA device" in r.stderr
    assert not list(tmp_path.iterdir())
