"""The audit ledger: DuckDB at ``$AGENT_ORCH_HOME/runs.duckdb``, fed from the state journal."""
