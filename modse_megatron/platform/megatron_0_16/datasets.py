"""megatron-core 0.16.1 dataset workaround (see the checklist in this package's ``__init__``)."""
from __future__ import annotations

import dataclasses
import logging

import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder


class SingleProcessSafeBuilder(BlendedMegatronDatasetBuilder):
    """megatron's builder, minus one crash when torch.distributed is not initialised.

    megatron-core 0.16.1 ``BlendedDataset._build_indices`` calls
    ``torch.distributed.get_rank()`` unguarded when ``path_to_cache`` is set and its cache is
    missing, so any blend fails in a single process. The blend indices are cheap (one C++
    pass), so in that case they are built in memory instead of cached; GPTDataset's costly
    indices are still cached.
    """

    @staticmethod
    def build_generic_dataset(cls, is_built_on_rank, synchronize_ranks, *args):
        from megatron.core.datasets.blended_dataset import BlendedDataset

        build = BlendedMegatronDatasetBuilder.build_generic_dataset
        if cls is not BlendedDataset or torch.distributed.is_initialized():
            return build(cls, is_built_on_rank, synchronize_ranks, *args)
        *head, config = args
        args = (*head, dataclasses.replace(config, path_to_cache=None))
        log = logging.getLogger("megatron.core.datasets.blended_dataset")
        log.addFilter(_drop_no_cache_warning)  # the warning about this very choice
        try:
            return build(cls, is_built_on_rank, synchronize_ranks, *args)
        finally:
            log.removeFilter(_drop_no_cache_warning)


def _drop_no_cache_warning(record: logging.LogRecord) -> bool:
    return "path_to_cache is None" not in record.getMessage()
