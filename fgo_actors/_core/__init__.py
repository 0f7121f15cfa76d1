"""The pure core: records, token counting, partitioning, the merge forest, edits
and merge decisions, the playbook, prompts, statistics, JSON I/O.

Nothing here imports trio, httpx, sqlite3 or click, so every decision can be
tested synchronously (and with hypothesis).
"""
