"""agent-orchestrator: a self-hosted GitOps runner for AI agents."""

__version__ = "0.1.0"
