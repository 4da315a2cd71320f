"""Every SQL statement the worker sends, and the objects the migrations install.

Placeholders are psycopg's `%(name)s`: the listener runs these on its own psycopg
connection, and the workers through SQLAlchemy's `exec_driver_sql`, which hands them
to psycopg unchanged.

The trigger and function bodies below are installed by migration 0001, row-level
security and the app's policies by 0002. Changing one needs a new migration that
replaces the object; do not edit an applied migration.
"""

from __future__ import annotations

from worker.config import NOTIFY_CHANNEL

#: The channel the listener notifies itself on to check that LISTEN really works.
PROBE_CHANNEL = "hyacinth_listener_probe"

# --- Database objects (installed by migrations/versions/0001_observations.py) ---

NOTIFY_FUNCTION = f"""
CREATE OR REPLACE FUNCTION hyacinth_notify_observation() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    -- Only the id: NOTIFY payloads are capped at 8000 bytes and are not trusted.
    PERFORM pg_notify('{NOTIFY_CHANNEL}', NEW.id::text);
    RETURN NULL;
END;
$$
"""

NOTIFY_ON_INSERT_TRIGGER = """
CREATE TRIGGER observations_notify_insert
AFTER INSERT ON observations
FOR EACH ROW WHEN (NEW.status = 'pending')
EXECUTE FUNCTION hyacinth_notify_observation()
"""

# An operator asks for reprocessing with UPDATE ... SET status = 'pending'.
NOTIFY_ON_PENDING_TRIGGER = """
CREATE TRIGGER observations_notify_pending
AFTER UPDATE OF status ON observations
FOR EACH ROW WHEN (NEW.status = 'pending' AND OLD.status IS DISTINCT FROM 'pending')
EXECUTE FUNCTION hyacinth_notify_observation()
"""

TOUCH_FUNCTION = """
CREATE OR REPLACE FUNCTION hyacinth_touch_updated_at() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END;
$$
"""

TOUCH_TRIGGER = """
CREATE TRIGGER observations_touch_updated_at
BEFORE UPDATE ON observations
FOR EACH ROW EXECUTE FUNCTION hyacinth_touch_updated_at()
"""

# --- Row-level security (installed by migrations/versions/0002_row_security.py) ---

# Supabase serves every table of the public schema to anyone holding the anon key,
# which ships inside the app. With row-level security on, the API roles see only
# what a policy grants; the listener and workers connect as the table's owner, to
# whom policies do not apply.
ROW_SECURITY = "ALTER TABLE observations ENABLE ROW LEVEL SECURITY"

# Signed-in observers insert their own rows, as new work, and read their own
# results; nothing else. Only where Supabase's `authenticated` role and auth.uid()
# exist: a plain PostgreSQL gets row-level security without policies.
APP_POLICIES = """
DO $$
BEGIN
    IF to_regrole('authenticated') IS NOT NULL
        AND to_regprocedure('auth.uid()') IS NOT NULL THEN
        CREATE POLICY observations_insert_own ON observations
            FOR INSERT TO authenticated
            WITH CHECK (user_id = (SELECT auth.uid()) AND status = 'pending');
        CREATE POLICY observations_select_own ON observations
            FOR SELECT TO authenticated
            USING (user_id = (SELECT auth.uid()));
    END IF;
END;
$$
"""

#: In order, after the table exists.
SCHEMA_OBJECTS_CREATE = (
    NOTIFY_FUNCTION,
    NOTIFY_ON_INSERT_TRIGGER,
    NOTIFY_ON_PENDING_TRIGGER,
    TOUCH_FUNCTION,
    TOUCH_TRIGGER,
    ROW_SECURITY,
    APP_POLICIES,
)

# --- Listener ---

LISTEN = f"LISTEN {NOTIFY_CHANNEL}"

LISTEN_PROBE = f"LISTEN {PROBE_CHANNEL}"

SEND_PROBE = f"SELECT pg_notify('{PROBE_CHANNEL}', %(token)s)"

# Claim before enqueue: the listener commits only after the ids are in Redis, so a
# crash in between leaves the rows pending. SKIP LOCKED keeps two listeners apart.
CLAIM_PENDING = """
UPDATE observations
SET status = 'queued', queued_at = now()
WHERE id IN (
    SELECT id FROM observations
    WHERE status = 'pending'
    ORDER BY created_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
RETURNING id
"""

# Rows whose worker stopped heartbeating, and rows queued so long ago that their
# message was probably lost (Redis flushed, held by a worker that died before it
# started them). The listener includes queued rows only while no message waits in
# Redis: during a backlog, old queued rows are simply waiting their turn.
CLAIM_EXPIRED = """
WITH expired AS (
    SELECT id, status FROM observations
    WHERE status IN ('queued', 'processing')
      AND (
          (status = 'processing'
           AND coalesce(heartbeat_at, updated_at)
               < now() - make_interval(secs => %(lease_s)s))
          OR (%(include_queued)s AND status = 'queued'
           AND coalesce(queued_at, updated_at)
               < now() - make_interval(secs => %(queued_lease_s)s))
      )
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
UPDATE observations AS o
SET status = 'queued', queued_at = now(),
    lost_leases = o.lost_leases + (expired.status = 'processing')::int
FROM expired
WHERE o.id = expired.id
RETURNING o.id, expired.status
"""

# A photo whose worker died every time it was tried (killed, out of memory) is not
# queued again: each new try would take another worker down with it.
FAIL_ABANDONED = """
UPDATE observations
SET status = 'failed', pred = '{}'::jsonb, finished_at = now(),
    lost_leases = lost_leases + 1,
    error = 'gave up: the worker died ' || (lost_leases + 1) || ' times while '
            || 'processing this photo (killed, or out of memory)'
WHERE id IN (
    SELECT id FROM observations
    WHERE status = 'processing'
      AND lost_leases >= %(max_lost_leases)s
      AND coalesce(heartbeat_at, updated_at)
          < now() - make_interval(secs => %(lease_s)s)
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
RETURNING id, lost_leases
"""

# --- Worker (every write after the claim is fenced by the attempts it returned) ---

# `pending` is there for the message that reaches a worker before the listener's
# claim commits. The worker's snapshot still shows the row pending; a condition on
# `queued` alone would not match it, and the UPDATE would return at once, skipping
# the row for good. Matching `pending` makes it wait for the listener's row lock and
# then check the committed row again: `queued`, so it claims it. A pending row no
# listener holds is claimed too, which is what its message asks.
#
# A `processing` row is taken over when its heartbeat expired (its worker died: one
# more lost lease), or when the message is the retry of the try that holds it by
# `held_token` (its last write failed on the database: no lease was lost).
CLAIM_OBSERVATION = """
UPDATE observations
SET status = 'processing', attempts = attempts + 1, started_at = now(),
    heartbeat_at = now(), error = NULL,
    lost_leases = lost_leases + (
        status = 'processing' AND attempts IS DISTINCT FROM %(held_token)s::int
    )::int
WHERE id = %(id)s
  AND (status IN ('pending', 'queued')
       OR (status = 'processing'
           AND (attempts = %(held_token)s::int
                OR heartbeat_at < now() - make_interval(secs => %(lease_s)s))))
RETURNING attempts, user_id, bucket, path
"""

HEARTBEAT = """
UPDATE observations SET heartbeat_at = now()
WHERE id = %(id)s AND status = 'processing' AND attempts = %(token)s
"""

FINISH_DONE = """
UPDATE observations
SET status = 'done', pred = %(pred)s, timings_ms = %(timings_ms)s, error = NULL,
    finished_at = now()
WHERE id = %(id)s AND status = 'processing' AND attempts = %(token)s
"""

# A failure leaves no result of an earlier run beside the error.
FINISH_FAILED = """
UPDATE observations
SET status = 'failed', pred = '{}'::jsonb, timings_ms = %(timings_ms)s,
    error = %(error)s, finished_at = now()
WHERE id = %(id)s AND status = 'processing' AND attempts = %(token)s
"""

REQUEUE = """
UPDATE observations SET status = 'queued', queued_at = now(), error = %(error)s
WHERE id = %(id)s AND status = 'processing' AND attempts = %(token)s
"""

# --- Commands ---

REPROCESS = """
UPDATE observations SET status = 'pending', lost_leases = 0
WHERE status = ANY(%(statuses)s)
  AND (%(since)s::timestamptz IS NULL OR created_at >= %(since)s::timestamptz)
"""

COUNT_BY_STATUS = "SELECT status, count(*) FROM observations GROUP BY status"

# A reprocessed row has waited since it became pending, not since it was created.
OLDEST_WAITING_AGES = """
SELECT
    extract(epoch FROM now() - min(updated_at) FILTER (WHERE status = 'pending')),
    extract(epoch FROM now() - min(queued_at) FILTER (WHERE status = 'queued'))
FROM observations
"""
