"""fastlivt: LiVT (MGP + Balanced Fine-Tuning) for Vision Transformers on long-tailed data, built for throughput."""
from setuptools import find_packages, setup

install_requires = [
    # torch is not pinned here: GPU servers bring their own CUDA build (2.11 is supported). On the 2-core CPU
    # development/CI machines scripts/install.sh pins torch==2.14.1 + torchvision==0.29.1, because torch 2.13.0+cpu
    # breaks PyPI torchvision's import (operator torchvision::nms does not exist).
    "torch>=2.11",
    "torchvision",
    "timm>=1.0.15",  # Mixup/RandAugment/RandomErasing/param_groups_layer_decay/CosineLRScheduler/ModelEmaV3 as used here
    "ffcv==1.0.2",  # last release (sdist only); its C extension needs pkg-config, libturbojpeg0-dev, libopencv-dev
    "opencv-python",  # ffcv imports cv2 and declares the GUI wheel; never also install opencv-python-headless
    "numba",
    "nvidia-dali-cuda130>=2.0",  # CUDA 13 build; runs CPU-only pipelines without a GPU
    "xformers>=0.0.33",  # memory-efficient attention on CUDA; CPU falls back to torch SDPA (logged)
    "deepspeed>=0.17",  # install with DS_BUILD_OPS=0: ops are JIT-built only when used
    "triton>=3.3",
    "numpy",
    # timm 1.0.31 RandAugment posterize asks for 0 bits at the top magnitude of rand-m9-mstd0.5-inc1; Pillow 13
    # rejects that ("bits must be between or equal to 1 and 8"), Pillow 12 posterizes to black as timm expects.
    "pillow>=10,<13",
    "pyyaml",
    "tqdm",
    "matplotlib",
    "safetensors",
    "tensorboard",
]

setup(
    name="fastlivt",
    version="0.1.0",
    description="High-throughput LiVT (masked generative pretraining + Balanced BCE fine-tuning) for ViTs on long-tailed data",
    python_requires=">=3.10",
    packages=find_packages(include=["fastlivt", "fastlivt.*", "kernels", "kernels.*", "data_prep", "data_prep.*"]),
    install_requires=install_requires,
    extras_require={"dev": ["pytest>=8", "pytest-timeout"]},
    entry_points={"console_scripts": ["fastlivt=fastlivt.cli:main"]},
)
