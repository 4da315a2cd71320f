"""Per-photo cost: the models' own forward time, and the whole pipeline around them."""

from __future__ import annotations

import io
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from bench.environment import BenchEnvironment
from worker.db import make_engine
from worker.inference import (
    Prediction,
    Predictor,
    Presence,
    Segmentation,
    get_predictor,
    postprocess,
)
from worker.pipeline import DONE, STAGES, ObservationProcessor, PhotoPredictor
from worker.sample_photos import phone_jpeg
from worker.storage import open_storage

WARMUP_RUNS = 3
E2E_RUNS = 12
THROUGHPUT_PHOTOS = 12


def median_ms(samples_ms: list[float]) -> float:
    """The median, rounded for the report."""
    return round(statistics.median(samples_ms), 2)


def percentile_ms(samples_ms: list[float], fraction: float) -> float:
    """The `fraction` percentile (nearest rank), rounded for the report."""
    ordered = sorted(samples_ms)
    index = min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))
    return round(ordered[index], 2)


class Floor:
    """The models' own forward time on one photo's inputs, batch 1, sampled on call.

    The samples are taken between the end-to-end runs they are compared with, so
    both see the same machine: on a shared machine, a floor measured on its own a
    minute earlier drifts from the runs by more than the overhead being measured.
    """

    def __init__(self, predictor: Predictor, photo: bytes) -> None:
        image = ImageOps.exif_transpose(Image.open(io.BytesIO(photo))).convert("RGB")
        self._runners = {
            "presence": predictor.presence_runner,
            "segmentation": predictor.segmentation_runner,
        }
        self._batches = {
            task: runner.prepare(image) for task, runner in self._runners.items()
        }
        self.samples_ms: dict[str, list[float]] = {task: [] for task in self._runners}

    def sample(self) -> None:
        """Time one forward pass of each model."""
        for task, runner in self._runners.items():
            started_s = time.perf_counter()
            runner.forward(self._batches[task])
            self.samples_ms[task].append(_since_ms(started_s))

    def medians_ms(self) -> dict[str, float]:
        """The median of each model's samples after warm-up."""
        return {
            task: median_ms(samples[WARMUP_RUNS:])
            for task, samples in self.samples_ms.items()
        }


class NaivePredictor:
    """The obvious pipeline: each model decodes the full-size photo on its own."""

    def __init__(self, predictor: Predictor) -> None:
        self._presence = predictor.presence_runner
        self._segmentation = predictor.segmentation_runner

    def _decode(self, photo: bytes) -> Image.Image:
        image = ImageOps.exif_transpose(Image.open(io.BytesIO(photo)))
        return image.convert("RGB")

    def predict(self, photo: bytes) -> Prediction:
        """Presence and segmentation, decoding the photo once per model."""
        timings_ms: dict[str, float] = {}
        started_s = time.perf_counter()

        image = self._decode(photo)
        timings_ms["decode"] = _since_ms(started_s)
        started_s = time.perf_counter()
        batch = self._presence.prepare(image)
        timings_ms["preprocess"] = _since_ms(started_s)
        started_s = time.perf_counter()
        logits = self._presence.forward(batch)
        score = float(1.0 / (1.0 + np.exp(-float(logits.reshape(-1)[0]))))
        label = "present" if score >= self._presence.meta.cut_off else "absent"
        presence = Presence(score, label, self._presence.meta.version)
        timings_ms["presence"] = _since_ms(started_s)
        if label != "present":
            return Prediction(presence, None, timings_ms)

        started_s = time.perf_counter()
        image = self._decode(photo)
        timings_ms["decode"] += _since_ms(started_s)
        started_s = time.perf_counter()
        batch = self._segmentation.prepare(image)
        timings_ms["preprocess"] += _since_ms(started_s)
        started_s = time.perf_counter()
        logits = self._segmentation.forward(batch)
        probability = 1.0 / (1.0 + np.exp(-logits[0, 0].float().cpu().numpy()))
        timings_ms["segmentation"] = _since_ms(started_s)

        started_s = time.perf_counter()
        meta = self._segmentation.meta
        assert meta.postprocess is not None
        small = postprocess(probability >= meta.cut_off, meta.postprocess)
        mask = Image.fromarray(small.astype(np.uint8) * np.uint8(255), "L")
        mask = mask.resize(image.size, Image.Resampling.NEAREST)
        cover_pct = float(np.count_nonzero(np.asarray(mask))) / mask.size[0]
        cover_pct = cover_pct / mask.size[1] * 100.0
        buffer = io.BytesIO()
        mask.save(buffer, "PNG")
        timings_ms["mask_encode"] = _since_ms(started_s)
        segmentation = Segmentation(buffer.getvalue(), cover_pct, meta.version)
        return Prediction(presence, segmentation, timings_ms)


def _since_ms(started_s: float) -> float:
    return (time.perf_counter() - started_s) * 1000.0


@dataclass
class EndToEnd:
    """Median wall time per observation, median time of each stage, and the floor
    sampled between the runs (median forward time of each model)."""

    total_ms: float
    stages_ms: dict[str, float]
    label: str
    floor_ms: dict[str, float]


def _processor(bench: BenchEnvironment, predictor: PhotoPredictor) -> Any:
    settings = bench.settings()
    engine = make_engine(settings, application_name="hyacinth-bench")
    return ObservationProcessor(settings, engine, open_storage(settings), predictor)


def end_to_end(
    bench: BenchEnvironment,
    models: Predictor,
    photo: bytes,
    name: str,
    *,
    pipeline: PhotoPredictor | None = None,
) -> EndToEnd:
    """Process observations of `photo` through the real processor, one at a time,
    with `pipeline` around the models (ours unless given); before each run, one
    floor sample of the models on the same photo."""
    processor = _processor(bench, pipeline or models)
    path = bench.upload_photo(name, photo)
    floor = Floor(models, photo)

    totals_ms: list[float] = []
    stages: dict[str, list[float]] = {stage: [] for stage in STAGES}
    label = ""
    for run in range(WARMUP_RUNS + E2E_RUNS):
        floor.sample()
        (observation_id,) = bench.insert_rows([path], status="queued")
        started_s = time.perf_counter()
        outcome = processor.process(observation_id)
        total_ms = _since_ms(started_s)
        if outcome != DONE:
            raise RuntimeError(f"bench: observation {observation_id} was {outcome}")
        if run < WARMUP_RUNS:
            continue

        totals_ms.append(total_ms)
        with bench.connect() as db:
            row = db.execute(
                "SELECT timings_ms, pred FROM observations WHERE id = %s",
                (observation_id,),
            ).fetchone()
        assert row is not None
        timings, pred = row
        # The final UPDATE cannot time itself: what this run's total has beyond
        # its stages goes to row_update, beside the claim.
        timings["row_update"] += total_ms - sum(timings.values())
        for stage in STAGES:
            if stage in timings:
                stages[stage].append(float(timings[stage]))
        label = pred["presence"]["label"]

    processor.engine.dispose()
    stages_ms = {stage: median_ms(values) for stage, values in stages.items() if values}
    return EndToEnd(median_ms(totals_ms), stages_ms, label, floor.medians_ms())


def photos_per_s(
    bench: BenchEnvironment,
    predictor: PhotoPredictor,
    photo: bytes,
    *,
    worker_threads: int,
    torch_threads: int,
) -> float:
    """Throughput of one worker process: `worker_threads` observations at a time."""
    torch.set_num_threads(torch_threads)
    processor = _processor(bench, predictor)
    path = bench.upload_photo("throughput.jpg", photo)
    warmup = bench.insert_rows([path] * worker_threads, status="queued")
    ids = bench.insert_rows([path] * THROUGHPUT_PHOTOS, status="queued")

    with ThreadPoolExecutor(max_workers=worker_threads) as pool:
        list(pool.map(processor.process, warmup))
        started_s = time.perf_counter()
        outcomes = list(pool.map(processor.process, ids))
        elapsed_s = time.perf_counter() - started_s

    processor.engine.dispose()
    if set(outcomes) != {DONE}:
        raise RuntimeError(f"bench: throughput run ended {sorted(set(outcomes))}")
    return round(len(ids) / elapsed_s, 3)


def measure(bench: BenchEnvironment) -> dict[str, Any]:
    """Floor, our pipeline and the naive one, on 12 MP photos with and without mats.

    Per-photo numbers use the worker's own settings (one torch thread per worker
    thread); throughput compares them with one worker thread using every core.
    """
    predictor = get_predictor(bench.settings())
    with_mats = phone_jpeg(plants=True, seed=1)
    open_water = phone_jpeg(plants=False, seed=2)

    torch.set_num_threads(bench.torch_threads)
    present = end_to_end(bench, predictor, with_mats, "mats.jpg")
    absent = end_to_end(bench, predictor, open_water, "water.jpg")
    naive = end_to_end(
        bench, predictor, with_mats, "mats.jpg", pipeline=NaivePredictor(predictor)
    )
    floor, absent_floor, naive_floor = present.floor_ms, absent.floor_ms, naive.floor_ms
    if present.label != "present" or absent.label != "absent":
        raise RuntimeError(
            f"bench: expected present/absent, got {present.label}/{absent.label}"
        )

    cores = bench.worker_threads * bench.torch_threads
    torch.set_num_threads(cores)
    present_all_cores = end_to_end(bench, predictor, with_mats, "mats.jpg")
    floor_all_cores = present_all_cores.floor_ms
    throughput = photos_per_s(
        bench,
        predictor,
        with_mats,
        worker_threads=bench.worker_threads,
        torch_threads=bench.torch_threads,
    )
    throughput_all_cores = photos_per_s(
        bench, predictor, with_mats, worker_threads=1, torch_threads=cores
    )
    torch.set_num_threads(bench.torch_threads)

    floor_total_ms = floor["presence"] + floor["segmentation"]
    naive_floor_ms = naive_floor["presence"] + naive_floor["segmentation"]
    floor_all_cores_ms = floor_all_cores["presence"] + floor_all_cores["segmentation"]
    # The models' time inside the runs themselves (forward, sigmoid, threshold):
    # the ratio to it is what the pipeline adds, whatever the floor's own noise.
    model_stages_ms = present.stages_ms["presence"] + present.stages_ms["segmentation"]
    return {
        "photo_px": [4032, 3024],
        "photo_bytes": {"present": len(with_mats), "absent": len(open_water)},
        "floor_ms_presence": floor["presence"],
        "floor_ms_segmentation": floor["segmentation"],
        "e2e_ms_present": present.total_ms,
        "e2e_ms_absent": absent.total_ms,
        "e2e_over_floor_present": round(present.total_ms / floor_total_ms, 3),
        "e2e_over_model_stages_present": round(present.total_ms / model_stages_ms, 3),
        "e2e_over_floor_absent": round(absent.total_ms / absent_floor["presence"], 3),
        "naive_ms_present": naive.total_ms,
        "naive_over_floor_present": round(naive.total_ms / naive_floor_ms, 3),
        "stages_ms_present": present.stages_ms,
        "stages_ms_absent": absent.stages_ms,
        "stages_ms_naive_present": naive.stages_ms,
        "photos_per_s_present": throughput,
        "one_thread_all_cores": {
            "torch_threads": cores,
            "floor_ms_presence": floor_all_cores["presence"],
            "floor_ms_segmentation": floor_all_cores["segmentation"],
            "e2e_ms_present": present_all_cores.total_ms,
            "e2e_over_floor_present": round(
                present_all_cores.total_ms / floor_all_cores_ms, 3
            ),
            "stages_ms_present": present_all_cores.stages_ms,
            "photos_per_s_present": throughput_all_cores,
        },
    }
