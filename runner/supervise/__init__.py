"""Supervision: the process table, triggers and the daemon loop."""
