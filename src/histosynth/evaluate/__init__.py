"""Evaluations: caption accuracy, real/synthetic mixes in segmentation training, and realism tests.

Each writes a report folder: report.md, a CSV per table and PNG plots.
"""
