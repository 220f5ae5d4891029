"""Plumbing: the event-loop HTTP/1.1 client, when to move CPU work to a thread, atomic 0600
file writes, logging, and the metrics registry."""
