"""Serving runtime: the engine protocol a server talks to, the scheduler and the engine thread."""
