"""Evaluation: ShapesBench, prompt-adherence scoring of generated images with a procedural detector."""
