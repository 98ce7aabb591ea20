"""Evaluations: caption accuracy, real/synthetic mixes in segmentation training, and realism tests.

Each writes a report folder: report.md, a CSV per table and PNG plots (``evaluate.reconstruction``,
an autoencoder's held-out PSNR / SSIM / two-sample AUC, returns numbers).
"""
