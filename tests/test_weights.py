"""Weight table, cache location, download (resume, restart, errors) and verify; the `weights` CLI."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from http_server import FileServer
from samantic.cli import weights as cli
from samantic.models import weights
from samantic.models.weights import ChecksumError, DownloadError, WeightSpec
from samantic.models.registry import (PRED_IOU_NANO, PRED_IOU_PANOPTIC, PRED_IOU_SUM, STABILITY_NANO, STABILITY_PANOPTIC,
                                     STABILITY_SUM)

# Three 1 MiB download chunks and a bit: interruptions land mid-stream.
PAYLOAD = random.Random(0).randbytes(3 * (1 << 20) + 12345)
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()
CUT = 1_500_000


@pytest.fixture
def server():
    with FileServer(PAYLOAD) as s:
        yield s


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("SAMANTIC_CACHE", str(root))
    return root


@pytest.fixture
def test_spec(server, monkeypatch) -> WeightSpec:
    """A weight tag served by the loopback server, in a private copy of the table."""
    monkeypatch.setattr(weights, "_WEIGHTS", dict(weights._WEIGHTS))
    spec = WeightSpec(
        tag="sam_nano.test",
        model="sam_nano",
        filename="nano_test.bin",
        url=server.url,
        size=len(PAYLOAD),
        sha256=PAYLOAD_SHA,
    )
    return weights.register_weight(spec)


def _part(path: Path) -> Path:
    return path.with_name(path.name + ".part")


def test_weights_and_cli_import_without_torch():
    # The Jetson/onnxruntime install has no torch: listing, downloading and
    # verifying checkpoints must still work there.
    code = "import sys, samantic.models, samantic.cli.weights; sys.exit('torch' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    assert subprocess.run([sys.executable, "-c", code], env=env, timeout=60).returncode == 0


# --------------------------------------------------------------------------- table


def test_official_table():
    assert [s.tag for s in weights.list_weights()] == ["sam_vit_h.sa1b", "sam_vit_l.sa1b", "sam_vit_b.sa1b"]
    b = weights.get_weight("sam_vit_b.sa1b")
    assert b == WeightSpec(
        tag="sam_vit_b.sa1b",
        model="sam_vit_b",
        filename="sam_vit_b_01ec64.pth",
        url="https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
        size=375042383,
        sha256="ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
    )
    for spec in weights.list_weights():
        assert spec.url.endswith("/" + spec.filename)
        assert spec.model in ("sam_vit_h", "sam_vit_l", "sam_vit_b")


def test_get_weight_by_model_name_and_unknown():
    assert weights.get_weight("sam_vit_l").tag == "sam_vit_l.sa1b"
    assert weights.list_weights(model="sam_vit_h")[0].filename == "sam_vit_h_4b8939.pth"
    with pytest.raises(ValueError, match=r"sam_vit_b\.sa1b"):
        weights.get_weight("sam_vit_b.sa1bb")


def test_weight_spec_rejects_bad_values():
    good = dict(tag="m.x", model="m", filename="f.pth", url="http://x/f.pth", size=1, sha256="a" * 64)
    WeightSpec(**good)
    for bad in (dict(sha256="xyz"), dict(tag="other.x"), dict(size=0), dict(filename="../f.pth")):
        with pytest.raises(ValueError):
            WeightSpec(**{**good, **bad})


def test_register_weight_twice(test_spec):
    with pytest.raises(ValueError, match="already registered"):
        weights.register_weight(test_spec)


# --------------------------------------------------------------------------- cache location


def test_cache_dir_env_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("SAMANTIC_CACHE", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert weights.cache_dir() == tmp_path / "mine"
    assert weights.weights_dir() == tmp_path / "mine" / "weights"
    monkeypatch.delenv("SAMANTIC_CACHE")
    assert weights.cache_dir() == tmp_path / "xdg" / "samantic"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert weights.cache_dir() == tmp_path / "home" / ".cache" / "samantic"


def test_download_tag_goes_to_samantic_cache(server, cache, test_spec):
    assert weights.cached_path("sam_nano.test") is None
    path = weights.download("sam_nano.test", progress=False)
    assert path == cache / "weights" / "nano_test.bin"
    assert path.read_bytes() == PAYLOAD
    assert weights.cached_path(test_spec) == path


# --------------------------------------------------------------------------- download


def test_download_good_file(server, tmp_path):
    dest = tmp_path / "sub" / "file.bin"
    path = weights.download_url(server.url, dest, sha256=PAYLOAD_SHA, size=len(PAYLOAD), progress=False)
    assert path == dest
    assert dest.read_bytes() == PAYLOAD
    assert not _part(dest).exists()
    assert [r.range for r in server.requests] == [None]
    assert weights.verify(dest, PAYLOAD_SHA)


def test_interrupted_download_resumes_with_range(server, tmp_path):
    dest = tmp_path / "file.bin"
    server.cut_after = CUT
    with pytest.raises(DownloadError, match="resume") as info:
        weights.download_url(server.url, dest, sha256=PAYLOAD_SHA, size=len(PAYLOAD), progress=False)
    assert str(_part(dest)) in str(info.value)
    assert not dest.exists()
    kept = _part(dest).stat().st_size
    assert 0 < kept <= CUT

    weights.download_url(server.url, dest, sha256=PAYLOAD_SHA, size=len(PAYLOAD), progress=False)
    assert [r.range for r in server.requests] == [None, f"bytes={kept}-"]
    assert [r.status for r in server.requests] == [200, 206]
    assert dest.read_bytes() == PAYLOAD
    assert not _part(dest).exists()


def test_server_ignoring_range_restarts_from_zero(server, tmp_path):
    dest = tmp_path / "file.bin"
    # A .part with wrong bytes: appending the 200 body to it would corrupt the file.
    _part(dest).write_bytes(b"\xff" * 1000)
    server.ignore_range = True
    weights.download_url(server.url, dest, sha256=PAYLOAD_SHA, size=len(PAYLOAD), progress=False)
    assert [(r.range, r.status) for r in server.requests] == [("bytes=1000-", 200)]
    assert dest.read_bytes() == PAYLOAD


def test_unsatisfiable_range_restarts_from_zero(server, tmp_path):
    dest = tmp_path / "file.bin"
    _part(dest).write_bytes(PAYLOAD + b"junk")  # longer than the file; size unknown to the client
    weights.download_url(server.url, dest, sha256=PAYLOAD_SHA, progress=False)
    assert [(r.range, r.status) for r in server.requests] == [(f"bytes={len(PAYLOAD) + 4}-", 416), (None, 200)]
    assert dest.read_bytes() == PAYLOAD


def test_complete_part_is_verified_without_network(server, tmp_path):
    dest = tmp_path / "file.bin"
    _part(dest).write_bytes(PAYLOAD)  # e.g. a crash between download and rename
    weights.download_url(server.url, dest, sha256=PAYLOAD_SHA, size=len(PAYLOAD), progress=False)
    assert server.requests == []
    assert dest.read_bytes() == PAYLOAD


def test_wrong_hash_deletes_everything(server, tmp_path):
    dest = tmp_path / "file.bin"
    wrong = "0" * 64
    with pytest.raises(ChecksumError) as info:
        weights.download_url(server.url, dest, sha256=wrong, size=len(PAYLOAD), progress=False)
    assert isinstance(info.value, ValueError)
    assert wrong in str(info.value) and PAYLOAD_SHA in str(info.value)
    assert not dest.exists()
    assert not _part(dest).exists()


def test_http_404_is_a_clear_error(server, tmp_path):
    dest = tmp_path / "file.bin"
    server.fail_status = 404
    with pytest.raises(DownloadError, match="404") as info:
        weights.download_url(server.url, dest, sha256=PAYLOAD_SHA, progress=False)
    assert isinstance(info.value, RuntimeError)
    assert server.url in str(info.value)
    assert not dest.exists() and not _part(dest).exists()


def test_unreachable_server(tmp_path):
    with FileServer(PAYLOAD) as s:
        url = s.url  # the port is free again once the server is gone
    with pytest.raises(DownloadError, match="cannot reach"):
        weights.download_url(url, tmp_path / "file.bin", sha256=PAYLOAD_SHA, progress=False)


def test_size_announced_by_server_must_match(server, tmp_path):
    dest = tmp_path / "file.bin"
    with pytest.raises(DownloadError, match=f"announces {len(PAYLOAD)} bytes"):
        weights.download_url(server.url, dest, sha256=PAYLOAD_SHA, size=len(PAYLOAD) + 1, progress=False)
    assert not dest.exists()


def test_cached_file_is_returned_without_network(server, tmp_path):
    dest = tmp_path / "file.bin"
    weights.download_url(server.url, dest, sha256=PAYLOAD_SHA, size=len(PAYLOAD), progress=False)
    server.fail_status = 500  # any contact would now fail
    again = weights.download_url(server.url, dest, sha256=PAYLOAD_SHA, size=len(PAYLOAD), progress=False)
    assert again == dest
    assert len(server.requests) == 1


def test_corrupted_cached_file_is_downloaded_again(server, tmp_path):
    dest = tmp_path / "file.bin"
    dest.write_bytes(PAYLOAD[:-1] + b"\x00")
    weights.download_url(server.url, dest, sha256=PAYLOAD_SHA, size=len(PAYLOAD), progress=False)
    assert len(server.requests) == 1
    assert dest.read_bytes() == PAYLOAD


# --------------------------------------------------------------------------- verify


def test_verify_detects_corruption(tmp_path, test_spec):
    path = tmp_path / "nano_test.bin"
    path.write_bytes(PAYLOAD)
    for reference in (PAYLOAD_SHA, PAYLOAD_SHA.upper(), "sam_nano.test", test_spec, None):
        result = weights.verify(path, reference)
        assert result and result.ok and result.sha256 == PAYLOAD_SHA and result.reason == ""

    flipped = bytearray(PAYLOAD)
    flipped[len(flipped) // 2] ^= 1
    path.write_bytes(bytes(flipped))
    result = weights.verify(path, "sam_nano.test")
    assert not result
    assert result.sha256 == hashlib.sha256(flipped).hexdigest()
    assert "sha256" in result.reason

    path.write_bytes(PAYLOAD[:-1])
    result = weights.verify(path, "sam_nano.test")
    assert not result and result.sha256 is None and "size" in result.reason


def test_verify_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        weights.verify(tmp_path / "nope.pth")
    (tmp_path / "unknown.pth").write_bytes(b"x")
    with pytest.raises(ValueError, match="no reference hash"):
        weights.verify(tmp_path / "unknown.pth")
    with pytest.raises(ValueError, match="sam_vit_b"):
        weights.verify(tmp_path / "unknown.pth", "sam_vit_bx")


# --------------------------------------------------------------------------- CLI

runner = CliRunner()


def test_cli_list(cache, test_spec):
    result = runner.invoke(cli.app, ["list"])
    assert result.exit_code == 0, result.output
    for tag in ("sam_vit_h.sa1b", "sam_vit_l.sa1b", "sam_vit_b.sa1b", "sam_nano.test"):
        assert tag in result.stdout
    assert "375.0 MB" in result.stdout
    assert "yes" not in result.stdout

    weights.download("sam_nano.test", progress=False)
    result = runner.invoke(cli.app, ["list"])
    assert result.exit_code == 0
    line = next(l for l in result.stdout.splitlines() if "sam_nano.test" in l)
    assert "yes" in line


def test_cli_list_shows_the_registered_models(monkeypatch):
    # `--model` help sends users here: every registered name, where its weights come from and the thresholds
    # a command uses when given none.
    from samantic.models import get_model_entry, list_models

    monkeypatch.setenv("COLUMNS", "200")
    result = runner.invoke(cli.app, ["list"])
    assert result.exit_code == 0, result.output
    rows = {line.split("│")[1].strip(): line for line in result.stdout.splitlines() if line.count("│") > 4}
    assert set(list_models()) <= set(rows)
    assert "shipped" in rows["sam_nano"] and f"{PRED_IOU_NANO} / {STABILITY_NANO}" in rows["sam_nano"]
    assert f"{PRED_IOU_PANOPTIC} / {STABILITY_PANOPTIC}" in rows["sam_nano_panoptic"]
    assert "shipped" in rows["sam_nano_sum"] and f"{PRED_IOU_SUM} / {STABILITY_SUM}" in rows["sam_nano_sum"]
    assert "download: sam_vit_b.sa1b" in rows["sam_vit_b"] and "0.88 / 0.95" in rows["sam_vit_b"]
    assert "none" in rows["sam_nano_vit"]
    assert get_model_entry("sam_nano").description[:30] in rows["sam_nano"]


def test_cli_download(server, cache, test_spec, tmp_path):
    dest = tmp_path / "out"
    result = runner.invoke(cli.app, ["download", "sam_nano", "--dest", str(dest), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert (dest / "nano_test.bin").read_bytes() == PAYLOAD
    assert str(dest / "nano_test.bin") in result.stdout

    result = runner.invoke(cli.app, ["download", "sam_nano.test", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "using the cache" in result.stderr
    assert (cache / "weights" / "nano_test.bin").is_file()


def test_cli_download_errors_are_one_line(server, cache, test_spec):
    result = runner.invoke(cli.app, ["download", "sam_vit_bb"])
    assert result.exit_code == 1
    assert "sam_vit_b" in result.stderr and "Traceback" not in result.output

    server.fail_status = 404
    result = runner.invoke(cli.app, ["download", "sam_nano.test", "--no-progress"])
    assert result.exit_code == 1
    assert "HTTP 404" in result.stderr and "Traceback" not in result.output


def test_cli_verify(tmp_path, test_spec):
    path = tmp_path / "nano_test.bin"
    path.write_bytes(PAYLOAD)
    result = runner.invoke(cli.app, ["verify", str(path), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "OK" in result.stdout
    result = runner.invoke(cli.app, ["verify", str(path), "--tag", PAYLOAD_SHA])
    assert result.exit_code == 0, result.output

    path.write_bytes(PAYLOAD[:-1] + b"\x00")
    result = runner.invoke(cli.app, ["verify", str(path), "--tag", "sam_nano.test"])
    assert result.exit_code == 1
    assert "FAILED" in result.stderr

    result = runner.invoke(cli.app, ["verify", str(tmp_path / "missing.pth")])
    assert result.exit_code == 1
    assert "missing.pth" in result.stderr and "Traceback" not in result.output
