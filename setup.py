"""efficientlm: efficient Transformer language models in JAX/Flax."""

import pathlib
import re

import setuptools

_ROOT = pathlib.Path(__file__).parent
_VERSION = re.search(r"__version__ = '([^']+)'",
                     (_ROOT / 'efficientlm' / '__init__.py').read_text()).group(1)

setuptools.setup(
    name='efficientlm',
    version=_VERSION,
    description='JAX/Flax research code for efficient Transformer language models.',
    long_description=(_ROOT / 'README.md').read_text(),
    long_description_content_type='text/markdown',
    python_requires='>=3.11',
    packages=setuptools.find_packages(include=['efficientlm', 'efficientlm.*']),
    install_requires=[
        'jax>=0.10.2',
        'flax>=0.12.8',
        'optax>=0.2.8',
        'orbax-checkpoint>=0.12.8',
        'gin-config>=0.5.0',
        'tensorstore>=0.1.86',
        'numpy>=2.0',
        'safetensors>=0.4',  # Hugging Face checkpoints
        'tensorboardX>=2.6',  # TensorBoard event files without importing TensorFlow
        'matplotlib>=3.8',  # inference sweep plots
    ],
    extras_require={
        # Only efficientlm/data imports these (lazily).
        'data': ['seqio>=0.0.20', 'tensorflow-datasets>=4.9.10', 'tensorflow>=2.21',
                 'sentencepiece'],
        'test': ['pytest>=8', 'pytest-xdist>=3'],
        # Only tests/checkpoints/test_hf_transformers.py imports these (and skips without them).
        'hf': ['transformers', 'torch'],
        'gpu': ['jax[cuda13]'],
        # google-cloud-storage: tensorboardX writes gs:// event files through it.
        'tpu': ['jax[tpu]', 'google-cloud-storage'],
    },
)
