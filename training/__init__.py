"""Supermask training and GLUE evaluation (Radiya-Dixit & Wang 2020)."""
