"""Evaluation: judges (feature networks for FID, attribute classifiers for prompt alignment), reports."""
