"""gpt-jax: GPT-3-style models with fast local+strided sparse attention in JAX/Flax."""

from setuptools import find_packages, setup

# Pinned together and tested: jax 0.11.2 is the version on our GPU machines (Pallas APIs move fast).
INSTALL_REQUIRES = [
    "jax==0.11.2",
    "jaxlib==0.11.2",
    "flax==0.12.12",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "einops==0.8.2",
    "ml-collections==1.1.0",
    "absl-py>=2.1,<3",
    "numpy>=2.0,<3",
    "tokenizers==0.23.3",
    "tensorboardX==2.6.5",
    "tqdm==4.70.1",
    "matplotlib==3.11.2",
]

setup(
    name="gpt-jax",
    version="0.1.0",
    description="GPT-3-style models with dense and local+strided sparse attention in JAX/Flax",
    python_requires=">=3.12",
    packages=find_packages(include=["gpt_jax", "gpt_jax.*", "kernels", "kernels.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require={
        "dev": ["pytest==9.2.0", "pytest-xdist==3.8.0", "nbclient==0.11.0", "nbformat==5.11.1", "ipykernel==7.4.0"],
        "gpu": ["jax[cuda13]==0.11.2"],
        # kernels.gpu_compile: compile the GPU kernels for an H100 on any x86-64 machine (nvdisasm:
        # Mosaic GPU's dumps disassemble what ptxas built)
        "gpu_compile": ["jax[cuda13]==0.11.2", "nvidia-cuda-nvdisasm==13.5.37"],
        "tpu": ["jax[tpu]==0.11.2"],
    },
)
