"""The Dramatiq broker on REDIS_URL, and observation messages built without the actors.

The listener enqueues through here so that it never imports the actors module, and
with it torch and the models.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.common import current_millis, dq_name
from dramatiq.middleware import CurrentMessage, Retries, default_middleware

from worker.config import OBSERVATIONS_QUEUE, Settings
from worker.errors import ConfigError

#: The one actor: worker.actors.process_observation.
ACTOR_NAME = "process_observation"

_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def open_broker(settings: Settings) -> RedisBroker:
    """A Redis broker: default middleware, our retry policy, and CurrentMessage."""
    if not settings.redis_url.startswith(_REDIS_SCHEMES):
        raise ConfigError(
            "REDIS_URL must start with redis://, rediss:// or unix://: use the "
            "connection string of the Redis add-on"
        )

    middleware: list[dramatiq.Middleware] = [
        kind() for kind in default_middleware if kind is not Retries
    ]
    middleware.append(
        Retries(
            max_retries=settings.max_retries,
            min_backoff=settings.retry_min_backoff_ms,
            max_backoff=settings.retry_max_backoff_ms,
        )
    )
    middleware.append(CurrentMessage())

    broker = RedisBroker(url=settings.redis_url, middleware=middleware)  # type: ignore[no-untyped-call]
    broker.declare_queue(OBSERVATIONS_QUEUE)
    return broker


def observation_message(observation_id: str) -> dramatiq.Message[None]:
    """The message that makes a worker process one observation."""
    return dramatiq.Message(
        queue_name=OBSERVATIONS_QUEUE,
        actor_name=ACTOR_NAME,
        args=(observation_id,),
        kwargs={},
        options={},
    )


def waiting_messages(broker: RedisBroker) -> int:
    """Messages on the observations queue that no worker has fetched yet."""
    # Dramatiq's Redis broker keeps the waiting message ids in the list
    # "{namespace}:{queue}"; fetched but unacknowledged ones are not in it.
    return int(broker.client.llen(f"{broker.namespace}:{OBSERVATIONS_QUEUE}"))


def _dispatch_args(
    broker: RedisBroker,
    command: str,
    queue_name: str,
    *command_args: str | bytes,
    maintenance: bool = False,
) -> list[str | bytes | int]:
    """The arguments Dramatiq's dispatch.lua takes, as RedisBroker._dispatch builds
    them: command, time, queue, worker id, timeouts, maintenance flag, unpack size.
    """
    return [
        command,
        current_millis(),
        queue_name,
        broker.broker_id,
        broker.heartbeat_timeout,
        broker.dead_message_ttl,
        int(maintenance),
        # The chunk size the maintenance deletes expired dead letters in; zero
        # would loop on empty chunks and fail the script once a dead letter expires.
        broker._max_unpack_size() if maintenance else 0,  # type: ignore[no-untyped-call]
        *command_args,
    ]


def return_dead_workers_messages(broker: RedisBroker) -> None:
    """Have Dramatiq put the messages a dead worker held back on their queues.

    A worker holds the messages it prefetched and the retries waiting out their
    backoff; killed, it leaves them unacknowledged, and their rows sit `queued`.
    Dramatiq's Redis broker gives such messages back (once the worker has sent no
    heartbeat for `heartbeat_timeout`, 60 s) only in the maintenance its script
    runs on about one command in a thousand. The listener's sweep runs it on each
    pass instead, for the queue and its delay queue.
    """
    dispatch = broker.scripts["dispatch"]
    for queue_name in (OBSERVATIONS_QUEUE, dq_name(OBSERVATIONS_QUEUE)):
        # A command the script does not know does nothing but the maintenance.
        dispatch(
            keys=[broker.namespace],
            args=_dispatch_args(broker, "maintenance", queue_name, maintenance=True),
        )


def enqueue_observations(broker: RedisBroker, observation_ids: Iterable[str]) -> int:
    """Put one message per observation id on the queue, in one round trip to Redis."""
    messages = [
        observation_message(observation_id).copy(
            options={"redis_message_id": str(uuid.uuid4())}
        )
        for observation_id in observation_ids
    ]
    if not messages:
        return 0

    # RedisBroker.enqueue costs a round trip per message, which caps a bulk claim
    # near 2,500 rows/s. The same script with the same arguments, sent through a
    # pipeline, takes one round trip per batch; test_queue checks both agree.
    dispatch = broker.scripts["dispatch"]
    with broker.client.pipeline(transaction=False) as pipe:
        for message in messages:
            broker.emit_before("enqueue", message, None)
            dispatch(
                keys=[broker.namespace],
                args=_dispatch_args(
                    broker,
                    "enqueue",
                    OBSERVATIONS_QUEUE,
                    message.options["redis_message_id"],
                    message.encode(),
                ),
                client=pipe,
            )
        pipe.execute()

    for message in messages:
        broker.emit_after("enqueue", message, None)
    return len(messages)
