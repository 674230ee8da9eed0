"""ssl_jax: self-supervised pretraining of vision backbones in JAX/Flax (Linen)."""

__version__ = "0.1.0"
