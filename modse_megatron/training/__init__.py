"""Pretraining pieces: data (indexed datasets, tokenizer, built-in corpus), loop, checkpoints.

Importing this package is cheap: megatron-core is imported only by the submodules that need
it. :class:`DataError` lives here (not in ``data.py``) so every data module can raise it without
import cycles; ``modse_megatron.training.data`` re-exports it.
"""


class DataError(ValueError):
    """Input data, a tokenizer or an output path is unusable; the one-line message names the
    file and the fix. Raised before anything already on disk is overwritten."""
