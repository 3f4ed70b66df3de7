-- Document chunks for retrieval: text, embedding (pgvector) and a full-text vector per chunk,
-- plus one row per document that says its chunks are complete.

CREATE EXTENSION IF NOT EXISTS vector;

CREATE TABLE document_chunks (
    tenant text NOT NULL,
    document_sha256 text NOT NULL CHECK (document_sha256 ~ '^[0-9a-f]{64}$'),
    ordinal integer NOT NULL CHECK (ordinal >= 0),
    text text NOT NULL,
    page integer CHECK (page >= 1),
    heading text,
    -- 384 dimensions: all-MiniLM-L6-v2, the embedding model in every environment.
    embedding vector(384) NOT NULL,
    -- The 'simple' configuration (lower-casing, no stemming, no stop words) because documents
    -- come in English, Russian and Arabic, and one language's stemmer mangles the others.
    tsv tsvector GENERATED ALWAYS AS (
        to_tsvector('simple', coalesce(heading, '') || ' ' || text)
    ) STORED,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, document_sha256, ordinal)
);

-- Embeddings are normalised, so cosine distance is the natural metric. Queries filter by tenant
-- after the index scan; pgvector 0.8's iterative scans keep filtered queries from coming back short.
CREATE INDEX document_chunks_embedding_hnsw_idx
    ON document_chunks USING hnsw (embedding vector_cosine_ops);

CREATE INDEX document_chunks_tsv_idx ON document_chunks USING gin (tsv);

-- Written in the same transaction as a document's chunks: a row here means every chunk is stored,
-- so "already ingested?" is one primary-key lookup and a half-written document never counts.
CREATE TABLE ingested_documents (
    tenant text NOT NULL,
    document_sha256 text NOT NULL CHECK (document_sha256 ~ '^[0-9a-f]{64}$'),
    chunks integer NOT NULL CHECK (chunks >= 0),
    characters integer NOT NULL CHECK (characters >= 0),
    pages integer CHECK (pages >= 0),
    ingested_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, document_sha256)
);
