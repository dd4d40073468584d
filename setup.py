"""FNL: factorized neural layers with spectral initialisation and Frobenius decay."""
from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent

setup(
    name="fnl",
    version="0.1.0",
    description="Factorized neural layers: spectral initialisation and Frobenius decay "
                "(Khodak et al., ICLR 2022), with timm and fairseq plugins",
    long_description=(here / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["fnl", "fnl.*", "fnl_timm", "fnl_timm.*", "fnl_fairseq", "fnl_fairseq.*"]),
    # the core imports only torch
    install_requires=["torch>=2.1"],
    extras_require={
        "timm": ["timm>=1.0.12", "torchvision", "scikit-learn", "matplotlib", "tqdm", "tensorboard"],
        "fairseq": [
            # fairseq 0.12.2 does not import on Python >= 3.11; fairseq-fixed is the same `fairseq` module
            "fairseq==0.12.2; python_version < '3.11'",
            "fairseq-fixed==0.12.3.1; python_version >= '3.11'",
            "sacrebleu>=2.0",
            "sentencepiece",
        ],
        "onnx": ["onnx", "onnxscript", "onnxruntime"],
        "dev": ["pytest", "tensorly"],
    },
    entry_points={"console_scripts": [
        "fnl-train = fnl_timm.train:main",
        "fnl-demo = fnl_timm.demo:main",
        "fnl-compress = fnl_timm.compress:main",
        "fnl-fairseq-train = fnl_fairseq.launch:main",
    ]},
    classifiers=["Programming Language :: Python :: 3", "Topic :: Scientific/Engineering :: Artificial Intelligence"],
)
