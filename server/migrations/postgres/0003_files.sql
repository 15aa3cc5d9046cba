-- Attached files: the current version of every file and directory of each agent's two
-- trees (`notebook`: read-write for the kernel; `workspace`: read-only). File contents
-- live in the blob store under `version`, their SHA-256.
CREATE TABLE files (
    agent     TEXT NOT NULL,
    root      TEXT NOT NULL,
    path      TEXT NOT NULL,
    kind      TEXT NOT NULL,
    version   TEXT NOT NULL,
    size      BIGINT NOT NULL,
    mtime_ms  BIGINT NOT NULL,
    PRIMARY KEY (agent, root, path)
);
