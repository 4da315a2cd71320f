"""The broker and the messages the listener sends: what a Dramatiq worker expects."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator

import dramatiq
import pytest
import redis
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import CurrentMessage, Retries

from worker.config import OBSERVATIONS_QUEUE, Settings
from worker.errors import ConfigError
from worker.queue import (
    ACTOR_NAME,
    enqueue_observations,
    observation_message,
    open_broker,
    return_dead_workers_messages,
)

QUEUE_KEY = f"dramatiq:{OBSERVATIONS_QUEUE}"


@pytest.fixture
def broker(redis_url: str) -> Iterator[RedisBroker]:
    """A broker as the listener opens it, on the test's Redis."""
    broker = open_broker(Settings(redis_url=redis_url, max_retries=3))
    yield broker
    broker.close()


def stored_messages(redis_url: str) -> dict[str, dict[str, object]]:
    """Every waiting message, by observation id, as Dramatiq stored it."""
    client = redis.Redis.from_url(redis_url)
    waiting = [raw.decode() for raw in client.lrange(QUEUE_KEY, 0, -1)]
    stored = client.hgetall(f"{QUEUE_KEY}.msgs")
    client.close()
    messages = [json.loads(stored[key.encode()]) for key in waiting]
    return {str(message["args"][0]): message for message in messages}


def test_batch_enqueue_stores_what_the_broker_itself_stores(
    broker: RedisBroker, redis_url: str
) -> None:
    by_broker, by_batch = str(uuid.uuid4()), str(uuid.uuid4())

    broker.enqueue(observation_message(by_broker))
    assert enqueue_observations(broker, [by_batch]) == 1

    messages = stored_messages(redis_url)
    assert set(messages) == {by_broker, by_batch}
    varying = {"message_id", "message_timestamp", "args", "options"}
    one, other = messages[by_broker], messages[by_batch]
    assert {k: v for k, v in one.items() if k not in varying} == {
        k: v for k, v in other.items() if k not in varying
    }
    assert one["options"].keys() == other["options"].keys() == {"redis_message_id"}
    assert other["actor_name"] == ACTOR_NAME
    assert other["queue_name"] == OBSERVATIONS_QUEUE


def test_batch_enqueued_messages_reach_a_dramatiq_worker(
    broker: RedisBroker,
) -> None:
    received: list[str] = []
    all_received = threading.Event()
    ids = [str(uuid.uuid4()) for _ in range(50)]

    def process_observation(observation_id: str) -> None:
        received.append(observation_id)
        if len(received) == len(ids):
            all_received.set()

    dramatiq.Actor(
        process_observation,
        broker=broker,
        actor_name=ACTOR_NAME,
        queue_name=OBSERVATIONS_QUEUE,
        priority=0,
        options={},
    )
    worker = dramatiq.Worker(broker, worker_threads=1, worker_timeout=20)
    worker.start()
    try:
        enqueue_observations(broker, ids)
        assert all_received.wait(timeout=30)
    finally:
        worker.stop()

    assert sorted(received) == sorted(ids)


def test_broker_retries_with_our_policy_and_exposes_the_current_message(
    broker: RedisBroker,
) -> None:
    retries = [m for m in broker.middleware if isinstance(m, Retries)]

    assert len(retries) == 1
    assert retries[0].max_retries == 3
    assert any(isinstance(m, CurrentMessage) for m in broker.middleware)
    assert OBSERVATIONS_QUEUE in broker.get_declared_queues()


def test_redis_url_of_another_kind_is_refused() -> None:
    with pytest.raises(ConfigError, match="REDIS_URL"):
        open_broker(Settings(redis_url="http://127.0.0.1:6379"))


def test_messages_a_dead_worker_held_go_back_on_their_queues(
    broker: RedisBroker, redis_url: str
) -> None:
    held, delayed = str(uuid.uuid4()), str(uuid.uuid4())
    enqueue_observations(broker, [held])
    broker.enqueue(observation_message(delayed), delay=60_000)
    dead = open_broker(Settings(redis_url=redis_url))
    # What a worker does before it is killed: fetch, leaving the messages unacked.
    assert len(dead.do_fetch(OBSERVATIONS_QUEUE, 10)) == 1
    assert len(dead.do_fetch(f"{OBSERVATIONS_QUEUE}.DQ", 10)) == 1
    client = redis.Redis.from_url(redis_url)
    heartbeats = "dramatiq:__heartbeats__"

    return_dead_workers_messages(broker)
    alive_waiting = client.llen(QUEUE_KEY), client.llen(f"{QUEUE_KEY}.DQ")
    client.zadd(heartbeats, {dead.broker_id: 1})
    return_dead_workers_messages(broker)

    assert alive_waiting == (0, 0)
    assert set(stored_messages(redis_url)) == {held}
    assert client.llen(f"{QUEUE_KEY}.DQ") == 1
    assert client.zscore(heartbeats, dead.broker_id) is None
    client.close()
    dead.close()


def test_the_maintenance_pass_deletes_expired_dead_letters(
    broker: RedisBroker, redis_url: str
) -> None:
    client = redis.Redis.from_url(redis_url)
    dead_letters = f"{QUEUE_KEY}.XQ"
    # A message that ran out of retries eight days ago (Dramatiq keeps them 7).
    client.zadd(dead_letters, {"old-message": 1})
    client.hset(f"{dead_letters}.msgs", "old-message", "{}")

    return_dead_workers_messages(broker)

    assert client.zcard(dead_letters) == 0
    assert client.hlen(f"{dead_letters}.msgs") == 0
    client.close()
