"""Segmentation and typicality models: networks, augmentation, metrics, logistic regression."""
