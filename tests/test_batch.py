"""Batch segmentation on Ray Data (`samantic segment --engine ray`, `samantic.batch.segment_dataset`) and the
fault tests of batch runs: bad files, a killed actor, SIGTERM on the driver, re-runs that finish the rest.

Ray runs on this machine only (a local instance on loopback, started and stopped by the tests)."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import pytest
from cli_helpers import cli_env, run_segment, samantic_exe

from samantic.batch import (Job, SegmentOptions, collect_inputs, prepare, read_index, segment_dataset, segment_file,
                            write_index)

FAST = ["--points-per-side", "4", "--no-progress"]
SLOWER = ["--points-per-side", "12", "--no-progress"]  # long enough per image to interrupt a run mid-way








def _scene(seed, size=(160, 200)):
    from samantic.train.data.shapes import render_scene

    return render_scene(seed, size=size).image


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Three good scenes (one in a sub-folder) and three bad files."""
    from PIL import Image

    root = tmp_path_factory.mktemp("batch_in")
    (root / "sub").mkdir()
    for i, name in enumerate(["a.png", "b.jpg", "sub/c.png"]):
        cv2.imwrite(str(root / name), cv2.cvtColor(_scene(10 + i), cv2.COLOR_RGB2BGR))
    (root / "notes.png").write_text("not an image")
    data = (root / "a.png").read_bytes()
    (root / "truncated.png").write_bytes(data[: len(data) // 2])
    Image.new("L", (12000, 10000)).save(root / "bomb.png")  # a few KB that would decode to 120 MB
    return root


GOOD = ["a.png", "b.jpg", "sub/c.png"]
BAD = {"notes.png": "not a readable image", "truncated.png": "truncated", "bomb.png": "more than the limit"}


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    """Ten scenes, for runs that are interrupted or lose a worker."""
    root = tmp_path_factory.mktemp("batch_many")
    for i in range(10):
        cv2.imwrite(str(root / f"s{i:02d}.png"), cv2.cvtColor(_scene(40 + i, (240, 320)), cv2.COLOR_RGB2BGR))
    return root


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray on loopback for the in-process tests, stopped after the module."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    if ray.is_initialized():
        ray.shutdown()
    env = cli_env()
    os.environ.pop("RAY_ADDRESS", None)
    ray.init(num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False, object_store_memory=256 * 2**20,
             log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()
    os.environ.update({k: v for k, v in env.items() if k == "RAY_ADDRESS"})


def _results(out: Path):
    """{relative path: file bytes} of a run's output files (the Ray index aside)."""
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name != "index.parquet"}


def _json_of(out: Path):
    return {p.relative_to(out).as_posix(): json.loads(p.read_bytes()) for p in sorted(out.rglob("*.json"))}


# ------------------------------------------------------------------------------------------------- the CLI


def test_engine_ray_writes_the_files_of_a_local_run_and_an_index(inputs, tmp_path):
    pytest.importorskip("ray.data")
    local, ray_out = tmp_path / "local", tmp_path / "ray"
    r_local = run_segment([str(inputs), "--out", str(local), *FAST])
    r_ray = run_segment([str(inputs), "--out", str(ray_out), "--engine", "ray", *FAST])
    for r in (r_local, r_ray):
        assert r.returncode == 1, r.stderr  # the bad files fail, the good ones are done
        for name, reason in BAD.items():
            line = [ln for ln in r.stderr.splitlines() if ln.startswith("failed: ") and name in ln]
            assert line and reason in line[0], (name, r.stderr)
    a, b = _json_of(local), _json_of(ray_out)
    assert sorted(a) == sorted(f"{n}.json" for n in GOOD)
    assert a == b  # same masks, scores, settings and provenance
    assert _results(local) == _results(ray_out)  # and byte-identical overlays
    rows = {r["name"]: r for r in read_index(ray_out / "index.parquet")}
    assert sorted(rows) == sorted(GOOD + list(BAD))
    for n in GOOD:
        assert rows[n]["status"] == "ok" and rows[n]["masks"] == len(a[f"{n}.json"]["annotations"])
        assert rows[n]["seconds"] > 0 and rows[n]["error"] == ""
    for n, reason in BAD.items():
        assert rows[n]["status"] == "failed" and reason in rows[n]["error"]

    # resumable: a second run skips what is done, records it, and fails the bad files again
    again = run_segment([str(inputs), "--out", str(ray_out), "--engine", "ray", *FAST])
    assert again.returncode == 1
    rows = {r["name"]: r for r in read_index(ray_out / "index.parquet")}
    assert [rows[n]["status"] for n in GOOD] == ["skipped"] * 3
    assert [rows[n]["masks"] for n in GOOD] == [len(a[f"{n}.json"]["annotations"]) for n in GOOD]
    assert _json_of(ray_out) == a


def test_ray_flags_need_engine_ray_and_ray_needs_paths(inputs, tmp_path):
    r = run_segment([str(inputs / "a.png"), "--out", str(tmp_path), "--workers", "2", *FAST])
    assert r.returncode == 2 and "--workers" in r.stderr and "--engine ray" in r.stderr
    r = run_segment(["--camera", "0", "--out", str(tmp_path), "--engine", "ray", *FAST])
    assert r.returncode == 2 and "--engine ray segments image files" in r.stderr


def test_engine_ray_without_ray_says_what_to_install(inputs, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from samantic.cli.main import app

    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed: `import ray` raises ImportError
    res = CliRunner().invoke(app, ["segment", str(inputs / "a.png"), "--out", str(tmp_path), "--engine", "ray",
                                   *FAST])
    assert res.exit_code == 1
    assert "pip install 'samantic[ray]'" in res.output
    assert not list(tmp_path.iterdir())


def test_engine_ray_reports_a_corrupt_weights_file_once(inputs, tmp_path):
    pytest.importorskip("ray.data")
    bad = tmp_path / "w.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    r = run_segment([str(inputs / "a.png"), "--out", str(tmp_path / "o"), "--engine", "ray", "--checkpoint", str(bad), *FAST])
    assert r.returncode == 1
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and str(bad) in errors[0] and "Traceback" not in r.stderr


# ------------------------------------------------------------------------------------------------- the API


def test_segment_dataset_takes_a_ray_dataset_of_decoded_images(local_ray, inputs, tmp_path):
    """A user's own Ray dataset (``read_images(include_paths=True)``) gives the files of the local run."""
    opts = SegmentOptions(points_per_side=4)
    ds = local_ray.data.read_images([str(inputs / "a.png"), str(inputs / "sub" / "c.png")], include_paths=True,
                                    mode="RGB")
    checked = []
    report = segment_dataset(ds, tmp_path / "ray", opts, on_checked=checked.append)
    assert report.ok and report.count("ok") == 2 and report.index == tmp_path / "ray" / "index.parquet"
    assert len(checked) == 1 and checked[0].model == "sam_nano" and checked[0].segmenter is None
    prepared = prepare(opts)
    for src in (inputs / "a.png", inputs / "sub" / "c.png"):
        row = segment_file(prepared, tmp_path / "local", Job(src, src.name))
        assert row["status"] == "ok"
    a, b = _json_of(tmp_path / "local"), _json_of(tmp_path / "ray")
    assert sorted(b) == ["a.png.json", "c.png.json"]
    for k in a:  # the dataset's path column is the read path (Ray may give it without a leading slash)
        assert [x["segmentation"] for x in a[k]["annotations"]] == [x["segmentation"] for x in b[k]["annotations"]]
        assert a[k]["settings"] == b[k]["settings"]


def test_segment_dataset_refuses_bad_arguments(local_ray, inputs, tmp_path):
    with pytest.raises(ValueError, match="workers must be >= 1"):
        segment_dataset([str(tmp_path)], tmp_path, workers=0)
    if not local_ray.cluster_resources().get("GPU"):  # an actor that could never be placed: an error, not a hang
        with pytest.raises(ValueError, match=r"asks for 1 GPU\(s\) but the Ray cluster has 0"):
            segment_dataset([str(inputs / "a.png")], tmp_path / "gpu", gpus_per_worker=1)
    with pytest.raises(ValueError, match=r"asks for 64 CPU\(s\)"):
        segment_dataset([str(inputs / "a.png")], tmp_path / "cpu", cpus_per_worker=64)
    bad = tmp_path / "w.safetensors"  # the driver's check (while Ray starts): one error naming the file
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    checked = []
    with pytest.raises(ValueError, match=re.escape(str(bad))):
        segment_dataset([str(inputs / "a.png")], tmp_path / "bad", SegmentOptions(checkpoint=str(bad)),
                        on_checked=checked.append)
    assert not checked and not list((tmp_path / "bad").glob("*.json"))
    assert local_ray.is_initialized()  # a Ray the caller started stays up
    with pytest.raises(ValueError, match="unknown segment option"):
        SegmentOptions().replace(points=3)


def _actor_pids():
    """Processes whose title is a Ray Data worker of SegmentActor."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if b"ray::MapWorker(MapBatches(SegmentActor))" in cmd:
                pids.append(int(d.name))
    return pids


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the actor's process in /proc")
def test_a_killed_actor_costs_only_its_in_flight_image(local_ray, many, tmp_path):
    out = tmp_path / "out"
    holder = {}

    def job():
        holder["report"] = segment_dataset([str(many)], out, SegmentOptions(points_per_side=12))

    t = threading.Thread(target=job)
    t.start()
    deadline = time.time() + 300
    while time.time() < deadline and len(list(out.glob("*.json"))) < 2:
        time.sleep(0.05)
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.json")}
    pids = _actor_pids()
    assert len(before) >= 2 and len(pids) == 1, (before, pids)
    os.kill(pids[0], signal.SIGKILL)
    t.join(600)
    assert not t.is_alive()
    report = holder["report"]
    assert report.ok and report.count("ok") == 10 and len(report.rows) == 10  # every image, each once
    assert sorted(p.name for p in out.glob("*.json")) == [f"s{i:02d}.png.json" for i in range(10)]
    # what was finished before the kill was not redone
    assert {n: (out / n).stat().st_mtime_ns for n in before} == before
    for p in out.glob("*.json"):
        json.loads(p.read_bytes())


def test_index_round_trip_and_atomic_write(tmp_path):
    rows = [{"image": "a.png", "name": "a.png", "status": "ok", "masks": 3, "seconds": 0.5, "error": ""},
            {"image": "b.png", "name": "b.png", "status": "failed", "masks": 0, "seconds": 0.0, "error": "truncated"}]
    p = write_index(tmp_path / "index.parquet", rows)
    assert read_index(p) == rows
    import pyarrow.parquet as pq  # a file other tools read

    assert pq.read_table(p).column("status").to_pylist() == ["ok", "failed"]
    assert [f.name for f in tmp_path.iterdir()] == ["index.parquet"]  # no temporary file left


def test_collect_inputs_is_shared_with_the_cli():
    from samantic.cli import segment as cli

    assert cli.collect_inputs is collect_inputs


# ------------------------------------------------------------------------------------------------- SIGTERM


def _interrupt_after(cmd, out: Path, n_done: int):
    """Starts ``cmd``, sends SIGTERM once ``n_done`` results exist; returns (returncode, stderr, done before)."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env())
    deadline = time.time() + 400
    while time.time() < deadline and p.poll() is None and len(list(out.glob("*.json"))) < n_done:
        time.sleep(0.05)
    assert p.poll() is None, p.communicate()
    done = {q.name for q in out.glob("*.json")}
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    return p.returncode, err, done


@pytest.mark.parametrize("engine", ["local", "ray"])
def test_sigterm_keeps_every_finished_image_and_the_rerun_completes(engine, many, tmp_path):
    if engine == "ray":
        pytest.importorskip("ray.data")
    out = tmp_path / "out"
    cmd = [samantic_exe(), "segment", str(many), "--out", str(out), "--engine", engine, *SLOWER]
    rc, err, done = _interrupt_after(cmd, out, 2)
    assert rc == 130, err
    assert "interrupted:" in err and "run again to continue" in err
    after = {q.name: q.stat().st_mtime_ns for q in out.glob("*.json")}
    assert done <= set(after) and len(after) < 10  # nothing finished was lost; the run did stop
    for q in out.glob("*.json"):  # every result on disk is whole
        json.loads(q.read_bytes())
    if engine == "ray":
        rows = read_index(out / "index.parquet")  # the index says what finished before the stop
        assert {r["name"] + ".json" for r in rows if r["status"] == "ok"} <= set(after)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=cli_env())
    assert r.returncode == 0, r.stderr
    assert sorted(q.name for q in out.glob("*.json")) == [f"s{i:02d}.png.json" for i in range(10)]
    assert {n: (out / n).stat().st_mtime_ns for n in after} == after  # the finished ones were skipped, not redone


def test_default_threads_follow_omp_num_threads(monkeypatch):
    """A Ray run divides the threads a local run would use: OMP_NUM_THREADS when set (with it at 1, the
    Ray workers ran on 2 threads and their scores differed from the local run's at 1e-7)."""
    from samantic.batch import default_threads

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert default_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_threads() == 3
    for unset in ("", "0", "many"):
        monkeypatch.setenv("OMP_NUM_THREADS", unset)
        assert default_threads() == (os.cpu_count() or 1)
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert default_threads() == (os.cpu_count() or 1)
