"""nemo_jax: train and fine-tune Mistral NeMo 12B in JAX/Flax.

The public names are imported lazily so that `import nemo_jax` stays cheap (the tokenizer
and data tools do not need JAX compiled, and the CLIs start faster).
"""

import importlib

_EXPORTS = {
    "ModelConfig": "nemo_jax.config",
    "generate": "nemo_jax.generate",
    "load": "nemo_jax.checkpoint",
    "logits": "nemo_jax.model",
    "load_tokenizer": "nemo_jax.tokenizer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'nemo_jax' has no attribute {name!r}")
