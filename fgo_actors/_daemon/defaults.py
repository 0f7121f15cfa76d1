"""The daemon's defaults, written once: ``DaemonConfig``, ``ServeSettings``,
the HTTP app and the help of ``fgo serve`` all read them from here."""

from __future__ import annotations

HOST = "127.0.0.1"
PORT = 8765
TOKEN_ENV = "FGO_TOKEN"
STORE = "fgo.db"
# Seconds the oldest trajectory of an open subset waits before it is sealed anyway.
MAX_WAIT = 60.0
# Least seconds between two published versions.
PUBLISH_INTERVAL = 30.0
# Sealed subsets waiting for an optimizer before ingest answers 429.
MAX_PENDING_SUBSETS = 8
# Trajectories stored but not yet packed before ingest answers 429.
MAX_QUEUED = 10_000
# Seconds before work that failed on an unreachable endpoint is tried again.
RETRY_PAUSE = 30.0
# Seconds that work under way gets to finish at shutdown.
GRACE = 10.0
# HTTP bodies: the largest body, the largest record in it, and the seconds a
# body may take to arrive.
MAX_BODY_BYTES = 16 * 1024 * 1024
MAX_RECORD_BYTES = 1024 * 1024
BODY_SECONDS = 120.0
# Agent turns per validation episode.
VALIDATE_MAX_STEPS = 8
