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
