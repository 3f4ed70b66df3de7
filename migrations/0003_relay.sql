-- Where the relay got to. The stream itself is the authority on resume; this row is the fallback
-- when the stream holds nothing (new stream, or every message aged out).

CREATE TABLE relay_checkpoints (
    name text PRIMARY KEY,
    position bigint NOT NULL CHECK (position >= 0),
    updated_at timestamptz NOT NULL DEFAULT now()
);
