"""Package ssl_jax. Dependencies are pinned to versions checked to work together (DESIGN.md)."""
import setuptools

INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "grain==0.2.18",
    "tensorflow-datasets==4.9.10",
    "scikit-image==0.26.0",
    "ml-collections==1.1.0",
    "absl-py==2.5.1",
    "tqdm==4.70.1",
    "safetensors==0.8.0",
    "gcsfs==2026.10.1",  # gs:// workdirs and data through etils.epath
    "pillow==13.0.0",
    "numpy==2.4.6",
]

setuptools.setup(
    name="ssl_jax",
    version="0.1.0",
    description="Region- and mask-based self-supervised pretraining in JAX/Flax",
    packages=setuptools.find_packages(include=["ssl_jax", "ssl_jax.*"]),
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require={
        "dev": ["pytest==9.2.0", "pytest-xdist==3.8.0"],
        "torch": ["torch==2.13.0"],
    },
)
