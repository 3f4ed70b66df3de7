-- Flashcards written by tickets, one row per card, with the embedding of its front and back so a
-- later ticket of the same tenant can tell which of its cards repeat earlier ones.

CREATE TABLE flashcards (
    tenant text NOT NULL,
    ticket_id uuid NOT NULL,
    subtask_id text NOT NULL,
    -- The card's place in the subtask's output, from 0.
    ordinal integer NOT NULL CHECK (ordinal >= 0),
    -- The subtask attempt whose output the row comes from: a retried subtask replaces the cards
    -- of its earlier attempts, and a late writer of an older attempt changes nothing.
    attempt integer NOT NULL CHECK (attempt >= 1),
    language text,
    front text NOT NULL,
    back text NOT NULL,
    cloze text,
    difficulty text NOT NULL,
    -- Whether the card repeated an earlier one of the tenant when it was written.
    duplicate boolean NOT NULL DEFAULT false,
    -- 384 dimensions: all-MiniLM-L6-v2 of front and back, unit length.
    embedding vector(384) NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, ticket_id, subtask_id, ordinal)
);

-- Nearest cards by cosine distance; queries filter by tenant (and leave out the asking ticket)
-- with pgvector's iterative index scans, as document_chunks does.
CREATE INDEX flashcards_embedding_hnsw_idx ON flashcards USING hnsw (embedding vector_cosine_ops);
