"""Landmark data: readers, preprocessing, the on-disk cache, split, scaler and Dataset."""
