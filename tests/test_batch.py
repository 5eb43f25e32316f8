"""`attnctrl batch`: JOBS.jsonl checked before any work, generate's own runs, a manifest that
survives kills, and results that do not depend on how the jobs were split between processes."""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from attnctrl.cli import main

JOBS = [
    {"prompt": "a red car and a white sheep", "seed": 1, "model": "tiny-sd", "steps": 2},
    {
        "prompt": "a cat and a frog",
        "seed": 2,
        "model": "tiny-sd",
        "steps": 2,
        "controls": ["attend-excite tokens=cat,frog"],
    },
    {"prompt": ["a cat", "a frog"], "seed": 3, "model": "tiny-sd", "steps": 2, "maps": True},
    {"prompt": "a cat", "seed": 4, "model": "tiny-sd", "steps": 2, "controls": ["attend-excite tokens=dog"]},  # fails
    {"prompt": "a red circle", "seed": 5, "steps": 2},  # the embedded default model: a second pipeline
    {"prompt": "a white sheep", "seed": 6, "model": "tiny-sd", "steps": 3, "guidance": 4, "num-images": 2},
]


def write_jobs(path: Path, jobs=JOBS, blank_after: int = 1) -> Path:
    lines = [json.dumps(j) for j in jobs]
    lines.insert(blank_after, "")  # blank lines are not jobs
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def entries(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).copy()


def pngs(out: Path) -> dict[str, np.ndarray]:
    return {p.name: pixels(p) for p in sorted(out.glob("*.png"))}


def stamps(out: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.iterdir() if p.name.startswith("job-")}


# ------------------------------------------------------------------------- one process, in-process


def test_batch_runs_generate_records_failures_and_skips_done_jobs(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_jobs(tmp_path / "jobs.jsonl", JOBS[:4])
    rc, out, err = run(capsys, "batch", "jobs.jsonl", "--out", "res", "--no-progress")
    assert rc == 1  # one job failed; the others ran
    assert "4 jobs, 3 ok, 1 failed; 4 run now" in out
    assert "job 3 (line 5) failed" in err and "'dog' is not a word" in err
    es = entries(Path("res"))
    assert [(e["index"], e["line"], e["status"]) for e in es] == [
        (0, 1, "ok"),
        (1, 3, "ok"),
        (2, 4, "ok"),
        (3, 5, "error"),
    ]
    assert "'dog' is not a word of the prompt 'a cat'" in es[3]["error"] and "files" not in es[3]
    assert [f["path"] for f in es[2]["files"]] == [
        "job-00002.prompts.txt",
        "job-00002_0.png",
        "job-00002_1.png",
        "job-00002_0.maps.png",
        "job-00002_1.maps.png",
    ]
    assert Path("res/job-00002.prompts.txt").read_text() == "a cat\na frog\n"

    # each job is generate's own run: its recorded command regenerates the image byte for byte
    for name in ("job-00001.png", "job-00002_1.png"):
        with Image.open(Path("res") / name) as im:
            command = shlex.split(im.text["command"])
        assert command[:2] == ["attnctrl", "generate"]
        rc2, _, err2 = run(capsys, *command[1:], "-o", "again.png")
        assert rc2 == 0, err2
        again = "again.png" if name == "job-00001.png" else "again_1.png"
        assert Path(again).read_bytes() == (Path("res") / name).read_bytes()

    # a re-run does only the failed job again; the finished jobs' files are not rewritten
    before = stamps(Path("res"))
    rc, out, _ = run(capsys, "batch", "jobs.jsonl", "--out", "res", "--no-progress")
    assert rc == 1 and "1 run now on 1 process(es), 3 done before" in out
    assert stamps(Path("res")) == before and entries(Path("res")) == es

    # a job whose settings changed is not finished; the others stay done
    changed = [*JOBS[:3], {**JOBS[3], "controls": ["attend-excite tokens=cat"]}]
    changed[0] = {**changed[0], "seed": 11}
    write_jobs(tmp_path / "jobs.jsonl", changed)
    rc, out, _ = run(capsys, "batch", "jobs.jsonl", "--out", "res", "--no-progress")
    assert rc == 0 and "4 jobs, 4 ok, 0 failed; 2 run now on 1 process(es), 2 done before" in out
    now = stamps(Path("res"))
    assert now["job-00000.png"] != before["job-00000.png"] and now["job-00001.png"] == before["job-00001.png"]
    assert [e["seed"] for e in entries(Path("res"))] == [11, 2, 3, 4]
    assert not list(Path("res").glob("manifest.part-*")) and not list(Path("res").glob(".*"))


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt": "a cat", "seed": 1', "line 2: not JSON"),
        ('["a cat", 1]', "line 2: a job is a JSON object"),
        ('{"prompt": "a cat", "seed": 1, "colour": "red"}', "line 2: unknown key 'colour'"),
        ('{"prompt": "a cat", "seed": 1, "output": "x.png"}', "line 2: unknown key 'output'"),
        ('{"prompt": "a cat"}', "line 2: give a seed"),
        ('{"prompt": "a cat", "seed": "1"}', "line 2: give a seed"),
        ('{"prompt": "", "seed": 1}', "line 2: the prompt is empty"),
        ('{"prompt": "a cat", "seed": 1, "steps": 0}', "line 2: argument --steps: must be a positive integer"),
        ('{"prompt": "a cat", "seed": 1, "steps": [2]}', "line 2: steps must be a text or a number"),
        ('{"prompt": "a cat", "seed": 1, "maps": "yes"}', "line 2: maps is a flag"),
        ('{"prompt": "a cat", "seed": 1, "panorama": "wide"}', "line 2: argument --panorama: invalid choice"),
        ('{"prompt": "a cat", "seed": 1, "controls": ["glow"]}', "line 2: unknown control 'glow'"),
        ('{"prompt": "a cat", "seed": 1, "controls": ["maps colour=red"]}', "line 2: "),
        ('{"prompt": "a cat", "seed": 1, "controls": "maps"}', "line 2: controls must be a list"),
    ],
)
def test_bad_line_exit_2_before_any_work(line, message, tmp_path, capsys):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps(JOBS[0]) + "\n" + line + "\n" + json.dumps(JOBS[1]) + "\n")
    rc, out, err = run(capsys, "batch", jobs, "--out", tmp_path / "res")
    assert rc == 2 and out == ""
    assert err.startswith(f"attnctrl: error: {jobs} {message}") and err.count("\n") == 1, err
    assert not (tmp_path / "res").exists()  # nothing written, not even the folder


# ------------------------------------------------------------------------------ several processes


def whole(line: str) -> dict | None:
    """A manifest line, or None for the torn last line of a killed writer."""
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(n: int, launcher: str, cwd: Path) -> list[str]:
    """The command line of a batch run in `cwd` on `n` CPU processes."""
    batch = ["-m", "attnctrl", "batch", "jobs.jsonl", "--out", "res", "--no-progress"]
    if n == 1:
        return [sys.executable, *batch]
    port = str(free_port())
    if launcher == "torchrun":
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(n),
            "--master_port",
            port,
            *batch,
        ]
    head = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(n)]
    return [
        *head,
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        port,
        *batch,
    ]


def env() -> dict[str, str]:
    # CPU processes on the gloo backend, one thread each (the single-process reference too)
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def batch_run(n: int, cwd: Path, launcher: str = "torchrun") -> subprocess.CompletedProcess:
    write_jobs(cwd / "jobs.jsonl")
    return subprocess.run(launch(n, launcher, cwd), cwd=cwd, env=env(), capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """All jobs on one process."""
    cwd = tmp_path_factory.mktemp("one")
    proc = batch_run(1, cwd)
    assert proc.returncode == 1, proc.stderr  # the failing job
    assert "6 jobs, 5 ok, 1 failed; 6 run now on 1 process(es)" in proc.stdout
    return cwd / "res"


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_two_processes_give_one_process_results(launcher, reference, tmp_path):
    proc = batch_run(2, tmp_path, launcher)
    assert proc.returncode == 1  # the failing job (recorded) makes the run's status 1
    assert "6 jobs, 5 ok, 1 failed; 6 run now on 2 process(es)" in proc.stdout, proc.stderr
    out = tmp_path / "res"
    assert (out / "manifest.jsonl").read_bytes() == (reference / "manifest.jsonl").read_bytes()
    got, want = pngs(out), pngs(reference)
    assert sorted(got) == sorted(want) and len(want) == 9
    for name in want:
        assert np.array_equal(got[name], want[name]), name
    assert entries(out)[3]["status"] == "error" and "'dog'" in entries(out)[3]["error"]


@pytest.mark.slow
def test_killed_run_resumes_without_redoing_jobs(reference, tmp_path):
    write_jobs(tmp_path / "jobs.jsonl")
    proc = subprocess.Popen(
        launch(1, "", tmp_path), cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    part = tmp_path / "res" / "manifest.part-00000.jsonl"
    deadline = time.monotonic() + 120
    while not (part.exists() and part.read_text().count("\n") >= 1):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before its first job was recorded"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    done = [e for e in map(whole, part.read_text().splitlines()) if e and e["status"] == "ok"]
    assert 1 <= len(done) < len(JOBS) and not (tmp_path / "res" / "manifest.jsonl").exists()
    finished = {f["path"] for e in done for f in e["files"]}
    before = {k: v for k, v in stamps(tmp_path / "res").items() if k in finished}

    again = batch_run(2, tmp_path)  # resumed on two processes
    assert again.returncode == 1, again.stderr  # the failing job again
    assert f"6 jobs, 5 ok, 1 failed; {len(JOBS) - len(done)} run now on 2 process(es), {len(done)} done before" in (
        again.stdout
    ), again.stderr
    assert {k: v for k, v in stamps(tmp_path / "res").items() if k in finished} == before  # not rewritten
    assert not list((tmp_path / "res").glob(".*")) and not list((tmp_path / "res").glob("manifest.part-*"))
    assert (tmp_path / "res" / "manifest.jsonl").read_bytes() == (reference / "manifest.jsonl").read_bytes()
    got, want = pngs(tmp_path / "res"), pngs(reference)
    assert sorted(got) == sorted(want) and all(np.array_equal(got[k], want[k]) for k in want)


# ------------------------------------------------------------------ the same machinery: head search


@pytest.mark.slow
def test_head_search_split_across_two_processes_finds_the_same_heads(tmp_path):
    (tmp_path / "prompts.txt").write_text("a red car and a white sheep\na cat on a mat\n")
    search = ["-m", "attnctrl", "heads", "search", "--model", "tiny-sd", "--prompts", "prompts.txt", "--seeds", "1"]
    search += ["--rounds", "3", "--top-k", "2", "--scorer", "sharpness", "--steps", "2", "--no-progress"]
    search += ["--candidates", "mid,heads=0|1;down_blocks.1,heads=2|3"]
    one = subprocess.run([sys.executable, *search, "-o", "one.json"], cwd=tmp_path, env=env(), capture_output=True)
    assert one.returncode == 0, one.stderr
    two_procs = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port"]
    two = subprocess.run(
        [*two_procs, str(free_port()), *search, "-o", "two.json"], cwd=tmp_path, env=env(), capture_output=True
    )
    assert two.returncode == 0, two.stderr
    # 1 baseline + 4 singles + up to 2 per later round, split between the processes; the same result
    assert b"9 head sets evaluated;" in one.stdout and b"5 head sets evaluated by process 0 of 2" in two.stdout
    assert two.stdout.count(b"two.json") == 1  # one report, one file
    assert (tmp_path / "two.json").read_bytes() == (tmp_path / "one.json").read_bytes()
    assert len(json.loads((tmp_path / "one.json").read_text())["history"][0]["tried"]) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.json", "prompts.txt", "two.json"]
