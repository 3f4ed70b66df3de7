"""Accounts and identity: the `User` and `Tenant` aggregates, the account service, passwords,
sessions (refresh tokens), data subjects' keys, tenants' retention, and the account and
integrator routes the composition root mounts on the command API.

It sits above `commands/`, whose shared write-side helpers it uses (the event-class factory, the
conflict retry, domain errors, trace context); `commands/` never imports it
(docs/adr/0024-write-side-port-and-events-from-the-contract.md).
"""
