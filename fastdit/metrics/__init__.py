"""Sample-quality metrics: Fréchet distance (FID's formula, any features), improved precision / recall
(k-NN manifolds), and a feature extractor for the digits demo (a small CNN trained on real training digits)."""
from fastdit.metrics.digits import DigitFeatures
from fastdit.metrics.frechet import frechet_distance, frechet_distance_from_stats, gaussian_stats
from fastdit.metrics.manifold import kth_neighbour_radii, manifold_membership, precision_recall

__all__ = ["DigitFeatures", "frechet_distance", "frechet_distance_from_stats", "gaussian_stats",
           "kth_neighbour_radii", "manifold_membership", "precision_recall"]
