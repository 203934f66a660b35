"""ExpertTimer: seconds in the experts' forward, per step, re-attached after a rebuild."""
import time

import torch

from modse_megatron.config import MoDSEConfig
from modse_megatron.testing.megatron_utils import tiny_transformer_config


def _layer():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from modse_megatron.moe.layer import MoDSEMoELayer

    config = tiny_transformer_config(num_layers=1, hidden_size=32, num_attention_heads=4, num_moe_experts=4,
                                     moe_ffn_hidden_size=32, moe_router_topk=2, add_bias_linear=False,
                                     moe_token_dispatcher_type="alltoall")
    spec = get_gpt_layer_local_spec(num_experts=4).submodules.mlp
    return MoDSEMoELayer(config, spec.submodules, modse_config=MoDSEConfig(moe_expert_widths=[48, 16, 40, 24]))


def test_timer_counts_the_experts_forward_only(one_rank):
    from modse_megatron.training.expert_time import ExpertTimer

    layer = _layer()
    model = torch.nn.ModuleList([layer])
    timer = ExpertTimer(model)
    assert timer.take() == 0.0
    slow = layer.experts.register_forward_pre_hook(lambda *a: time.sleep(0.05))  # after the timer starts
    x = torch.randn(8, 2, 32)
    layer(x)
    first = timer.take()
    assert 0.05 <= first < 5 and timer.take() == 0.0  # one forward, then nothing new
    slow.remove()
    timer.attach(model)  # a rebuild re-attaches: the old hooks are gone, nothing is counted twice
    assert len(layer.experts._forward_pre_hooks) == 1 and len(layer.experts._forward_hooks) == 1
    layer(x)
    assert 0 < timer.take() < first
