"""Dispatch: insert to actor start for single rows, and claim rate for a bulk insert.

The real listener runs, and `bench.standin_actors` stands in for the models so that
the time measured is the queue's alone: trigger, NOTIFY, claim, Redis, consumer.
"""

from __future__ import annotations

import random
import sys
import time
from typing import Any

from bench.environment import REPO_ROOT, BenchEnvironment, wait_until
from bench.model_time import median_ms, percentile_ms
from worker.embedded import background

SINGLE_INSERTS = 500
BULK_ROWS = 10_000


def _latencies_ms(bench: BenchEnvironment, ids: list[str]) -> list[float]:
    with bench.connect() as db:
        rows = db.execute(
            "SELECT extract(epoch FROM started_at - created_at) * 1000 "
            "FROM observations WHERE id = ANY(%s::uuid[])",
            (ids,),
        ).fetchall()
    return [float(row[0]) for row in rows]


def measure(bench: BenchEnvironment) -> dict[str, Any]:
    """Single-insert latency percentiles and bulk claim rate."""
    python = sys.executable
    listener = [python, "-m", "worker.cli", "listen"]
    standin = [python, "-m", "dramatiq", "bench.standin_actors"]
    # The stand-in runs as the Procfile runs a worker: its threads, its prefetch.
    standin += ["--processes", "1", "--threads", str(bench.worker_threads)]
    logs = bench.work_dir

    with (
        background(listener, bench.env, logs / "listener.log", cwd=REPO_ROOT),
        background(standin, bench.env, logs / "standin.log", cwd=REPO_ROOT),
    ):
        warmup = bench.insert_rows(["warmup.jpg"] * 5)
        wait_until(
            lambda: bench.status_counts(warmup).get("done") == len(warmup),
            timeout_s=60,
            what="for the stand-in worker to start",
        )

        # Independent arrivals, a few milliseconds to a few tens apart, so the
        # consumer is idle between them as it is in production.
        rng = random.Random(5)
        ids: list[str] = []
        with bench.connect() as db:
            for _ in range(SINGLE_INSERTS):
                row = db.execute(
                    "INSERT INTO observations (user_id, bucket, path) "
                    "VALUES (gen_random_uuid(), 'photos', 'single.jpg') "
                    "RETURNING id::text"
                ).fetchone()
                assert row is not None
                ids.append(row[0])
                time.sleep(rng.uniform(0.005, 0.040))
        wait_until(
            lambda: bench.status_counts(ids).get("done") == len(ids),
            timeout_s=120,
            what="for every single insert to reach the stand-in",
        )
        latencies_ms = _latencies_ms(bench, ids)

        with bench.connect() as db:
            db.execute(
                "INSERT INTO observations (user_id, bucket, path) "
                "SELECT gen_random_uuid(), 'photos', 'bulk-' || n || '.jpg' "
                "FROM generate_series(1, %s) AS n",
                (BULK_ROWS,),
            )
        bulk_s = wait_until(
            lambda: "pending" not in bench.status_counts(),
            timeout_s=300,
            what="for the bulk insert to be claimed",
        )
        wait_until(
            lambda: bench.status_counts().keys() <= {"done"},
            timeout_s=300,
            what="for the stand-in to drain the queue",
        )

    return {
        "dispatch_inserts": len(latencies_ms),
        "dispatch_ms_p50": median_ms(latencies_ms),
        "dispatch_ms_p95": percentile_ms(latencies_ms, 0.95),
        "dispatch_ms_p99": percentile_ms(latencies_ms, 0.99),
        "dispatch_ms_max": round(max(latencies_ms), 2),
        "bulk_rows": BULK_ROWS,
        "bulk_claim_s": round(bulk_s, 3),
        "bulk_rows_per_s": round(BULK_ROWS / bulk_s),
    }
