"""Classifiers: one row per architecture (archs), training, evaluation and the reference classifier
(classifiers), what a run writes (scoring), and the reference classifier's verdicts on synthetic
images (quality, select). archs and scoring import no torch: config and the report read them."""
