"""Results: metrics files -> tables and figures (results), their uncertainty (stats), a sweep read back from DVC experiments (sweep)."""
