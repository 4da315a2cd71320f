"""A real worker process: time to its first finished observation, and its memory."""

from __future__ import annotations

import shutil
import sys
import time
from typing import Any

import psutil

from bench.environment import REPO_ROOT, BenchEnvironment, wait_until
from worker.embedded import background
from worker.sample_photos import phone_jpeg


def _peak_rss_mb(pid: int) -> float:
    """The largest resident set a process had (VmHWM), in MiB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"bench: no VmHWM for process {pid}")


def _first_observation(bench: BenchEnvironment, path: str, name: str) -> dict[str, Any]:
    """Start a worker, insert a photo per thread, and time the first to finish."""
    python = sys.executable
    worker = [python, "-m", "dramatiq", "worker.actors"]
    worker += ["--processes", "1", "--threads", str(bench.worker_threads)]
    log_path = bench.work_dir / f"worker-{name}.log"

    started_s = time.perf_counter()
    with background(worker, bench.env, log_path, cwd=REPO_ROOT) as process:
        # One photo per worker thread, so the peak memory has them all in flight.
        ids = bench.insert_rows([path] * bench.worker_threads)

        def done() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"bench: worker exited; see {log_path}")
            return bench.finished(ids) > 0

        wait_until(done, timeout_s=300, what="for the worker's first observation")
        first_s = time.perf_counter() - started_s
        wait_until(
            lambda: bench.finished(ids) == len(ids),
            timeout_s=300,
            what="for the other photos",
        )

        children = psutil.Process(process.pid).children(recursive=True)
        peak_mb = max(_peak_rss_mb(child.pid) for child in children)
    return {"first_s": round(first_s, 2), "peak_rss_mb": round(peak_mb, 1)}


def measure(bench: BenchEnvironment) -> dict[str, Any]:
    """Cold start (empty model cache), warm start (filled), and peak memory."""
    path = bench.upload_photo("startup.jpg", phone_jpeg(plants=True, seed=3))
    listener = [sys.executable, "-m", "worker.cli", "listen"]

    with background(
        listener, bench.env, bench.work_dir / "listener-startup.log", cwd=REPO_ROOT
    ):
        shutil.rmtree(bench.env["MODEL_CACHE_DIR"], ignore_errors=True)
        cold = _first_observation(bench, path, "cold")
        warm = _first_observation(bench, path, "warm")

    return {
        "cold_start_s": cold["first_s"],
        "warm_start_s": warm["first_s"],
        "worker_rss_mb": max(cold["peak_rss_mb"], warm["peak_rss_mb"]),
    }
