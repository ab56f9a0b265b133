"""Results: metrics files -> the paper-style tables and figures (results), their uncertainty (stats),
and a sweep read back from DVC experiments (sweep). Imports no torch (tests/test_dvc_yaml.py)."""
