"""Figures: image grids of influential training examples and data-centric explanations."""

from vestigia.plots.images import plot_datacentric_explanations, plot_most_influential_images

__all__ = ["plot_datacentric_explanations", "plot_most_influential_images"]
