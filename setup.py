from setuptools import find_packages, setup

setup(
    name="megapix",
    version=open("megapix/__init__.py").read().split('__version__ = "')[1].split('"')[0],  # the one source
    description="A DeepSpeed trainer for image GPTs (iGPT): ZeRO, pipeline and tensor parallelism, "
    "Triton kernels, SLURM scripts, feature extraction and linear probes.",
    python_requires=">=3.10",
    # kernels/ stays at the top of the repo (it imports nothing from megapix/) but installs as megapix.kernels:
    # the top-level name `kernels` belongs to Hugging Face's hub kernels package, and one would shadow the other.
    packages=find_packages(include=["megapix", "megapix.*"]) + ["megapix.kernels"],
    package_dir={"megapix.kernels": "kernels"},
    # install_requires is what `megapix train` and the other commands need (`make train` installs only this);
    # the Triton kernels, the HF parity checks, MPI launches and the tests are extras.
    install_requires=[
        # CPU installs: pin torch (`pip install torch==2.13.0`) before this, or pip pulls a CUDA build.
        "torch>=2.4",
        "deepspeed>=0.16",
        "numpy",
        "pyyaml",
        "safetensors",
        "tqdm",
        "pillow",
        "scikit-learn",  # k-means init helpers and the embedded default dataset (digits)
        "matplotlib",
    ],
    extras_require={
        "mpi": ["mpi4py", "mpich"],
        "gpu": ["triton"],
        "wandb": ["wandb"],
        # wds: and parquet: data sources (tar shards are read with the standard library; webdataset brings the
        # brace expansion of shard patterns, pyarrow reads Parquet)
        "shards": ["webdataset", "pyarrow"],
        "test": ["pytest", "pytest-timeout", "ruff", "transformers", "triton", "mpi4py", "mpich", "wandb",
                 "webdataset", "pyarrow"],
    },
    entry_points={"console_scripts": ["megapix=megapix.cli:main"]},
)
