"""Data: data set descriptions and layouts (BraTS2023, nnU-Net v2, Decathlon), case checks, planning,
preprocessing, caching, splits, augmentation, semi-synthetic sets."""
