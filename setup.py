"""One distribution, ``refattn``: the references (``refattn/``), the analysis
(``analysis/`` -> ``refattn.analysis``) and the GPU kernels (``gpu/`` -> ``refattn.gpu``)."""
from setuptools import setup

setup(
    name="refattn",
    version="0.1.0",
    description="Float64 reference implementations of efficient attention mechanisms, "
    "their analysis, and CUDA kernels checked against them",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["refattn", "refattn.testing", "refattn.analysis", "refattn.gpu"],
    package_dir={
        "refattn": "refattn",
        "refattn.analysis": "analysis",
        "refattn.gpu": "gpu",
    },
    package_data={"refattn.gpu": ["kernels/*.cu", "kernels/*.cuh"]},
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
        "test": ["pytest>=7", "hypothesis>=6.80", "mpmath>=1.3", "build>=1.0",
                 "setuptools>=64", "wheel", "torch==2.13.0"],
        "gpu": ["cupy-cuda13x", "cuda-bindings>=13", "nvidia-cuda-nvrtc"],
        "bench": ["torch==2.13.0"],
    },
    entry_points={"console_scripts": ["refattn = refattn.cli:main"]},
)
