"""The write model: commands, the `Ticket` aggregate, pipeline rules and the command service."""
