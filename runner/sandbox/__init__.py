"""The operating system's side of a run's permissions: Landlock, resource limits, a clean environment."""
