"""Installs the `engine` library, the `instagen` console script and the compiled kernels.

Build without isolation so the extension compiles against the torch already installed
(an isolated build would pull a fresh, multi-GB CUDA torch from the registry):

    pip install --no-build-isolation -c constraints.txt -e ".[dev]"
"""
import os
import shutil

from setuptools import find_packages, setup

REQUIRES = [
    "torch>=2.4",
    "ray[data,train,default]>=2.40",
    "diffusers>=0.30",
    "transformers>=4.45",
    # transformers reads GGUF files (the prompt-expansion language model) with it
    "gguf>=0.10",
    "accelerate>=0.30",
    "deepspeed>=0.15",
    "webdataset>=0.2.86",
    "pycocotools>=2.0.7",
    "lvis>=0.5.3",
    "safetensors>=0.4",
    "fsspec>=2023.1",
    "pyarrow>=14",
    "pyyaml>=6",
    "scipy>=1.10",
    "pillow>=10",
    "numpy>=1.24",
    "tqdm>=4.60",
    "matplotlib>=3.5",  # the toy world's table as a picture (pycocotools needs it too)
]


def kernel_extensions():
    """The CPU deformable-attention kernel always; the CUDA one when CUDA torch and nvcc exist."""
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:  # metadata-only runs (e.g. `python setup.py --name`)
        return [], {}
    src = os.path.join("kernels", "ms_deform_attn")
    exts = []
    cpu_src = os.path.join(src, "ms_deform_attn_cpu.cpp")
    if os.path.exists(cpu_src):
        exts.append(cpp_extension.CppExtension(
            "engine.ops._ms_deform_attn_cpu", [cpu_src],
            extra_compile_args=["-O3", "-fopenmp"], extra_link_args=["-fopenmp"]))
    cuda_src = os.path.join(src, "ms_deform_attn_cuda.cu")
    want_cuda = os.environ.get("INSTAGEN_BUILD_CUDA", "auto")
    has_cuda = torch.version.cuda is not None and shutil.which("nvcc") is not None
    if os.path.exists(cuda_src) and want_cuda != "0" and (has_cuda or want_cuda == "1"):
        exts.append(cpp_extension.CUDAExtension(
            "engine.ops._ms_deform_attn_cuda", [cuda_src],
            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math"]}))
    return exts, {"build_ext": cpp_extension.BuildExtension.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = kernel_extensions()

setup(
    name="instagen-engine",
    version="0.1.0",
    description="Ray-distributed synthesis of object-detection datasets after InstaGen (CVPR 2024)",
    python_requires=">=3.10,<3.13",
    packages=find_packages(include=["engine", "engine.*", "jobs"]),
    install_requires=REQUIRES,
    extras_require={
        "gpu": ["xformers"],
        # The floor on s3fs makes pip pick a boto3 that s3fs's aiobotocore accepts: without it, pip
        # took the newest boto3 (moto needs one) and fell back to s3fs 0.4.2, which no longer works.
        "cloud": ["s3fs[boto3]>=2024.1", "gcsfs>=2024.1"],
        # boto3 (through moto): the tests validate cluster.yaml's node configs against the EC2 API
        # model offline; s3fs and moto's S3 server: the tests write datasets to s3:// from Ray workers.
        "dev": ["pytest>=7", "pytest-timeout", "s3fs[boto3]>=2024.1", "moto[server]"],
    },
    entry_points={"console_scripts": ["instagen=engine.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
