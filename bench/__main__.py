"""`python -m bench`: model floor, pipeline, naive path, dispatch and worker start.

Runs on embedded PostgreSQL and Redis with local storage, and writes
bench/results/latest.json and bench/results/latest.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench import dispatch, model_time, startup
from bench.environment import BenchEnvironment, prepare
from worker.embedded import embedded_services
from worker.pipeline import STAGES

RESULTS_DIR = Path(__file__).resolve().parent / "results"

TARGETS = {
    "e2e_over_floor_present": ("<=", 1.15),
    "dispatch_ms_p99": ("<=", 50.0),
    "bulk_rows_per_s": (">=", 2000.0),
    "worker_rss_mb": ("<=", 1500.0),
}


def machine(bench: BenchEnvironment) -> dict[str, Any]:
    """What the numbers were measured on, and the worker settings they used."""
    return {
        "cores": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": bench.torch_threads,
        "device": bench.env["TORCH_DEVICE"],
        "worker_processes": 1,
        "worker_threads": bench.worker_threads,
        "dramatiq_worker_timeout_ms": int(bench.env["dramatiq_worker_timeout"]),
        "dramatiq_queue_prefetch": int(bench.env["dramatiq_queue_prefetch"]),
    }


def verdicts(results: dict[str, Any]) -> dict[str, bool]:
    """Whether each target holds."""
    met = {}
    for key, (op, limit) in TARGETS.items():
        value = float(results[key])
        met[key] = value <= limit if op == "<=" else value >= limit
    return met


def markdown(results: dict[str, Any]) -> str:
    """The short table that sits beside latest.json."""
    m = results["machine"]
    lines = [
        f"# Benchmark results ({results['measured_at']})",
        "",
        f"{m['cores']} cores ({m['cpu']}), torch {m['torch']}, "
        f"CPU. The worker as the README sets it: 1 process x {m['worker_threads']} "
        f"threads x {m['torch_threads']} torch thread(s).",
        "",
        "| measure | value | target |",
        "|---|---|---|",
    ]
    rows = [
        ("presence forward (floor)", f"{results['floor_ms_presence']} ms", ""),
        ("segmentation forward (floor)", f"{results['floor_ms_segmentation']} ms", ""),
        ("end to end, plants present", f"{results['e2e_ms_present']} ms", ""),
        ("end to end, no plants", f"{results['e2e_ms_absent']} ms", ""),
        ("end to end / floor, present", results["e2e_over_floor_present"], "<= 1.15"),
        (
            "end to end / the models' stages in the same runs, present",
            results["e2e_over_model_stages_present"],
            "",
        ),
        ("naive path / floor, present", results["naive_over_floor_present"], ""),
        (
            "photos with plants per second, one worker",
            results["photos_per_s_present"],
            "",
        ),
        ("dispatch p50", f"{results['dispatch_ms_p50']} ms", ""),
        ("dispatch p95", f"{results['dispatch_ms_p95']} ms", ""),
        ("dispatch p99", f"{results['dispatch_ms_p99']} ms", "<= 50 ms"),
        ("bulk claim and enqueue", f"{results['bulk_rows_per_s']} rows/s", ">= 2000"),
        ("worker peak RSS", f"{results['worker_rss_mb']} MiB", "<= 1500"),
        ("worker start to first done, cold cache", f"{results['cold_start_s']} s", ""),
        ("worker start to first done, warm cache", f"{results['warm_start_s']} s", ""),
    ]
    lines += [f"| {name} | {value} | {target} |" for name, value, target in rows]

    alt = results["one_thread_all_cores"]
    lines += [
        "",
        f"The same worker with 1 thread x {alt['torch_threads']} torch threads: floor "
        f"{alt['floor_ms_presence']} + {alt['floor_ms_segmentation']} ms, end to end "
        f"{alt['e2e_ms_present']} ms ({alt['e2e_over_floor_present']} x floor), "
        f"{alt['photos_per_s_present']} photos with plants per second.",
    ]
    lines += ["", "Stages, median ms (present, ours / naive):", ""]
    lines += ["| stage | ours | naive |", "|---|---|---|"]
    ours = results["stages_ms_present"]
    naive = results["stages_ms_naive_present"]
    for stage in STAGES:
        lines.append(f"| {stage} | {ours.get(stage, '-')} | {naive.get(stage, '-')} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    """Run every part and write the results."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args()

    started_s = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hyacinth-bench-") as tmp:
        work_dir = Path(tmp)
        with embedded_services(work_dir / "services") as services:
            database_url = services.fresh_database("hyacinth_bench")
            bench = prepare(work_dir, database_url, services.redis_url)
            os.environ.update(
                TORCH_NUM_THREADS=bench.env["TORCH_NUM_THREADS"],
            )

            print("bench: models (floor, end to end, naive)", flush=True)
            results: dict[str, Any] = model_time.measure(bench)
            print("bench: dispatch (500 single inserts, one bulk insert)", flush=True)
            results.update(dispatch.measure(bench))
            print("bench: worker start and memory", flush=True)
            results.update(startup.measure(bench))

    results["machine"] = machine(bench)
    results["measured_at"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    results["bench_s"] = round(time.perf_counter() - started_s, 1)
    results["targets_met"] = verdicts(results)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "latest.md").write_text(markdown(results))
    print(markdown(results))
    return 0 if all(results["targets_met"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
