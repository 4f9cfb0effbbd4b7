"""Metrics, confidence intervals and plots for both stages (classification here, segmentation beside it)."""
