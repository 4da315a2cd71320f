"""The Dramatiq module (`dramatiq worker.actors`): one actor, one observation a message.

One actor rather than a presence queue chained to a segmentation queue: the photo is
downloaded and decoded once and shared by both models, with no second hop through
Redis. Operators scale by adding worker processes or dynos.
"""

from __future__ import annotations

import logging
import threading

import dramatiq
from dramatiq.middleware import CurrentMessage, MiddlewareError

from worker.config import OBSERVATIONS_QUEUE, Settings
from worker.logs import check_log_level, install_filters, secrets_of
from worker.pipeline import ObservationProcessor, RetryLater
from worker.queue import ACTOR_NAME, open_broker

log = logging.getLogger(__name__)

#: The message option that carries RetryLater.held_token to the retry.
HELD_TOKEN_OPTION = "hyacinth_held_token"

settings = Settings.from_env()

_processor: ObservationProcessor | None = None
_processor_lock = threading.Lock()


def get_processor() -> ObservationProcessor:
    """This process's processor: models, storage and database pool, built once."""
    global _processor
    with _processor_lock:
        if _processor is None:
            from worker.db import make_engine
            from worker.inference import get_predictor
            from worker.storage import open_storage

            predictor = get_predictor(settings)
            storage = open_storage(settings)
            engine = make_engine(settings, application_name="hyacinth-worker")
            _processor = ObservationProcessor(settings, engine, storage, predictor)
        return _processor


class LoadModels(dramatiq.Middleware):
    """Loads both models before the worker threads take messages.

    Dramatiq's after_worker_boot fires once the threads already run, so the first
    messages would wait on the load; a model that cannot load stops the boot here.
    """

    def before_worker_boot(
        self, broker: dramatiq.Broker, worker: dramatiq.Worker
    ) -> None:
        """Build the processor, loading the configured models, or fail loudly."""
        try:
            get_processor()
        except Exception as error:
            log.critical(
                "worker.boot_failed presence=%s segmentation=%s: fix the model "
                "settings or storage, then restart the worker",
                settings.presence_model_version,
                settings.segmentation_model_version,
                exc_info=True,
            )
            # Dramatiq logs and ignores any other exception from a middleware, and
            # would start the threads anyway: every message would then fail.
            raise MiddlewareError(f"worker boot failed: {error}") from error
        log.info(
            "worker.ready presence=%s segmentation=%s",
            settings.presence_model_version,
            settings.segmentation_model_version,
        )


def _install_log_filter() -> None:
    """Tag and redact the lines Dramatiq's logging setup writes."""
    for handler in logging.getLogger().handlers:
        install_filters(handler, secrets_of(settings))
    logging.getLogger("worker").setLevel(check_log_level(settings.log_level))
    for noisy in ("httpx", "httpcore", "hpack", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


broker = open_broker(settings)
broker.add_middleware(LoadModels())
dramatiq.set_broker(broker)
_install_log_filter()


@dramatiq.actor(
    actor_name=ACTOR_NAME,
    queue_name=OBSERVATIONS_QUEUE,
    max_retries=settings.max_retries,
)
def process_observation(observation_id: str) -> None:
    """Process one observation; transient failures are retried with backoff."""
    message = CurrentMessage.get_current_message()
    options = message.options if message else {}
    retries = int(options.get("retries", 0))
    held_token = options.get(HELD_TOKEN_OPTION)

    try:
        get_processor().process(
            observation_id,
            retries=retries,
            held_token=None if held_token is None else int(held_token),
        )
    except RetryLater as error:
        # Dramatiq's Retries middleware enqueues this same message again, options
        # and all: the retry learns whether it may take back a row this try holds.
        options[HELD_TOKEN_OPTION] = error.held_token
        raise dramatiq.Retry(str(error)) from error
