"""Packaging for admm-onnx.

`cli/` and `models/` live at the top of the repository (the design's layout) but install as
`admm_onnx.cli` and `admm_onnx.models`, so nothing called `cli` or `models` lands in
site-packages.
"""
from setuptools import setup

setup(
    name="admm-onnx",
    version="0.1.0",
    description="ADMM weight pruning for any ONNX model, with sparse (CSR) ONNX export",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9,<3.13",
    packages=["admm_onnx", "admm_onnx.graph", "admm_onnx.allocation", "admm_onnx.cli", "admm_onnx.models", "admm_onnx.structured", "admm_onnx.structured.rules"],
    package_dir={
        "admm_onnx": "admm_onnx",
        "admm_onnx.cli": "cli",
        "admm_onnx.models": "models",
    },
    install_requires=[
        # onnx >= 1.18 writes IR 11+ into the optimizer model; ORT training 1.19.2 loads IR <= 10.
        # admm_onnx also normalises the IR version of every artifact it writes.
        "onnx>=1.15,<1.18",
        "onnxruntime-training-cpu==1.19.2",
        "numpy>=1.21",
        "scipy>=1.7",
        "click>=8.0",
        'tomli>=1.1; python_version < "3.11"',
    ],
    extras_require={
        # The embedded default data set (8x8 handwritten digits shipped inside scikit-learn).
        "demo": ["scikit-learn>=1.0"],
        "test": ["pytest>=7", "hypothesis>=6", "scikit-learn>=1.0", "matplotlib>=3.5"],
        # Sensitivity sweeps and other trials on a Ray cluster (--ray ADDRESS or RAY_ADDRESS).
        "ray": ["ray>=2.9"],
        # The sensitivity plot (admm-onnx sensitivity --plot).
        "plot": ["matplotlib>=3.5"],
    },
    entry_points={"console_scripts": ["admm-onnx=admm_onnx.cli.main:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
