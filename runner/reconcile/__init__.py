"""Reconcile: diff the specs at a source revision against what is applied, and apply the difference."""
