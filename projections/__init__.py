"""Read-model builders that fold the event log into query tables, each with its position."""
