"""Typed settings from the environment (prefix `TF_`), validated once at start-up.

Any URL left unset means "use the embedded server": `ticketflow up` starts PostgreSQL, NATS and
Redis from pip packages under `TF_DATA_DIR` and hands their addresses to every process it starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEVELOPMENT_JWT_SECRET = "ticketflow-development-secret-change-me"  # noqa: S105


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TF_", env_file=None, extra="ignore")

    env: Literal["development", "test", "production"] = "development"
    data_dir: Path = Field(default=Path(".ticketflow"), description="Embedded servers' data.")

    database_url: str | None = None
    nats_url: str | None = None
    redis_url: str | None = None

    jwt_secret: str = DEVELOPMENT_JWT_SECRET
    jwt_issuer: str = "ticketflow"
    jwt_audience: str = "ticketflow"
    access_token_ttl_s: int = Field(default=3600, ge=60)

    # Addresses of the processes `ticketflow up` starts.
    host: str = "127.0.0.1"
    commands_port: int = Field(default=8000, ge=1, le=65535)
    queries_port: int = Field(default=8001, ge=1, le=65535)
    embedded_nats_port: int = Field(default=4222, ge=1, le=65535)
    embedded_redis_port: int = Field(default=6380, ge=1, le=65535)

    # Upload and document limits.
    max_upload_bytes: int = Field(default=20 * 1024 * 1024, ge=1024)
    max_documents_per_ticket: int = Field(default=4, ge=1)
    max_pages: int = Field(default=300, ge=1)
    max_characters: int = Field(default=2_000_000, ge=1000)
    max_docx_uncompressed_bytes: int = Field(default=100 * 1024 * 1024, ge=1024)
    ingest_timeout_s: float = Field(default=120.0, gt=0)
    max_options_bytes: int = Field(default=16 * 1024, ge=2)

    # The JetStream stream every event is relayed to.
    stream_name: str = "TF_EVENTS"
    stream_replicas: int = Field(default=1, ge=1, le=5)
    stream_storage: Literal["file", "memory"] = "file"
    stream_max_age_days: float = Field(default=30.0, gt=0)
    stream_duplicate_window_s: float = Field(default=120.0, gt=0)
    relay_max_in_flight: int = Field(default=256, ge=1, le=10_000)
    relay_batch_size: int = Field(default=500, ge=1, le=10_000)

    db_pool_size: int = Field(default=5, ge=1)

    # Workers.
    ingest_concurrency: int = Field(default=2, ge=1, le=64)
    extraction_memory_bytes: int = Field(default=2 * 1024**3, ge=64 * 1024**2)
    inference_concurrency: int = Field(default=2, ge=1, le=256)
    inference_ack_wait_s: float = Field(default=60.0, ge=1.0)
    inference_max_deliver: int = Field(default=4, ge=1, le=50)
    inference_timeout_s: float = Field(default=600.0, gt=0)
    inference_threads: int | None = Field(default=None, ge=1, description="llama.cpp threads.")
    max_prompt_document_chars: int = Field(default=12_000, ge=500)
    model_path: Path | None = Field(default=None, description="GGUF file; default SmolLM2.")

    @model_validator(mode="after")
    def _production_needs_real_secrets(self) -> Settings:
        if self.env == "production" and self.jwt_secret == DEVELOPMENT_JWT_SECRET:
            raise ValueError("TF_JWT_SECRET must be set to a real secret when TF_ENV=production")
        if self.env == "production" and len(self.jwt_secret) < 32:
            raise ValueError("TF_JWT_SECRET must be at least 32 characters in production")
        return self

    @property
    def uses_embedded_servers(self) -> bool:
        return not (self.database_url and self.nats_url and self.redis_url)

    def require_urls(self) -> tuple[str, str, str]:
        """The three server URLs, or a clear error telling how to get them."""
        missing = [
            name
            for name, value in (
                ("TF_DATABASE_URL", self.database_url),
                ("TF_NATS_URL", self.nats_url),
                ("TF_REDIS_URL", self.redis_url),
            )
            if not value
        ]
        if missing:
            raise RuntimeError(
                f"{', '.join(missing)} not set and no running stack found in {self.data_dir}; "
                "start one with `ticketflow up` or set the URLs"
            )
        return str(self.database_url), str(self.nats_url), str(self.redis_url)
