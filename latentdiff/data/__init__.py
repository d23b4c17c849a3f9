"""Data: dataset loading and transforms, and the shapes world generator (latentdiff.data.shapes)."""
