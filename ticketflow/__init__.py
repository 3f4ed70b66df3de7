"""ticketflow's composition root: settings, per-process bootstrap, the CLI and the embedded stack."""

__version__ = "0.1.0"
