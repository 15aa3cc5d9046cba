-- nbserver storage schema, PostgreSQL dialect. Keep the same logical schema as
-- ../sqlite/0001_initial.sql. Timestamps are unix seconds (or millis where named
-- so) stored as integers; no database-specific time types.

CREATE TABLE agents (
    name            TEXT PRIMARY KEY NOT NULL,
    enrolled_at     BIGINT NOT NULL,
    cert_serial     TEXT NOT NULL,
    cert_not_after  BIGINT NOT NULL,
    last_seen_at    BIGINT NOT NULL
);

-- Single-use, expiring enrolment tokens. Only a hash of the secret is kept.
CREATE TABLE tokens (
    id           TEXT PRIMARY KEY NOT NULL,
    secret_hash  TEXT NOT NULL,
    agent        TEXT NOT NULL,
    created_at   BIGINT NOT NULL,
    expires_at   BIGINT NOT NULL,
    used_at      BIGINT NULL,
    used_by      TEXT NULL
);

-- Highest sequence number stored per (agent, stream).
CREATE TABLE streams (
    agent   TEXT NOT NULL,
    stream  TEXT NOT NULL,
    stored  BIGINT NOT NULL,
    PRIMARY KEY (agent, stream)
);

-- Exactly-once message log: the raw JSON frame header is kept byte for byte.
CREATE TABLE messages (
    agent         TEXT NOT NULL,
    stream        TEXT NOT NULL,
    seq           BIGINT NOT NULL,
    kind          TEXT NOT NULL,
    header        TEXT NOT NULL,
    payload_hash  TEXT NULL,
    received_at   BIGINT NOT NULL,
    PRIMARY KEY (agent, stream, seq)
);

CREATE INDEX messages_agent_kind ON messages (agent, kind);

CREATE TABLE blobs (
    hash        TEXT PRIMARY KEY NOT NULL,
    size        BIGINT NOT NULL,
    media_type  TEXT NOT NULL,
    created_at  BIGINT NOT NULL
);
