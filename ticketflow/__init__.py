"""ticketflow's composition root: settings, bootstrap per process, CLI, embedded stack."""

__version__ = "0.1.0"
