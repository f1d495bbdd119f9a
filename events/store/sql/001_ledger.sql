-- The consistency core: the stream ledger, its transactional outbox and unique reservations.
-- Applied by events.adapters.postgres.migrate(); every statement is idempotent.

CREATE TABLE IF NOT EXISTS evp_streams (
    stream_id  text PRIMARY KEY,
    version    bigint NOT NULL CHECK (version >= 0),
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- One row per event ever appended. `value` is the Kafka record value (wire format, personal
-- fields already encrypted), so a load by stream id never scans the topic.
CREATE TABLE IF NOT EXISTS evp_events (
    position     bigserial PRIMARY KEY,
    stream_id    text NOT NULL,
    version      bigint NOT NULL CHECK (version >= 1),
    event_id     uuid NOT NULL UNIQUE,
    event_type   text NOT NULL,
    schema_id    integer NOT NULL,
    value        bytea NOT NULL,
    actor        text NOT NULL DEFAULT '',
    subject_id   text,           -- the data subject whose personal data the event holds, if any
    occurred_at  timestamptz NOT NULL,
    recorded_at  timestamptz NOT NULL DEFAULT now(),
    partition    integer NOT NULL,
    kafka_offset bigint,
    UNIQUE (stream_id, version)
);

-- Every data subject whose personal data the event holds (one event may hold several
-- people's data, each sealed under their own key), plus the record's own subject.
ALTER TABLE evp_events ADD COLUMN IF NOT EXISTS subject_ids text[] NOT NULL DEFAULT '{}';

CREATE INDEX IF NOT EXISTS evp_events_subject ON evp_events (subject_id) WHERE subject_id IS NOT NULL;
-- No fast-update pending list: every subject query would scan the whole list (up to 4 MB of
-- recent entries), so an audit of one subject cost more the more had been appended lately.
CREATE INDEX IF NOT EXISTS evp_events_subjects ON evp_events USING gin (subject_ids) WITH (fastupdate = off);
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_class WHERE oid = to_regclass('evp_events_subjects')
                   AND 'fastupdate=off' = ANY (coalesce(reloptions, '{}'))) THEN
        ALTER INDEX evp_events_subjects SET (fastupdate = off);  -- an index made before this change
    END IF;
END $$;
CREATE INDEX IF NOT EXISTS evp_events_actor ON evp_events (actor);

-- Where each published event landed on Kafka, written by the relay in the transaction that
-- clears its outbox row: a narrow insert, instead of rewriting the wide event row (and all
-- its index entries) with an UPDATE. Rows published before this table existed keep their
-- offset in evp_events.kafka_offset; evp_event_log reads either.
CREATE TABLE IF NOT EXISTS evp_published (
    position     bigint PRIMARY KEY,
    kafka_offset bigint NOT NULL
);
-- The record's link in its partition's hash chain (events/store/chain.py); NULL for events
-- published before chains existed.
ALTER TABLE evp_published ADD COLUMN IF NOT EXISTS chain bytea;

-- Each partition's chain head: the link of the last record its relay recorded, where the
-- next holder of the partition's lease continues the chain.
CREATE TABLE IF NOT EXISTS evp_chain_heads (
    partition    integer PRIMARY KEY,
    kafka_offset bigint NOT NULL,
    chain        bytea NOT NULL
);

-- Each event's offset by primary key (a LATERAL subquery with a LIMIT is not flattened into
-- a join): a query that selects a few events (one subject's) costs its answer, not a hash
-- join over every published event, whose cost grew with the log.
CREATE OR REPLACE VIEW evp_event_log AS
SELECT e.position, e.stream_id, e.version, e.event_id, e.event_type, e.schema_id, e.value, e.actor, e.subject_id,
       e.subject_ids, e.occurred_at, e.recorded_at, e.partition, coalesce(p.kafka_offset, e.kafka_offset) AS kafka_offset,
       p.chain
  FROM evp_events e
  LEFT JOIN LATERAL (SELECT x.kafka_offset, x.chain FROM evp_published x WHERE x.position = e.position LIMIT 1) p ON true;

-- Events committed to the ledger but not yet acknowledged by Kafka. evp_append writes each
-- row in the statement that writes its event, and only the relay deletes rows, so there is
-- no foreign key: its per-row check (a key-share lock on the new event row) tripled the
-- append's server time (45 -> 16 µs an event in batches of 100).
CREATE TABLE IF NOT EXISTS evp_outbox (
    position  bigint PRIMARY KEY,
    partition integer NOT NULL
);
ALTER TABLE evp_outbox DROP CONSTRAINT IF EXISTS evp_outbox_position_fkey;
CREATE INDEX IF NOT EXISTS evp_outbox_partition ON evp_outbox (partition, position);

-- Uniqueness across streams: a scope (for example "customer-email") and the blind index of
-- a value. subject_id is whose value it is, so forgetting a subject releases only theirs.
CREATE TABLE IF NOT EXISTS evp_reservations (
    scope     text NOT NULL,
    value     text NOT NULL,
    stream_id text NOT NULL,
    reserved_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (scope, value)
);
ALTER TABLE evp_reservations ADD COLUMN IF NOT EXISTS subject_id text;
CREATE INDEX IF NOT EXISTS evp_reservations_subject ON evp_reservations (subject_id) WHERE subject_id IS NOT NULL;

-- Aggregate snapshots a stream load may start from.
CREATE TABLE IF NOT EXISTS evp_aggregate_snapshots (
    stream_id text NOT NULL,
    version   bigint NOT NULL,
    state     jsonb NOT NULL,
    taken_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (stream_id, version)
);
