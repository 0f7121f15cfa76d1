"""Durable state on disk: the SQLite store (trajectories, versions, LLM
responses), shared by the daemon and by the batch engine's response cache, and
the append-only journals a long job resumes from.

It sits beside ``_llm`` rather than inside ``_daemon`` because ``fgo optimize``
caches its replies in the same store, and the batch engine must not import the
daemon."""
