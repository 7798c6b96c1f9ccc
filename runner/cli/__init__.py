"""agentctl, the command line."""
