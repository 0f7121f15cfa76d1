"""Talking to LLMs: the shared gateway (transport, retries, adaptive concurrency,
usage ledger, response cache hook), strict-mode wire schemas, and the embedded
local model server."""
