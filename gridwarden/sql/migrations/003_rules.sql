-- Alarms, durable rule state, maintenance windows and the notification outbox.

-- `source` is what the alarm is about: a device id, or `building:<cell>/<name>` /
-- `cell:<id>` for an incident correlated across devices. The partial unique index is
-- the dedup: at most one open (not closed) alarm per source and rule, whatever the
-- concurrency, so a repeat is an upsert that increments `count`.
CREATE TABLE alarms (
    id           bigserial PRIMARY KEY,
    source       text NOT NULL,
    device_id    text NOT NULL,
    kind         text NOT NULL,
    rule         text NOT NULL,
    severity     text NOT NULL CHECK (severity IN ('critical', 'major', 'minor', 'warning')),
    state        text NOT NULL DEFAULT 'active'
                 CHECK (state IN ('active', 'acknowledged', 'cleared', 'closed')),
    cell_id      text,
    building     text,
    first_seen   timestamptz NOT NULL,
    last_seen    timestamptz NOT NULL,
    count        integer NOT NULL DEFAULT 1 CHECK (count > 0),
    flaps        integer NOT NULL DEFAULT 0,
    acked_at     timestamptz,
    acked_by     text,
    cleared_at   timestamptz,
    closed_at    timestamptz,
    case_id      bigint,
    details      jsonb NOT NULL DEFAULT '{}',
    updated_at   timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX alarms_one_open_idx ON alarms (source, rule) WHERE state <> 'closed';
CREATE INDEX alarms_state_idx ON alarms (state, id DESC);
CREATE INDEX alarms_cell_idx ON alarms (cell_id, id DESC);
CREATE INDEX alarms_device_idx ON alarms (device_id, id DESC);
CREATE INDEX alarms_updated_idx ON alarms (updated_at);  -- the live feed's catch-up

-- Per (source, rule) state of stateful conditions (duration pending, window samples,
-- firing flag). A row exists only while the state is not idle; `due_at` is when a
-- timer must look at it without waiting for the next message.
CREATE TABLE rule_state (
    source      text NOT NULL,
    rule        text NOT NULL,
    state       jsonb NOT NULL,
    due_at      timestamptz,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source, rule)
);
CREATE INDEX rule_state_due_idx ON rule_state (due_at) WHERE due_at IS NOT NULL;

-- Maintenance windows mute alarms of one device or of every device in a cell
-- (and the cells below it).
CREATE TABLE maintenance_windows (
    id          bigserial PRIMARY KEY,
    device_id   text REFERENCES devices (id) ON DELETE CASCADE,
    cell_id     text REFERENCES cells (id) ON DELETE CASCADE,
    starts_at   timestamptz NOT NULL,
    ends_at     timestamptz NOT NULL,
    reason      text NOT NULL DEFAULT '',
    created_by  text,
    CHECK ((device_id IS NULL) <> (cell_id IS NULL)),
    CHECK (ends_at > starts_at)
);
CREATE INDEX maintenance_windows_ends_idx ON maintenance_windows (ends_at);

-- Transactional outbox: written in the same transaction as the change it announces,
-- published (QoS 1, retried until the broker acknowledges) by one publisher.
CREATE TABLE outbox (
    id            bigserial PRIMARY KEY,
    topic         text NOT NULL,
    payload       jsonb NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    published_at  timestamptz,
    attempts      integer NOT NULL DEFAULT 0
);
CREATE INDEX outbox_unpublished_idx ON outbox (id) WHERE published_at IS NULL;
