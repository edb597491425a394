"""Data layer: dataset layouts -> MONAI datalists, synthetic generators, transforms."""
