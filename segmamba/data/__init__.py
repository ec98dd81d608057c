"""Data: BraTS2023 loading, preprocessing, caching, splits, augmentation, semi-synthetic set."""
