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
