"""Results: metrics files -> the paper-style tables (results) and figures (figures), with the names
they print (names), their uncertainty (stats), and a sweep read back from DVC experiments (sweep).
Imports no torch (tests/test_dvc_yaml.py)."""
