"""The event stream side of ticketflow: the event contract, the relay to JetStream, stream set-up."""
