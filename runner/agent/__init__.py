"""One run of one agent: the model, the tools and their permissions, memory, budgets, the audit trail."""
