"""Processing one observation: claim, download, predict, upload the mask, write `pred`.

Every write after the claim carries the `attempts` the claim returned (a fencing
token) and `status = 'processing'`: a worker that lost its row to the safety sweep
cannot overwrite the result of the worker that took it over.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import psycopg
import redis
from dramatiq.middleware import TimeLimitExceeded
from psycopg.types.json import Jsonb
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from worker import queries
from worker.config import Settings
from worker.errors import (
    HyacinthError,
    MissingObjectError,
    ModelError,
    PhotoError,
    StoragePathError,
)
from worker.inference import Prediction
from worker.logs import observation_context, redact, secrets_of
from worker.storage import Storage

log = logging.getLogger(__name__)

#: Longest error text written on a row.
MAX_ERROR_CHARS = 500

#: Pauses before each new try of a claim or a write that lost its connection. A
#: dropped connection or a failover of a few seconds is ridden out here; a longer
#: outage ends the try, and the message is retried or the lease sweep takes over.
DATABASE_RETRY_DELAYS_S = (0.2, 1.0, 3.0)

_T = TypeVar("_T")

#: The stages of one observation, in order, as `timings_ms` names them.
STAGES = (
    "download",
    "decode",
    "preprocess",
    "presence",
    "segmentation",
    "mask_encode",
    "upload",
    "row_update",
)

DONE = "done"
FAILED = "failed"
SKIPPED = "skipped"
LEASE_LOST = "lease_lost"


class PhotoPredictor(Protocol):
    """What the pipeline needs of the models: one photo in, one prediction out."""

    def predict(self, photo: bytes) -> Prediction:
        """Run presence, then segmentation when present."""
        ...


class RetryLater(HyacinthError):
    """A transient failure with tries left: retry the observation later.

    `held_token` is set when the row could not be handed back and is still this
    try's, `processing` under a stopped heartbeat: the retry takes it back by that
    token instead of waiting out the lease.
    """

    transient = True

    def __init__(self, reason: str, *, held_token: int | None = None) -> None:
        super().__init__(reason)
        self.held_token = held_token


class _LeaseLost(Exception):
    """The row was taken over by another worker while this one processed it."""


@dataclass(frozen=True)
class Claim:
    """A row this worker holds: `token` is the attempts value the claim set."""

    observation_id: str
    token: int
    user_id: str
    bucket: str
    path: str


def is_transient(error: BaseException) -> bool:
    """Whether trying the same observation again later may succeed."""
    if isinstance(error, HyacinthError):
        return error.transient
    if isinstance(error, DBAPIError) and error.connection_invalidated:
        return True
    return isinstance(
        error,
        (
            psycopg.OperationalError,
            redis.exceptions.ConnectionError,
            redis.exceptions.TimeoutError,
            ConnectionError,
            TimeoutError,
        ),
    ) or isinstance(getattr(error, "orig", None), psycopg.OperationalError)


def describe(error: BaseException) -> str:
    """A short, readable account of why an observation failed."""
    text = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, PhotoError):
        return f"bad photo: {text}"
    if isinstance(error, MissingObjectError):
        return f"photo not found: {text}"
    if isinstance(error, StoragePathError):
        return f"bad photo path: {text}"
    if isinstance(error, ModelError):
        return f"model problem: {text}"
    if isinstance(error, HyacinthError):
        return text
    return f"unexpected {type(error).__name__}: {text}"


class Heartbeat:
    """Renews the row's heartbeat every `interval_s` while a photo is processed."""

    def __init__(self, engine: Engine, claim: Claim, interval_s: float) -> None:
        self._engine = engine
        self._claim = claim
        self._interval_s = interval_s
        self._stopped = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"heartbeat-{claim.observation_id[:8]}", daemon=True
        )

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stopped.set()
        self._thread.join()

    def _run(self) -> None:
        params = {"id": self._claim.observation_id, "token": self._claim.token}
        while not self._stopped.wait(self._interval_s):
            try:
                with self._engine.begin() as connection:
                    renewed = connection.exec_driver_sql(queries.HEARTBEAT, params)
            except SQLAlchemyError as error:
                log.warning(
                    "observation.heartbeat_failed observation_id=%s error=%s",
                    self._claim.observation_id,
                    " ".join(str(error).split())[:200],
                )
                continue

            if renewed.rowcount == 0:
                log.warning(
                    "observation.lease_lost observation_id=%s: another worker took "
                    "the row over; this result will be discarded",
                    self._claim.observation_id,
                )
                return


class ObservationProcessor:
    """Processes observations by id; one instance is shared by a worker's threads."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        storage: Storage,
        predictor: PhotoPredictor,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.storage = storage
        self.predictor = predictor
        self._secrets = secrets_of(settings)

    def process(
        self,
        observation_id: str,
        *,
        retries: int = 0,
        held_token: int | None = None,
    ) -> str:
        """Process one observation; `retries` is how many tries failed before.

        Returns the outcome (done, failed, skipped, lease_lost). Raises RetryLater
        when a transient failure leaves tries: the caller retries with backoff,
        passing on the error's `held_token`.
        """
        try:
            return self._process(observation_id, retries, held_token)
        except RetryLater:
            raise
        except Exception as error:
            if not is_transient(error):
                raise
            raise self._retry_later(observation_id, error, retries) from error

    def _retry_later(
        self,
        observation_id: str,
        error: Exception,
        retries: int,
        held_token: int | None = None,
    ) -> RetryLater:
        reason = self._clean(describe(error))
        log.info(
            "observation.retrying observation_id=%s try=%d error=%s",
            observation_id,
            retries + 1,
            reason,
        )
        return RetryLater(reason, held_token=held_token)

    def _process(
        self, observation_id: str, retries: int, held_token: int | None
    ) -> str:
        try:
            observation_id = str(uuid.UUID(observation_id))
        except ValueError:
            log.warning(
                "observation.bad_message observation_id=%r ignored", observation_id[:80]
            )
            return SKIPPED

        with observation_context(observation_id):
            return self._process_valid(observation_id, retries, held_token)

    def _process_valid(
        self, observation_id: str, retries: int, held_token: int | None
    ) -> str:
        started_s = time.perf_counter()
        claim = self._claim(observation_id, held_token)
        timings_ms = {"row_update": _ms_since(started_s)}
        if claim is None:
            log.info(
                "observation.skipped observation_id=%s: not queued any more "
                "(finished, or held by a live worker)",
                observation_id,
            )
            return SKIPPED

        log.info(
            "observation.started observation_id=%s attempt=%d",
            observation_id,
            claim.token,
        )
        try:
            return self._process_claimed(claim, retries, timings_ms, started_s)
        except RetryLater:
            raise
        except Exception as error:
            if not is_transient(error):
                raise
            # A write after the claim failed even after its tries in place: the row
            # is still this try's, `processing` with its heartbeat stopped.
            raise self._retry_later(
                observation_id, error, retries, held_token=claim.token
            ) from error

    def _process_claimed(
        self,
        claim: Claim,
        retries: int,
        timings_ms: dict[str, float],
        started_s: float,
    ) -> str:
        try:
            with Heartbeat(self.engine, claim, self.settings.heartbeat_s):
                pred = self._predict(claim, timings_ms)
        except _LeaseLost:
            log.warning(
                "observation.lease_lost observation_id=%s: another worker holds the "
                "row; its mask is left alone",
                claim.observation_id,
            )
            return LEASE_LOST
        except Exception as error:
            return self._fail_or_retry(claim, error, retries, timings_ms)
        except TimeLimitExceeded:
            # Dramatiq interrupts a message past its time limit (10 minutes by
            # default), some hundred times a photo's usual time: a photo that
            # slow fails rather than taking a worker thread down again on retry.
            reason = "took longer than the worker's time limit"
            log.warning(
                "observation.failed observation_id=%s error=%s",
                claim.observation_id,
                reason,
            )
            self._record_interrupt(
                claim, lambda: self._write_failed(claim, reason, timings_ms)
            )
            raise
        except BaseException:
            # Another interrupt stops this thread: the row goes back on the queue now
            # rather than waiting for its lease to run out.
            self._record_interrupt(
                claim, lambda: self._write(queries.REQUEUE, claim, error="interrupted")
            )
            raise

        return self._finish(claim, pred, timings_ms, started_s)

    def _record_interrupt(self, claim: Claim, write: Callable[[], object]) -> None:
        """Write what an interrupt means for the row; the interrupt goes on anyway.

        Were the write's own failure raised instead, it would stand in for the
        interrupt and be retried as a database error, photo and all.
        """
        try:
            write()
        except Exception as error:
            log.warning(
                "observation.interrupt_unrecorded observation_id=%s error=%s: the "
                "lease sweep takes the row back",
                claim.observation_id,
                self._clean(describe(error)),
            )

    def _claim(self, observation_id: str, held_token: int | None) -> Claim | None:
        params = {
            "id": observation_id,
            "lease_s": self.settings.lease_s,
            "held_token": held_token,
        }

        def claim() -> Any:
            with self.engine.begin() as connection:
                return connection.exec_driver_sql(
                    queries.CLAIM_OBSERVATION, params
                ).fetchone()

        row = _retrying_database(claim, step="claim")
        if row is None:
            return None
        token, user_id, bucket, path = row
        return Claim(observation_id, int(token), str(user_id), bucket, path)

    def _predict(self, claim: Claim, timings_ms: dict[str, float]) -> dict[str, Any]:
        """Download, run the models, upload the mask; returns the new `pred`."""
        step_s = time.perf_counter()
        photo = self.storage.download(claim.bucket, claim.path)
        timings_ms["download"] = _ms_since(step_s)

        prediction = self.predictor.predict(photo)
        timings_ms.update(prediction.timings_ms)
        pred: dict[str, Any] = {"presence": prediction.presence.as_pred()}

        segmentation = prediction.segmentation
        if segmentation is None:
            return pred

        # Upsert: a redelivered message or a reprocess writes the same path again.
        # A worker whose row was taken over meanwhile must not overwrite the mask of
        # the one that took it: a fenced heartbeat first says whether it still holds.
        mask_path = f"{claim.user_id}/{claim.observation_id}.png"
        step_s = time.perf_counter()
        if not self._write(queries.HEARTBEAT, claim):
            raise _LeaseLost(claim.observation_id)
        self.storage.upload(
            self.settings.masks_bucket,
            mask_path,
            segmentation.mask_png,
            content_type="image/png",
            upsert=True,
        )
        timings_ms["upload"] = _ms_since(step_s)

        pred["seg"] = {
            "mask_url": f"supabase://{self.settings.masks_bucket}/{mask_path}",
            "cover_pct": segmentation.cover_pct,
            "model_v": segmentation.model_v,
        }
        return pred

    def _finish(
        self,
        claim: Claim,
        pred: dict[str, Any],
        timings_ms: dict[str, float],
        started_s: float,
    ) -> str:
        # `pred` is replaced, not merged: a rerun that finds no plants drops `seg`.
        written = self._write(
            queries.FINISH_DONE,
            claim,
            pred=Jsonb(pred),
            timings_ms=Jsonb(_rounded(timings_ms)),
        )
        if not written:
            log.warning(
                "observation.lease_lost observation_id=%s: result discarded, another "
                "worker holds the row",
                claim.observation_id,
            )
            return LEASE_LOST

        presence = pred["presence"]
        log.info(
            "observation.done observation_id=%s label=%s score=%.3f cover_pct=%s "
            "total_ms=%.1f timings_ms=%s",
            claim.observation_id,
            presence["label"],
            presence["score"],
            pred["seg"]["cover_pct"] if "seg" in pred else "-",
            _ms_since(started_s),
            _rounded(timings_ms),
        )
        return DONE

    def _fail_or_retry(
        self,
        claim: Claim,
        error: Exception,
        retries: int,
        timings_ms: dict[str, float],
    ) -> str:
        reason = self._clean(describe(error))
        if is_transient(error):
            tries = retries + 1
            if retries < self.settings.max_retries:
                log.info(
                    "observation.retrying observation_id=%s try=%d error=%s",
                    claim.observation_id,
                    tries,
                    reason,
                )
                self._write(queries.REQUEUE, claim, error=reason)
                raise RetryLater(reason) from error

            reason = self._clean(f"gave up after {tries} tries: {reason}")
            log.warning(
                "observation.gave_up observation_id=%s error=%s",
                claim.observation_id,
                reason,
            )
        elif isinstance(error, HyacinthError):
            log.warning(
                "observation.failed observation_id=%s error=%s",
                claim.observation_id,
                reason,
            )
        else:
            log.exception(
                "observation.crashed observation_id=%s error=%s",
                claim.observation_id,
                reason,
            )

        self._write_failed(claim, reason, timings_ms)
        return FAILED

    def _write_failed(
        self, claim: Claim, reason: str, timings_ms: dict[str, float]
    ) -> None:
        self._write(
            queries.FINISH_FAILED,
            claim,
            error=reason,
            timings_ms=Jsonb(_rounded(timings_ms)),
        )

    def _write(self, query: str, claim: Claim, **params: Any) -> bool:
        """Run a fenced write; False when the row is no longer this worker's."""
        params.update(id=claim.observation_id, token=claim.token)

        def write() -> int:
            with self.engine.begin() as connection:
                return connection.exec_driver_sql(query, params).rowcount

        return _retrying_database(write, step=query.split()[0].lower()) == 1

    def _clean(self, text: str) -> str:
        return redact(text, self._secrets)[:MAX_ERROR_CHARS]


def _retrying_database(action: Callable[[], _T], *, step: str) -> _T:
    """`action`, tried again after DATABASE_RETRY_DELAYS_S when the database drops.

    Without this, a final write lost to a dropped connection would leave the row
    `processing` under a fresh heartbeat: the retried message would find it held
    and skip it, and only the lease sweep would bring it back, counted as a worker
    that died. A write whose commit landed before the connection dropped finds the
    row no longer `processing` on its next try and reports the lease lost.
    """
    for delay_s in DATABASE_RETRY_DELAYS_S:
        try:
            return action()
        except SQLAlchemyError as error:
            if not is_transient(error):
                raise
            log.info(
                "observation.database_retry step=%s retry_in_s=%.1f error=%s",
                step,
                delay_s,
                " ".join(str(error).split())[:200],
            )
        time.sleep(delay_s)
    return action()


def _ms_since(start_s: float) -> float:
    return (time.perf_counter() - start_s) * 1000.0


def _rounded(timings_ms: dict[str, float]) -> dict[str, float]:
    return {stage: round(value, 2) for stage, value in timings_ms.items()}
