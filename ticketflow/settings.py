"""Typed settings from the environment (prefix `TF_`), validated once at start-up.

Any URL left unset means "use the embedded server": `ticketflow up` starts PostgreSQL, NATS and
Redis from pip packages under `TF_DATA_DIR` and hands their addresses to every process it starts.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEVELOPMENT_JWT_SECRET = "ticketflow-development-secret-change-me"  # noqa: S105


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TF_", env_file=None, extra="ignore")

    env: Literal["development", "test", "production"] = "development"
    data_dir: Path = Field(default=Path(".ticketflow"), description="Embedded servers' data.")

    database_url: str | None = None
    nats_url: str | None = None
    redis_url: str | None = None

    # NATS authorization (docs/adr/0010-nats-authorization.md). Unset with an embedded NATS:
    # the keys `ticketflow up` made under the data directory.
    nats_credentials: Path | None = Field(
        default=None, description="The `.creds` file every ticketflow process connects with."
    )
    nats_integrator_account: str | None = Field(
        default=None, description="Public key (A…) of the account integrators' users belong to."
    )
    nats_integrator_seed_file: Path | None = Field(
        default=None, description="Seed (SA…) of that account or of a signing key of it."
    )
    nats_integrator_ttl_s: int = Field(default=30 * 24 * 3600, ge=60, le=366 * 24 * 3600)

    # Accounts and tokens (docs/security.md).
    jwt_secret: str = DEVELOPMENT_JWT_SECRET
    jwt_issuer: str = "ticketflow"
    jwt_audience: str = "ticketflow"
    access_token_ttl_s: int = Field(default=15 * 60, ge=60, le=24 * 3600)
    refresh_token_ttl_s: int = Field(default=14 * 24 * 3600, ge=300)
    session_max_age_s: int = Field(
        default=30 * 24 * 3600, ge=300, description="A login's refresh tokens end by then."
    )
    tenant_registration: Literal["open", "closed"] = Field(
        default="open",
        description="open: the first anonymous registrant of a new tenant becomes its admin; "
        "closed: tenants are opened with `ticketflow create-admin`.",
    )
    password_min_length: int = Field(default=12, ge=8, le=256)
    password_hash_time_cost: int = Field(default=3, ge=1, le=20)
    password_hash_memory_kib: int = Field(default=64 * 1024, ge=8 * 1024, le=4 * 1024 * 1024)
    password_hash_parallelism: int = Field(default=4, ge=1, le=64)
    # The tamper-evident history (docs/adr/0020-audit-chain.md): the Ed25519 key that signs
    # chain heads, and how often each tenant's head is signed.
    audit_signing_key: str | None = Field(
        default=None,
        description="TF_AUDIT_SIGNING_KEY: an Ed25519 private key (PKCS#8 PEM), as the path of "
        "its file or the PEM itself; unset outside production: one made once in the data dir.",
    )
    audit_checkpoint_events: int = Field(default=1000, ge=1, description="Sign after N events.")
    audit_checkpoint_interval_s: float = Field(
        default=60.0, gt=0, description="Or after this long, when the chain moved."
    )
    # An external identity provider whose RS256/ES256 tokens are accepted beside ours.
    jwks_url: str | None = Field(default=None, description="The provider's JWKS endpoint.")
    jwks_issuer: str | None = None
    jwks_audience: str | None = None
    jwks_tenant_claim: str = Field(default="tenant", description="Dotted paths allowed.")
    jwks_roles_claim: str = Field(default="roles", description="e.g. realm_access.roles")
    jwks_cache_s: float = Field(default=300.0, gt=0)

    # Addresses of the processes `ticketflow up` starts.
    host: str = "127.0.0.1"
    trusted_proxies: str = Field(
        default="",
        description="TF_TRUSTED_PROXIES: IPs or CIDRs, comma-separated, whose X-Forwarded-For "
        "and X-Forwarded-Proto the APIs believe; none by default, so the peer address is the "
        "client's for per-IP rate limits.",
    )
    commands_port: int = Field(default=8000, ge=1, le=65535)
    # Where the query API's console logs in and sends retries; unset: this host's command API.
    console_commands_url: str | None = None
    queries_port: int = Field(default=8001, ge=1, le=65535)
    # Prometheus endpoints of the workers (the APIs serve /metrics on their own ports).
    metrics_port: int | None = Field(
        default=None,
        ge=1,
        le=65535,
        description="Base port of the workers' /metrics: relay +0, ingest +1, inference +2, "
        "projector +3. Unset: no worker serves metrics unless its own port is set.",
    )
    metrics_port_relay: int | None = Field(default=None, ge=1, le=65535)
    metrics_port_ingest: int | None = Field(default=None, ge=1, le=65535)
    metrics_port_inference: int | None = Field(default=None, ge=1, le=65535)
    metrics_port_projector: int | None = Field(default=None, ge=1, le=65535)
    embedded_nats_port: int = Field(default=4222, ge=1, le=65535)
    # A local JetStream cluster (`ticketflow up --nats-cluster 3`): node i listens for clients on
    # embedded_nats_port + i and for routes on embedded_nats_cluster_port + i.
    nats_cluster_size: int = Field(
        default=1, ge=1, le=5, description="Embedded NATS servers, clustered when more than one."
    )
    embedded_nats_cluster_port: int = Field(default=6222, ge=1, le=65535)
    nats_sync_interval: str = Field(
        default="2m",
        pattern=r"^(always|\d+(ms|s|m|h))$",
        description="How often embedded NATS servers fsync JetStream files: a duration, or "
        "`always` (fsync before every acknowledgement); see ADR 25.",
    )
    embedded_redis_port: int = Field(default=6380, ge=1, le=65535)

    # Upload and document limits.
    max_upload_bytes: int = Field(default=20 * 1024 * 1024, ge=1024)
    max_documents_per_ticket: int = Field(default=4, ge=1)
    max_pages: int = Field(default=300, ge=1)
    max_characters: int = Field(default=2_000_000, ge=1000)
    max_docx_uncompressed_bytes: int = Field(default=100 * 1024 * 1024, ge=1024)
    max_pdf_decoded_bytes: int = Field(
        default=100 * 1024 * 1024, ge=1024, description="Decompressed page content, all pages."
    )
    ingest_timeout_s: float = Field(default=120.0, gt=0)
    max_options_bytes: int = Field(default=16 * 1024, ge=2)

    # Request guards (security/, docs/adr/0011-limits.md): body caps, rate limits, idempotency.
    max_command_request_bytes: int | None = Field(
        default=None, ge=1024, description="Default: documents x document size + 1 MiB of form."
    )
    max_query_request_bytes: int = Field(default=64 * 1024, ge=1024)
    rate_limits_enabled: bool = True
    rate_limits: dict[str, dict[str, str | None]] = Field(
        default_factory=dict,
        description="TF_RATE_LIMITS, JSON laid over the defaults rate by rate, e.g. "
        '{"POST /tickets": {"user": "60/hour", "tenant": "600/hour"}}; null turns a rate off.',
    )
    idempotency_ttl_s: float = Field(default=24 * 3600.0, gt=0)
    submit_max_wait_s: float = Field(
        default=60.0,
        ge=0,
        le=600,
        description="The longest `Prefer: wait=N` that POST /tickets honours (a longer wait"
        " waits this long); 0 ignores the preference.",
    )
    idempotency_lease_s: float = Field(
        default=5.0,
        gt=0,
        description="How long a request's claim on its Idempotency-Key outlives it: renewed"
        " while the request runs, so a process that dies frees the key within this time.",
    )

    # Servers that are away: how long a request waits before it answers 503.
    db_acquire_timeout_s: float = Field(
        default=1.0, gt=0, description="Longest wait for a database connection in the APIs."
    )
    redis_timeout_s: float = Field(
        default=1.0, gt=0, description="Longest wait for Redis to connect or reply."
    )

    # The JetStream stream every event is relayed to.
    stream_name: str = "TF_EVENTS"
    stream_replicas: int = Field(
        default=1,
        ge=1,
        le=5,
        description="Unset: 3 (at most the cluster's size) when NATS is clustered, else 1.",
    )
    stream_storage: Literal["file", "memory"] = "file"
    stream_max_age_days: float = Field(default=30.0, gt=0)
    stream_duplicate_window_s: float = Field(default=120.0, gt=0)
    relay_max_in_flight: int = Field(default=256, ge=1, le=10_000)
    relay_batch_size: int = Field(default=500, ge=1, le=10_000)
    retention_interval_s: float = Field(
        default=3600.0,
        gt=0,
        description="How often the relay process purges documents tenants no longer keep.",
    )

    db_pool_size: int = Field(default=5, ge=1)

    # Workers.
    ingest_concurrency: int = Field(default=2, ge=1, le=64)
    ingest_ack_wait_s: float = Field(
        default=30.0,
        ge=1.0,
        description="How long a document delivered to an ingest worker that went silent (it "
        "died, or lost its NATS node) waits before another worker gets it; a live worker "
        "extends it while it works.",
    )
    extraction_memory_bytes: int = Field(default=2 * 1024**3, ge=64 * 1024**2)
    inference_concurrency: int = Field(default=2, ge=1, le=256)
    inference_ack_wait_s: float = Field(default=60.0, ge=1.0)
    inference_max_deliver: int = Field(default=4, ge=1, le=50)
    inference_timeout_s: float = Field(default=600.0, gt=0)
    inference_threads: int | None = Field(default=None, ge=1, description="llama.cpp threads.")
    # Fair scheduling of inference between tenants (handlers/fairness.py).
    inference_buffer: int = Field(default=256, ge=1, le=100_000, description="Messages held.")
    inference_tenant_concurrency: int = Field(
        default=2, ge=1, description="Tickets of one tenant with the model at once, all workers."
    )
    inference_tenant_limits: dict[str, int] = Field(
        default_factory=dict, description='Per-tenant overrides, JSON: {"acme": 8}.'
    )
    interactive_max_chars: int = Field(
        default=20_000, ge=0, description="Tickets with smaller documents are interactive."
    )
    bulk_promote_after_s: float = Field(default=60.0, gt=0)
    max_prompt_document_chars: int = Field(default=12_000, ge=500)
    model_path: Path | None = Field(default=None, description="GGUF file; default SmolLM2.")

    # Where inference runs: the bundled CPU model in process, SGLang's native API, or any
    # OpenAI-compatible server (SGLang's included). See docs/gpu-deployment.md.
    inference_backend: Literal["llama-cpp", "sglang", "openai"] = "llama-cpp"
    sglang_url: str = Field(
        default="http://127.0.0.1:30000",
        description="TF_SGLANG_URL: one URL, or several separated by commas (used in turn); "
        "the sglang and openai backends both use it.",
    )
    sglang_model: str | None = Field(default=None, description="Default: asked from the server.")
    sglang_chat_template: Literal["chatml", "llama3"] = "chatml"
    openai_response_format: Literal["json_schema", "json_object"] = "json_schema"
    inference_http_timeout_s: float = Field(default=300.0, gt=0)
    inference_connect_timeout_s: float = Field(default=5.0, gt=0)
    inference_max_connections: int = Field(default=64, ge=1, le=10_000)

    @model_validator(mode="after")
    def _production_needs_real_secrets(self) -> Settings:
        if self.env == "production" and self.jwt_secret == DEVELOPMENT_JWT_SECRET:
            raise ValueError("TF_JWT_SECRET must be set to a real secret when TF_ENV=production")
        if self.env == "production" and len(self.jwt_secret) < 32:
            raise ValueError("TF_JWT_SECRET must be at least 32 characters in production")
        if self.env == "production" and not (self.audit_signing_key or "").strip():
            raise ValueError(
                "TF_AUDIT_SIGNING_KEY must be set (the path of an Ed25519 private key in PEM, "
                "or the PEM) when TF_ENV=production"
            )
        return self

    @model_validator(mode="after")
    def _identity_provider_is_complete(self) -> Settings:
        if self.jwks_url is None:
            return self
        if not self.jwks_issuer or not self.jwks_audience:
            raise ValueError("TF_JWKS_URL needs TF_JWKS_ISSUER and TF_JWKS_AUDIENCE")
        if self.jwks_issuer == self.jwt_issuer:
            raise ValueError("TF_JWKS_ISSUER must differ from TF_JWT_ISSUER")
        if not self.jwks_url.startswith("https://") and self.env == "production":
            raise ValueError("TF_JWKS_URL must be https:// in production")
        if not self.jwks_url.startswith(("https://", "http://")):
            raise ValueError("TF_JWKS_URL must be an http(s) URL")
        return self

    @field_validator("rate_limits")
    @classmethod
    def _rate_limits_parse(
        cls, value: dict[str, dict[str, str | None]]
    ) -> dict[str, dict[str, str | None]]:
        from security.limits import RateLimitRules

        RateLimitRules.with_defaults(value)  # fails fast on a rule it cannot read
        return value

    @property
    def command_request_cap(self) -> int:
        """The largest command API request body: every document at its cap, plus the form."""
        if self.max_command_request_bytes is not None:
            return self.max_command_request_bytes
        documents = self.max_documents_per_ticket * self.max_upload_bytes
        return documents + self.max_options_bytes + 1024 * 1024

    @field_validator("sglang_url")
    @classmethod
    def _urls_are_http(cls, value: str) -> str:
        urls = [url.strip() for url in value.split(",") if url.strip()]
        if not urls or not all(url.startswith(("http://", "https://")) for url in urls):
            raise ValueError("TF_SGLANG_URL must be http(s) URLs separated by commas")
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _trusted_proxies_parse(cls, value: str) -> str:
        for entry in _comma_separated(value):
            _address_or_network(entry)
        return value

    @property
    def trusted_proxy_list(self) -> list[str]:
        """The addresses and networks in TF_TRUSTED_PROXIES, normalised (`10.1.2.3/8` becomes
        `10.0.0.0/8`); empty: trust no proxy headers."""
        return [_address_or_network(entry) for entry in _comma_separated(self.trusted_proxies)]

    @property
    def serves_api_docs(self) -> bool:
        """Both APIs serve /openapi.json, /docs and /redoc, except in production."""
        return self.env != "production"

    @property
    def sglang_urls(self) -> list[str]:
        """The SGLang (or sglang-router, or OpenAI-compatible) base URLs from TF_SGLANG_URL."""
        return [url.strip().rstrip("/") for url in self.sglang_url.split(",") if url.strip()]

    @model_validator(mode="after")
    def _replicas_follow_the_cluster(self) -> Settings:
        if "stream_replicas" not in self.model_fields_set:
            nodes = self.nats_cluster_size if not self.nats_url else len(self.nats_urls)
            if nodes > 1:
                self.stream_replicas = min(3, nodes)
        return self

    @property
    def nats_urls(self) -> list[str]:
        """The NATS servers of TF_NATS_URL (comma-separated: the seeds of a cluster)."""
        return _comma_separated(self.nats_url or "")

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


def _comma_separated(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def _address_or_network(entry: str) -> str:
    try:
        if "/" in entry:
            return str(ipaddress.ip_network(entry, strict=False))
        return str(ipaddress.ip_address(entry))
    except ValueError:
        raise ValueError(
            f"TF_TRUSTED_PROXIES: {entry!r} is not an IP address or a CIDR network"
        ) from None
