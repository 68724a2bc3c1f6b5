"""Shared fixtures.

``structured_nano``: sam_nano trained for ~25 steps (about 30 s) on a "disk world"
(one bright disk on grey), so that its masks are sharp blobs with high predicted
IoU. Random weights give noise-like masks that every filter removes, which would
make equivalence tests compare two empty lists.
"""

import sys

import numpy as np
import pytest


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """A test that calls a CLI or benchmark ``main`` with ``--threads`` sets torch's process-wide thread
    count; put it back so that the tests after it keep the suite's."""
    torch = sys.modules.get("torch")
    n = torch.get_num_threads() if torch is not None else None
    yield
    torch = sys.modules.get("torch")
    if torch is not None and n is not None and torch.get_num_threads() != n:
        torch.set_num_threads(n)


class DiskWorld:
    """64 images of ``disks`` bright disks on grey, with their instance masks."""

    def __init__(self, size=(256, 256), n=64, disks=3):
        self.size = size
        self.n = n
        self.disks = disks

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        import cv2

        from samantic.train.sam import Sample

        rng = np.random.default_rng(i)
        h, w = self.size
        img = np.full((h, w, 3), 90, np.uint8)
        masks = []
        for _ in range(self.disks):
            m = np.zeros((h, w), np.uint8)
            centre = (int(rng.integers(40, w - 40)), int(rng.integers(40, h - 40)))
            cv2.circle(m, centre, int(rng.integers(15, 40)), 1, -1)
            img[m > 0] = rng.integers(120, 255, 3)
            masks.append(m > 0)
        return Sample(img, np.stack(masks))


def disk_image(seed: int, size=(240, 320)) -> np.ndarray:
    return DiskWorld(size)[seed].image


@pytest.fixture
def one_thread():
    """torch on one intra-op thread for the test (restored after): for tiny models on a shared CPU,
    threads cost far more than they bring."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def structured_nano(tmp_path_factory):
    import torch

    from samantic.models import create_model
    from samantic.train.sam import SamTrainConfig, SamTrainer

    torch.manual_seed(0)
    model = create_model("sam_nano", pretrained=False)
    config = SamTrainConfig(steps=25, images_per_step=2, masks_per_image=3, iterations=2, warmup_steps=5, lr=1e-3,
                            log_every=5, checkpoint_every=1000, seed=0)
    out = tmp_path_factory.mktemp("nano") / "disk_nano.safetensors"
    result = SamTrainer(model, config, DiskWorld(disks=1)).train(out, progress=False)
    model.training_result = result
    return model.eval()


def _devices():
    from samantic import _C

    return [
        "cpu",
        pytest.param(
            "cuda",
            marks=[pytest.mark.gpu,
                   pytest.mark.skipif(_C.cuda_status()["device_count"] == 0, reason="no CUDA device")],
        ),
    ]


DEVICES = _devices()  # kernels' device parametrisation: the CUDA case runs only where a GPU is


# sitecustomize.py for a subprocess in which torch, torchvision, segment_anything and cv2 cannot be imported
BLOCK_TORCH = '''
import sys
class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch.") or name in ("torchvision", "segment_anything", "cv2"):
            raise ImportError(f"{name} is blocked in this test")
sys.meta_path.insert(0, _NoTorch())
'''
