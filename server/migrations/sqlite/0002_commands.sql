-- Commands from the server to an agent (execute a cell, interrupt, ...), numbered per
-- agent like agent data and resent until the agent acknowledges them.
CREATE TABLE commands (
    agent       TEXT NOT NULL,
    seq         BIGINT NOT NULL,
    kind        TEXT NOT NULL,
    body        TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    PRIMARY KEY (agent, seq)
);

-- Highest command number each agent has acknowledged.
CREATE TABLE command_acks (
    agent  TEXT PRIMARY KEY NOT NULL,
    acked  BIGINT NOT NULL
);
