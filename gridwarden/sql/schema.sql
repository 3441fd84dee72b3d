-- The current schema (plain PostgreSQL flavour), in one file to read. Every
-- migration must keep this file in step: tests/test_schema.py proves that migrating
-- from empty gives exactly this schema.

CREATE TABLE schema_migrations (
    version     integer PRIMARY KEY,
    name        text NOT NULL,
    flavour     text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
);


CREATE TABLE cells (
    id          text PRIMARY KEY,
    name        text NOT NULL,
    level       text NOT NULL CHECK (level IN ('street', 'community', 'grid', 'micro')),
    parent_id   text REFERENCES cells (id) DEFERRABLE INITIALLY DEFERRED,
    geometry    jsonb NOT NULL,
    min_lon     double precision NOT NULL,
    min_lat     double precision NOT NULL,
    max_lon     double precision NOT NULL,
    max_lat     double precision NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX cells_parent_idx ON cells (parent_id);

CREATE TABLE devices (
    id          text PRIMARY KEY CHECK (id ~ '^[A-Za-z0-9_.:-]{1,64}$'),
    kind        text NOT NULL
                CHECK (kind IN ('smoke_detector', 'manhole_cover', 'door_access', 'smart_bin')),
    lat         double precision NOT NULL CHECK (lat BETWEEN -90 AND 90),
    lon         double precision NOT NULL CHECK (lon BETWEEN -180 AND 180),
    cell_id     text REFERENCES cells (id),
    name        text,
    building    text,
    floor       integer,
    interval_s  integer CHECK (interval_s > 0),
    height_cm   double precision CHECK (height_cm > 0),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX devices_cell_idx ON devices (cell_id);
CREATE INDEX devices_updated_idx ON devices (updated_at, id);  -- the directory's refresh

-- Updated by a periodic flush from memory, not per message; fillfactor leaves room
-- for HOT updates.
CREATE TABLE device_last_seen (
    device_id   text PRIMARY KEY REFERENCES devices (id) ON DELETE CASCADE,
    last_seen   timestamptz NOT NULL,
    last_seq    bigint,
    status      text CHECK (status IN ('online', 'offline')),
    status_at   timestamptz
) WITH (fillfactor = 70);

CREATE TABLE workers (
    id            text PRIMARY KEY,
    name          text NOT NULL,
    role          text NOT NULL CHECK (role IN ('grid_worker', 'grid_leader', 'community_staff',
                                                'street_staff', 'part_time')),
    phone_hash    text,
    phone_masked  text,
    on_duty       boolean NOT NULL DEFAULT true,
    updated_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE worker_cells (
    worker_id   text NOT NULL REFERENCES workers (id) ON DELETE CASCADE,
    cell_id     text NOT NULL REFERENCES cells (id),
    PRIMARY KEY (worker_id, cell_id)
);
CREATE INDEX worker_cells_cell_idx ON worker_cells (cell_id);

-- One row per (device, seq) seen within the dedup window: the database, not memory,
-- decides what is a duplicate, so a redelivery after kill -9 is still caught.
CREATE TABLE telemetry_dedup (
    device_id    text NOT NULL,
    seq          bigint NOT NULL,
    received_at  timestamptz NOT NULL,
    PRIMARY KEY (device_id, seq)
);
CREATE INDEX telemetry_dedup_received_brin ON telemetry_dedup USING brin (received_at);

CREATE TABLE dead_letters (
    id           bigserial PRIMARY KEY,
    received_at  timestamptz NOT NULL DEFAULT now(),
    topic        text NOT NULL,
    device_id    text,
    reason       text NOT NULL,
    detail       text NOT NULL DEFAULT '',
    payload      bytea NOT NULL
);
CREATE INDEX dead_letters_received_idx ON dead_letters (received_at DESC);
CREATE INDEX dead_letters_reason_idx ON dead_letters (reason, received_at DESC);

-- Readings: one typed column per physical quantity of CONTRACT §2 (nulls cost a bit
-- each), unknown extra fields kept in `extra`.
CREATE TABLE telemetry (
    time         timestamptz NOT NULL,
    device_id    text NOT NULL,
    seq          bigint,
    received_at  timestamptz NOT NULL,
    battery      double precision,
    rssi         double precision,
    smoke        double precision,
    temperature  double precision,
    co           double precision,
    tilt         double precision,
    water_level  double precision,
    gas_ch4      double precision,
    gas_h2s      double precision,
    fill         double precision,
    weight       double precision,
    alarm        boolean,
    test         boolean,
    tamper       boolean,
    open         boolean,
    door_open    boolean,
    locked       boolean,
    fire         boolean,
    extra        jsonb
);
CREATE INDEX telemetry_device_time_idx ON telemetry (device_id, time DESC);

-- Discrete happenings (`event` topic) and status changes (`status` topic).
CREATE TABLE device_events (
    time             timestamptz NOT NULL,
    device_id        text NOT NULL,
    seq              bigint,
    received_at      timestamptz NOT NULL,
    event            text NOT NULL,
    credential_hash  text,
    data             jsonb
);
CREATE INDEX device_events_device_time_idx ON device_events (device_id, time DESC);

-- API tokens: only a SHA-256 of the token is kept. Tokens are 256-bit random, so a
-- fast hash is enough, and looking up by hash never compares secrets byte by byte.
CREATE TABLE api_tokens (
    id          bigserial PRIMARY KEY,
    token_hash  text NOT NULL UNIQUE,
    role        text NOT NULL CHECK (role IN ('operator', 'worker', 'admin')),
    worker_id   text REFERENCES workers (id) ON DELETE CASCADE,
    label       text NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz,
    CHECK ((role = 'worker') = (worker_id IS NOT NULL))
);

-- Plain PostgreSQL flavour: the same tables, a BRIN index on time instead of
-- chunks, and the hourly aggregate as an ordinary view over date_bin.
CREATE INDEX telemetry_time_brin ON telemetry USING brin (time);
CREATE INDEX device_events_time_brin ON device_events USING brin (time);

CREATE VIEW telemetry_hourly AS
SELECT date_bin(INTERVAL '1 hour', time, TIMESTAMPTZ '2000-01-01') AS bucket,
       device_id,
       count(*)           AS samples,
       avg(battery)       AS battery,
       avg(smoke)         AS smoke_avg,      max(smoke)       AS smoke_max,
       avg(temperature)   AS temperature_avg, max(temperature) AS temperature_max,
       max(co)            AS co_max,
       max(tilt)          AS tilt_max,
       avg(water_level)   AS water_level_avg, max(water_level) AS water_level_max,
       max(gas_ch4)       AS gas_ch4_max,
       max(gas_h2s)       AS gas_h2s_max,
       avg(fill)          AS fill_avg,        max(fill)        AS fill_max,
       avg(weight)        AS weight_avg
FROM telemetry
GROUP BY bucket, device_id;

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

-- Cases: the closed loop 发现上报 → 受理派遣 → 处置反馈 → 任务核查 → 事件归档 → 考核评价.

CREATE TABLE cases (
    id               bigserial PRIMARY KEY,
    -- What the case is about: a device id, `building:<cell>/<name>` for an incident in
    -- a building, or `report:<id>` for a person's report. One open case per key.
    incident_key     text NOT NULL,
    origin           text NOT NULL CHECK (origin IN ('alarm', 'report')),
    category         text NOT NULL,           -- the rule, or the report's category
    title            text NOT NULL,
    description      text NOT NULL DEFAULT '',
    cell_id          text NOT NULL REFERENCES cells (id),
    device_id        text,
    lat              double precision,
    lon              double precision,
    state            text NOT NULL DEFAULT 'reported'
                     CHECK (state IN ('reported', 'dispatched', 'accepted', 'on_site', 'resolved',
                                      'verified', 'archived')),
    priority         text NOT NULL CHECK (priority IN ('critical', 'major', 'minor', 'warning')),
    level            text NOT NULL DEFAULT 'grid_worker'
                     CHECK (level IN ('grid_worker', 'grid_leader', 'community_staff',
                                      'street_staff')),
    assignee         text REFERENCES workers (id),
    rejected_by      text[] NOT NULL DEFAULT '{}',
    -- The SLA policy the case started under (a snapshot: later configuration changes
    -- never move the deadlines of cases in flight).
    policy           jsonb NOT NULL,
    due_at           timestamptz,             -- the next deadline (accept, arrive or resolve)
    due_step         text CHECK (due_step IN ('accept', 'arrive', 'resolve')),
    escalations      integer NOT NULL DEFAULT 0,
    created_at       timestamptz NOT NULL DEFAULT now(),
    dispatched_at    timestamptz,
    accepted_at      timestamptz,
    arrived_at       timestamptz,
    resolved_at      timestamptz,
    resolved_by      text,
    resolution       text,
    verified_at      timestamptz,
    verified_by      text,
    archived_at      timestamptz,
    rating           integer CHECK (rating BETWEEN 1 AND 5),
    rating_comment   text,
    accept_met       boolean,                 -- each step done before its deadline?
    arrive_met       boolean,
    resolve_met      boolean,
    updated_at       timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX cases_one_open_idx ON cases (incident_key)
    WHERE state IN ('reported', 'dispatched', 'accepted', 'on_site');
CREATE INDEX cases_due_idx ON cases (due_at) WHERE due_at IS NOT NULL;
CREATE INDEX cases_assignee_idx ON cases (assignee, id DESC);
CREATE INDEX cases_cell_idx ON cases (cell_id, id DESC);
CREATE INDEX cases_state_idx ON cases (state, id DESC);

-- The append-only timeline: who did what, when.
CREATE TABLE case_events (
    id          bigserial PRIMARY KEY,
    case_id     bigint NOT NULL REFERENCES cases (id),
    at          timestamptz NOT NULL,
    actor       text NOT NULL,                -- worker id, `operator:<token>`, `system`
    action      text NOT NULL,
    from_state  text,
    to_state    text,
    detail      jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX case_events_case_idx ON case_events (case_id, id);

-- Append-only means append-only: the database refuses edits of the timeline.
CREATE FUNCTION case_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'case_events is append-only';
END;
$$;
CREATE TRIGGER case_events_append_only BEFORE UPDATE OR DELETE ON case_events
    FOR EACH ROW EXECUTE FUNCTION case_events_append_only();

ALTER TABLE alarms ADD CONSTRAINT alarms_case_fk FOREIGN KEY (case_id) REFERENCES cases (id);

-- Round robin on ties: who was given a case last.
ALTER TABLE workers ADD COLUMN last_assigned_at timestamptz;

-- A worker notification may also go to a webhook (`webhook_url`): a second outbox row
-- with channel 'webhook', `topic` holding the URL, POSTed by the outbox publisher.
ALTER TABLE outbox ADD COLUMN channel text NOT NULL DEFAULT 'mqtt'
    CHECK (channel IN ('mqtt', 'webhook'));

-- Browser sessions for the web consoles: `POST /login` exchanges an API token for a
-- random session id in the `gw_session` cookie. Only the id's SHA-256 is kept, so the
-- table is no more useful to a reader than `api_tokens` is. Revoking or deleting the
-- token ends its sessions (the lookup joins on a live token; deletion cascades).
CREATE TABLE web_sessions (
    id_hash     text PRIMARY KEY,
    token_id    bigint NOT NULL REFERENCES api_tokens (id) ON DELETE CASCADE,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL DEFAULT now() + interval '12 hours',
    last_seen   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX web_sessions_token_idx ON web_sessions (token_id);
CREATE INDEX web_sessions_expires_idx ON web_sessions (expires_at);

-- The case intake: a raised alarm is queued here in the alarm's own transaction (by the
-- rules store, `case_intake_add`, which also runs `pg_notify('gw_case_intake', '')`), and
-- the intake task (`alerting.intake`) opens or joins its case afterwards, out of the
-- ingest transaction. A row is deleted in the transaction that handled it. A row whose
-- processing failed on its own is moved aside: kept with `failed_at` and `error`, never
-- claimed again (to try it again: `UPDATE case_intake SET failed_at = NULL, error = NULL`).
CREATE TABLE case_intake (
    id          bigserial PRIMARY KEY,
    alarm_id    bigint NOT NULL REFERENCES alarms (id) ON DELETE CASCADE,
    source      text NOT NULL,              -- the alarm op's source and building: what
    building    text,                       -- the incident key is made of
    details     jsonb NOT NULL DEFAULT '{}',
    queued_at   timestamptz NOT NULL DEFAULT now(),
    failed_at   timestamptz,
    error       text
);
-- No index on alarm_id: alarms are never deleted in bulk, and the queue stays short.

-- Broker accounts: who may connect to the MQTT broker and what each may publish or read.
-- gridwarden renders Mosquitto's password and ACL files from this table (gridwarden/
-- broker_auth.py) and reloads the broker on change. Only the password's Mosquitto hash
-- (PBKDF2-SHA512, salted) is kept; the password itself is shown once, when issued.
--   device    publishes only under {prefix}/dev/{subject}/ and {prefix}/codec/+/{subject}
--   gateway   publishes for any device (a LoRa network server, a Zigbee bridge, the simulator)
--   worker    reads only {prefix}/workers/{subject}/
--   operator  reads {prefix}/alarms/ and {prefix}/workers/ (consoles, dispatch desks)
--   service   the platform itself: everything
CREATE TABLE mqtt_accounts (
    username       text PRIMARY KEY,
    kind           text NOT NULL CHECK (kind IN ('device', 'gateway', 'worker', 'operator', 'service')),
    subject        text,
    password_hash  text NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    changed_at     timestamptz NOT NULL DEFAULT now(),
    revoked_at     timestamptz,
    CHECK ((kind IN ('device', 'worker')) = (subject IS NOT NULL)),
    -- Mosquitto's password file separates user and hash with ':'; its ACL file ends a
    -- user name at the line's end, so no control characters or spaces either.
    CHECK (username ~ '^[A-Za-z0-9_.@/-]{1,128}$')
);
-- One live account per device or worker: re-issuing rotates the password in place.
CREATE UNIQUE INDEX mqtt_accounts_subject_idx ON mqtt_accounts (kind, subject)
    WHERE subject IS NOT NULL;

-- The audit log: who did what, from where, for every case action and every admin
-- action (token creation, registry imports, logins and sign-outs, alarm ack/close).
-- Written by `gridwarden.audit.record` in the same transaction as the action, so an
-- action and its audit row commit (or roll back) together. `actor` is the token's
-- `<role>:<token id>` (worker tokens: `worker:<worker id>`), or `cli`, or `anonymous`
-- for a failed login. `detail` never holds a token, a card number or a phone number.
CREATE TABLE audit_log (
    id           bigserial PRIMARY KEY,
    at           timestamptz NOT NULL DEFAULT now(),
    actor        text NOT NULL,
    action       text NOT NULL,
    target_type  text NOT NULL,
    target_id    text,
    detail       jsonb NOT NULL DEFAULT '{}',
    address      text                          -- the client's address; NULL from the CLI
);
CREATE INDEX audit_log_at_idx ON audit_log (at DESC, id DESC);
CREATE INDEX audit_log_action_idx ON audit_log (action, id DESC);
CREATE INDEX audit_log_actor_idx ON audit_log (actor, id DESC);

-- Append-only, like case_events: the database refuses edits and deletions (and
-- TRUNCATE) of the log.
CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only';
END;
$$;
CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_append_only();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only();

CREATE TABLE service_keys (
    name        text PRIMARY KEY,
    value       text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
