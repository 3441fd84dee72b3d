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
