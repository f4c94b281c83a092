"""Reliability fault suite (issue 6): real DuckDB files, real subprocesses, the real app and real Chromium."""
