"""Everything that exists because of megatron-core **0.16.1** specifically: the CPU layer, bug
fixes, and the places where we reproduce or bend one of its functions. Upgrading megatron-core
means walking this checklist: for each item, open the upstream line named, decide whether the
workaround is still needed, and adjust it (then run the whole suite, which checks each one).

Modules here (nothing else in the package patches megatron):

* :mod:`.cpu` — the CPU layer (installed only where it is wanted; see its docstring):
  CUDA device requests (``torch.cuda.current_device()`` as ``device=``, ``"cuda"`` literals,
  ``.cuda()``), legacy type names compared in ``optimizer/optimizer.py:690``,
  ``optimizer/distrib_optimizer.py:420``, ``optimizer/clip_grads.py:167``;
  ``Tensor.record_stream`` in ``transformer/moe/moe_utils.py:1097``; the deferred RNG change of
  ``tensor_parallel/random.py:99-111`` and its fork warning ``:263-265`` (tracker ``:235-277``);
  ``te_general_gemm`` read in ``moe_utils.py:1192`` but bound only with TE (``:34``); gloo's
  ``all_to_all_single`` split sizes (``token_dispatcher.py:695/778``,
  ``tensor_parallel/mappings.py:444``) and unequal ``all_gather`` (``mappings.py:149``); the mode
  re-entered in ``_AllToAll.backward`` (``mappings.py:439/458``) and in the threads megatron
  starts (``utils.py:1754``, ``datasets/blended_megatron_dataset_builder.py:357``,
  ``inference/engines/dynamic_engine.py:1433``,
  ``inference/text_generation_controllers/text_generation_controller.py:1091``).
* :mod:`.fixes` — bugs on megatron's no-apex/TE optimizer path and in checkpoint writing:
  ``KeyError: 'step'`` loading a fully reshardable optimizer
  (``optimizer/distrib_optimizer.py:817-825``, ``:940``, ``:2101``); one Adam ``step`` tensor
  shared by every parameter after a load (``distrib_optimizer.py:825``); ``state_dict()`` of an
  optimizer that has not stepped (``distrib_optimizer.py:640-642``,
  :func:`.fixes.materialize_optimizer_state`); the checkpoint queue's manager process and the
  forked writers that outlive a SIGKILLed trainer
  (``dist_checkpointing/strategies/filesystem_async.py:51-56``, ``:291``, ``:412``);
  ``Float16Module.load_state_dict`` dropping ``strict=False``'s result
  (``transformer/module.py:511-514``, :func:`.fixes.unwrap_float16_module`).
* :mod:`.messages` — warnings megatron prints on every run (``optimizer/__init__.py:24``,
  ``optimizer/optimizer.py:28``, ``optimizer/clip_grads.py:29``, ``models/backends.py:21``,
  ``megatron_fsdp/mixed_precision.py:114``; torch's deprecations megatron triggers).
* :mod:`.norm` — ``WrappedTorchNorm`` refuses sequence parallelism
  (``transformer/torch_norm.py:32``); our torch norm marks its weights for the TP gradient
  all-reduce of ``distributed/finalize_model_grads.py:354``. Applied by the MoDSE layer specs
  (:mod:`modse_megatron.moe.specs`) and, for megatron's own specs, by the driver's model builder.
* :mod:`.datasets` — ``BlendedDataset._build_indices`` calls ``torch.distributed.get_rank()``
  unguarded (``datasets/blended_dataset.py:153``).

Places outside this package that follow a megatron 0.16.1 function line by line (they are
features, not workarounds, so they live with their feature; re-read them on an upgrade):

* ``moe/router.py`` ``MoDSERouter.routing``: calls ``TopKRouter.routing``
  (``transformer/moe/router.py:545-631``) with its capacity dropping (``:587-595``) switched
  off and its expert-bias update (``:629``) deferred, then drops with deterministic ties;
  ``MoDSERouter.forward`` is ``TopKRouter.forward`` (``router.py:639``) plus sequence pooling.
* ``checkpoint/safe_load.py``: ``TorchDistLoadShardedStrategy.load``
  (``dist_checkpointing/strategies/torch.py:770-821``) with a restricted unpickler.
* ``checkpoint/reshard.py``: ``chained_optim_avoid_prefix`` (``optimizer/optimizer.py:1190-1198``)
  and the optimizer common-state layout.
* ``inference/model.py``: the reference model reproduces megatron's GPT forward (each piece
  names its megatron code; ``tests/inference`` compares logits with megatron's).
* ``moe/specs.py`` ``_global_layer_ids``: the layer slicing of ``get_gpt_decoder_block_spec``
  (``models/gpt/gpt_layer_specs.py:627-639``), so each MoE layer gets its own placement;
  ``config.moe_layer_indices`` is its ``moe_layer_freq`` pattern (``:579-598``).
* ``training/arguments.py``: top-1 softmax routing needs ``--moe-router-pre-softmax``
  (``transformer/transformer_config.py:1636``), checked before launch.

The version itself: :data:`MEGATRON_CORE_VERSION` here (checked at import by
:func:`modse_megatron.platform.check_megatron_version`) and the pin in ``pyproject.toml``.
"""
from __future__ import annotations

MEGATRON_CORE_VERSION = "0.16.1"
