"""fastlivt: LiVT (MGP + Balanced Fine-Tuning) for Vision Transformers on long-tailed data, built for throughput."""
from setuptools import find_packages, setup

# Every distribution that a module of fastlivt (fastlivt.kernels and fastlivt.data_prep included) imports is
# declared here or in an extra (tests/project/test_dependencies.py checks the import closure against these lists).
install_requires = [
    # torch is not pinned here: GPU servers bring their own CUDA build (2.11 is supported). On the 2-core CPU
    # development/CI machines scripts/install.sh pins torch==2.14.1 + torchvision==0.29.1, because torch 2.13.0+cpu
    # breaks PyPI torchvision's import (operator torchvision::nms does not exist).
    "torch>=2.11",
    "torchvision",
    "timm>=1.0.15",  # Mixup/RandAugment/RandomErasing/param_groups_layer_decay/CosineLRScheduler/ModelEmaV3 as used here
    "triton>=3.3",
    "numpy",
    "opencv-python",  # data_prep decodes with cv2; FFCV declares the GUI wheel too: never also install -headless
    # timm 1.0.31 RandAugment posterize asks for 0 bits at the top magnitude of rand-m9-mstd0.5-inc1; Pillow 13
    # rejects that ("bits must be between or equal to 1 and 8"), Pillow 12 posterizes to black as timm expects.
    "pillow>=10,<13",
    "pydantic>=2",  # fastlivt.data_prep.config validates the config dataclasses with it
    "pyyaml",
    "tqdm",
    "matplotlib",
    "safetensors",
    "tensorboard",  # imported through torch.utils.tensorboard (run.tensorboard=true, the default)
]

# The optional engines: each is imported only by the code that uses it, and without it that code says so (a log line,
# a one-line error, or a bench row `unavailable: <reason>`); the torch data backend, SDPA attention and the plain
# PyTorch runtime need none of them. scripts/install.sh installs them all ("engines").
extras_require = {
    "ffcv": ["ffcv==1.0.2"],  # last release (sdist only); its C extension needs pkg-config, libturbojpeg0-dev,
    # libopencv-dev; it brings numba and opencv-python. The converter needs it (FFCV's resize rule and JPEG encoder).
    "dali": ["nvidia-dali-cuda130>=2.0"],  # CUDA 13 build; runs CPU-only pipelines without a GPU; brings wds2idx
    "xformers": ["xformers>=0.0.33"],  # memory-efficient attention on CUDA; CPU uses torch SDPA (logged)
    "deepspeed": ["deepspeed>=0.17"],  # install with DS_BUILD_OPS=0: ops are JIT-built only when used
    "dev": ["pytest>=8", "pytest-timeout"],
}
extras_require["engines"] = [r for k in ("ffcv", "dali", "xformers", "deepspeed") for r in extras_require[k]]

setup(
    name="fastlivt",
    version="0.1.0",
    description="High-throughput LiVT (masked generative pretraining + Balanced BCE fine-tuning) for ViTs on long-tailed data",
    python_requires=">=3.10",
    # One top-level name: kernels/ and data_prep/ are the packages fastlivt.kernels and fastlivt.data_prep (through the
    # links fastlivt/kernels and fastlivt/data_prep, which find_packages follows and the wheel holds as real files).
    packages=find_packages(include=["fastlivt", "fastlivt.*"]),
    install_requires=install_requires,
    extras_require=extras_require,
    entry_points={"console_scripts": ["fastlivt=fastlivt.cli:main"]},
)
