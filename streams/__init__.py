"""The event stream: the event contract, the relay to JetStream and the stream set-up."""
