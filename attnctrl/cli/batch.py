"""``attnctrl batch JOBS.jsonl --out DIR``: many ``generate`` runs, split across processes.

    attnctrl batch jobs.jsonl --out results                                    # one process
    accelerate launch --num_processes 4 -m attnctrl batch jobs.jsonl --out results
    torchrun --nproc_per_node 4 -m attnctrl batch jobs.jsonl --out results

Every line of JOBS.jsonl is checked first (`attnctrl.cli.jobs`); then the jobs not finished before
are split between the processes (accelerate's `PartialState.split_between_processes`), each
process keeping one pipeline per model on its device. A job is ``generate``'s own run
(`generate.generate`) writing ``DIR/job-NNNNN.png`` (``_0``, ``_1``, ... for several images, maps
as ``.maps.png``); its result line goes to the manifest (`attnctrl.manifest`) as soon as it ends,
also when it fails. Exit status 0 when every job succeeded, 1 when some failed, 2 for a bad file.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from attnctrl import manifest

from . import common, procs
from .common import PROG, CLIError, one_line
from .jobs import Job, read_jobs


def add_batch_parser(sub, models: str) -> None:
    b = sub.add_parser(
        "batch",
        help="run a file of generate jobs, split across processes (accelerate launch / torchrun)",
        description=(
            "Run every job of JOBS.jsonl (one JSON object per line: prompt, seed, controls, and any "
            "generate option by its long name) into DIR, with DIR/manifest.jsonl listing each job's "
            "result. A re-run skips the jobs already done and retries the failed ones."
        ),
        epilog=(
            'Example line: {"prompt": "a cat and a frog", "seed": 3, "steps": 20, "controls": '
            '["attend-excite tokens=cat,frog"]}. Several processes: accelerate launch --num_processes N '
            "-m attnctrl batch ... (or torchrun --nproc_per_node N -m attnctrl batch ...)."
        ),
    )
    b.add_argument("jobs", metavar="JOBS.jsonl", help="the jobs, one JSON object per line")
    b.add_argument("--out", required=True, metavar="DIR", help="folder for the images and manifest.jsonl")
    b.add_argument("--no-progress", action="store_true", help="no progress bars")
    b.set_defaults(func=cmd_batch)


class Pipelines:
    """One pipeline per model key on this process's device, loaded when a job first needs it."""

    def __init__(self, device):
        self.device, self.cache = device, {}

    def __call__(self, model: str | None):
        from attnctrl.models.loading import model_key

        key = model_key(model)
        if key not in self.cache:
            pipe = common.load_model(key)
            pipe.set_progress_bar_config(disable=True)  # the batch shows its own bars, not each run's steps
            self.cache[key] = pipe if self.device.type == "cpu" else pipe.to(self.device)
        return self.cache[key]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_prompts(path: Path, prompts: list[str]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(p + "\n" for p in prompts), encoding="utf-8")
    os.replace(tmp, path)


def run_job(job: Job, out: Path, load) -> dict[str, Any]:
    """One job through ``generate``; its manifest entry (status ok with its files, or error)."""
    from .generate import generate

    stem = f"job-{job.index:05d}"
    entry: dict[str, Any] = {"index": job.index, "line": job.line, "key": job.key, "seed": job.seed}
    entry["prompt"] = job.prompts[0] if len(job.prompts) == 1 else job.prompts
    args = copy.copy(job.args)
    args.output = str(out / f"{stem}.png")
    inputs = []
    try:
        if len(job.prompts) == 1:
            args.prompt = job.prompts[0]
        else:  # generate's --prompts FILE, which its PNG metadata's command names
            inputs = [out / f"{stem}.prompts.txt"]
            _write_prompts(inputs[0], job.prompts)
            args.prompts = str(inputs[0])
        _, written = generate(args, load=load)
    except Exception as err:  # recorded; the other jobs go on
        if os.environ.get("ATTNCTRL_DEBUG"):
            traceback.print_exc()
        entry.update(status="error", error=f"{type(err).__name__}: {one_line(err)}")
        print(f"{PROG}: job {job.index} (line {job.line}) failed: {entry['error']}", file=sys.stderr)
        return entry
    files = [*inputs, *written]
    entry.update(status="ok", files=[{"path": p.name, "sha256": _sha256(p)} for p in files])
    return entry


def _progress(state, total_pending: int, mine: int, disable: bool):
    from tqdm.auto import tqdm

    if state.is_main_process:  # all processes' jobs, counted from the part files
        return tqdm(total=total_pending, desc="all jobs", position=0, disable=disable, file=sys.stderr)
    return tqdm(total=mine, desc=f"process {state.process_index}", position=state.process_index, disable=disable)


def cmd_batch(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    jobs = read_jobs(args.jobs)  # every line checked before anything is written
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {str(out)!r} is not a directory")
    keys = {j.index: j.key for j in jobs}
    state = procs.state()
    if state.is_main_process:  # (one batch at a time writes to a DIR)
        out.mkdir(parents=True, exist_ok=True)
        manifest.remove_stale_temps(out)
    state.wait_for_everyone()
    part = manifest.PartWriter(out, state.process_index)
    done = manifest.finished(out, keys)
    pending = [j for j in jobs if j.index not in done]
    new_lines = manifest.NewLines(out)
    state.wait_for_everyone()  # every process has read the manifest before any writes to it
    load = Pipelines(state.device)
    with state.split_between_processes(pending) as mine, part:
        bar = _progress(state, len(pending), len(mine), args.no_progress)
        for job in mine:
            part.write(run_job(job, out, load))
            bar.update(new_lines() if state.is_main_process else 1)
        state.wait_for_everyone()
        bar.update(len(pending) - bar.n if state.is_main_process else 0)
        bar.close()
    if state.is_main_process:
        entries = manifest.merge(out, keys)
    state.wait_for_everyone()  # no process ends (which makes a launcher stop the others) before the merge
    if not state.is_main_process:
        return 0  # the run's status is the main process's
    bad = sum(e["status"] != "ok" for e in entries)
    print(
        f"{out / manifest.MANIFEST}: {len(jobs)} jobs, {len(entries) - bad} ok, {bad} failed; "
        f"{len(pending)} run now on {state.num_processes} process(es), {len(done)} done before; "
        f"{time.perf_counter() - start:.1f} s"
    )
    return 1 if bad else 0
