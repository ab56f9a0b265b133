"""Classifiers: the study's (classifiers) and the reference classifier's verdicts on synthetic images (quality, select)."""
