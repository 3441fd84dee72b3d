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
