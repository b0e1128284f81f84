"""Small data sets shipped with backprop (no download at run time)."""
