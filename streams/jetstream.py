"""The JetStream stream every event is relayed to, created or updated from settings."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from nats.js import JetStreamContext
from nats.js.api import RetentionPolicy, StorageType, StreamConfig, StreamInfo
from nats.js.errors import NotFoundError

from streams.contract.subjects import STREAM_SUBJECTS

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamSettings:
    name: str = "TF_EVENTS"
    replicas: int = 1
    storage: str = "file"
    max_age_s: float = 30 * 24 * 3600.0
    duplicate_window_s: float = 120.0

    def config(self) -> StreamConfig:
        return StreamConfig(
            name=self.name,
            description="ticketflow events (tf.evt.<tenant>.<aggregate>.<id>.<event>)",
            subjects=list(STREAM_SUBJECTS),
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE if self.storage == "file" else StorageType.MEMORY,
            num_replicas=self.replicas,
            max_age=self.max_age_s,
            duplicate_window=self.duplicate_window_s,
            allow_direct=True,
        )


async def ensure_stream(js: JetStreamContext, settings: StreamSettings) -> StreamInfo:
    """Create the stream, or bring an existing one in line with the settings."""
    config = settings.config()
    try:
        await js.stream_info(settings.name)
    except NotFoundError:
        logger.info("creating stream %s", settings.name)
        return await js.add_stream(config)
    return await js.update_stream(config)
