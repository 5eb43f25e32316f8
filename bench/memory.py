"""Peak memory of one run: exact peak RSS on Linux CPU (VmHWM reset), CUDA allocator peak on GPU."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import re
import threading
import time

import torch


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
        return int(m.group(1)) if m else None
    except OSError:
        return None


def _malloc_trim() -> None:
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _can_reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kib("VmHWM") is not None
    except OSError:
        return False


class _Sampler:
    """Fallback: peak of psutil RSS sampled every `interval` s by a thread (torch ops release the GIL)."""

    def __init__(self, interval: float = 0.002):
        import psutil

        self.proc, self.interval, self.peak = psutil.Process(), interval, 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self):
        self.peak = self.proc.memory_info().rss
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


class PeakMemory:
    """Peak memory a run adds on top of what was live when it started, in MiB.

    CUDA: ``torch.cuda.max_memory_allocated()`` (reset before the run) minus ``memory_allocated()``
    at the start: tensors only, excluding the caching allocator's reserve.
    CPU (Linux): the kernel's exact peak RSS. Before the run: ``gc.collect()``, glibc
    ``malloc_trim(0)`` (so memory freed by earlier runs is returned to the OS and cannot hide this
    run's allocations), then ``/proc/self/clear_refs`` <- 5 resets VmHWM to the current RSS; after
    the run: VmHWM - VmRSS(start). Includes everything the process touched during the run (torch,
    numpy, PIL, Python objects). Fallback where VmHWM cannot be reset: the peak of psutil RSS
    sampled every 2 ms (may miss short spikes).
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.hwm = not self.cuda and _can_reset_hwm()
        if self.cuda:
            self.method = "CUDA max_memory_allocated - memory_allocated at start (tensors only)"
        elif self.hwm:
            self.method = "CPU peak RSS - RSS at start (kernel VmHWM, reset per run via /proc/self/clear_refs; after gc + malloc_trim)"
        else:
            self.method = "CPU peak RSS - RSS at start (psutil sampled every 2 ms; may miss short spikes)"

    @contextlib.contextmanager
    def measure(self, out: dict):
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            yield
            torch.cuda.synchronize()
            out["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        elif self.hwm:
            _malloc_trim()
            base = _status_kib("VmRSS")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            yield
            out["peak_mib"] = (_status_kib("VmHWM") - base) / 1024
        else:
            _malloc_trim()
            with _Sampler() as s:
                base = s.peak
                yield
            out["peak_mib"] = (s.peak - base) / 2**20
