"""Model-based routing analyses: planted routings (synthetic passes, and a reference model whose
router is forced) give the shares, deciles and correlations computed by hand; the recording hook
sees exactly what the MoE layers decide and changes nothing."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from modse_megatron.analysis import AnalysisError, routing
from modse_megatron.analysis.routing import ModelPass
from modse_megatron.analysis.stats import t_two_sided_p
from modse_megatron.inference.model import topk_routing
from tests.inference import TINY_MOE, random_reference, tiny_config

WIDTHS = [48, 16, 40, 24]  # TINY_MOE's


def planted_pass():
    """2 sequences x 10 tokens, losses 0..19 (token t has loss t); top-1 routing: the 10 easiest
    tokens go to expert 1 (width 16), the 10 hardest to expert 0 (width 48)."""
    loss_NS = np.arange(20, dtype=np.float64).reshape(2, 10)
    experts = np.where(loss_NS.reshape(-1) < 10, 1, 0)[:, None]
    probs = np.ones((20, 1))
    logits = np.zeros((20, 4))
    return ModelPass(loss_NS, {"1": logits}, {"1": probs}, {"1": experts})


def test_difficulty_by_width_planted_top1():
    result = routing.difficulty_by_width(planted_pass(), WIDTHS)
    assert result["tokens"] == 20 and result["sequences"] == 2 and result["widths"] == [16, 24, 40, 48]
    assert [d["tokens"] for d in result["deciles"]] == [2] * 10
    assert [d["loss_mean"] for d in result["deciles"]] == [0.5 + 2 * b for b in range(10)]
    layer = result["layers"]["1"]
    assert layer["mean_width"] == [16.0] * 5 + [48.0] * 5
    assert layer["mass_by_width"]["16"] == [1.0] * 5 + [0.0] * 5
    assert layer["mass_by_width"]["24"] == [0.0] * 10
    assert layer["hardest_minus_easiest_width"] == 32.0
    # By hand: loss ranks 1..20; width ranks 5.5 (ten ties) then 15.5.
    rank_loss = np.arange(1, 21, dtype=float)
    rank_width = np.array([5.5] * 10 + [15.5] * 10)
    rho = float(np.corrcoef(rank_loss, rank_width)[0, 1])
    assert layer["spearman"]["rho"] == pytest.approx(rho, abs=1e-12)
    assert layer["spearman"]["p_value"] == pytest.approx(t_two_sided_p(rho * math.sqrt(18 / (1 - rho ** 2)), 18))
    # Each sequence holds one half: resampling sequences often gives one constant side (skipped).
    assert result["all_layers"]["mean_width"] == layer["mean_width"]


def test_difficulty_mass_with_top2_probabilities():
    """Top-2 with probabilities 0.75 / 0.25 (a topk_scaling_factor of 2 doubles both: the mass is
    renormalised to 1)."""
    loss_NS = np.array([[3.0, 1.0, 2.0, 0.0]])
    experts = np.array([[0, 1], [1, 2], [3, 0], [2, 3]])
    probs = 2 * np.array([[0.75, 0.25]] * 4)
    p = ModelPass(loss_NS, {"2": np.zeros((4, 4))}, {"2": probs}, {"2": experts})
    result = routing.difficulty_by_width(p, WIDTHS, buckets=4)
    width_T = np.array([0.75 * 48 + 0.25 * 16, 0.75 * 16 + 0.25 * 40, 0.75 * 24 + 0.25 * 48, 0.75 * 40 + 0.25 * 24])
    assert routing.routed_width(p, "2", WIDTHS) == pytest.approx(width_T)
    layer = result["layers"]["2"]
    order = np.argsort(loss_NS.reshape(-1))  # deciles 1..4 = tokens 3, 1, 2, 0
    assert layer["mean_width"] == pytest.approx(width_T[order])
    assert layer["mass_by_width"]["16"] == pytest.approx([0.0, 0.75, 0.0, 0.25])
    for b in range(4):
        assert sum(layer["mass_by_width"][str(w)][b] for w in (16, 24, 40, 48)) == pytest.approx(1.0)


def test_uniform_widths_say_so():
    result = routing.difficulty_by_width(planted_pass(), [64, 64, 64, 64])
    assert result["layers"]["1"]["spearman"]["rho"] is None and "same width" in result["note"]


def test_decile_of_equal_counts():
    bucket = routing.decile_of(np.array([5.0, 1.0, 3.0, 2.0, 4.0]), buckets=5)
    assert bucket.tolist() == [4, 0, 2, 1, 3]
    assert np.bincount(routing.decile_of(np.random.default_rng(0).random(1000))).tolist() == [100] * 10


def test_routing_stability_by_hand():
    a = planted_pass()
    experts_b = a.experts["1"].copy()
    experts_b[[0, 7, 13]] = 3
    b = ModelPass(a.loss_NS, a.logits, a.probs, {"1": experts_b})
    assert routing.routing_stability(a, b) == {"1": {"top1_changed": 3 / 20, "topk_set_changed": 3 / 20, "tokens": 20}}
    top2_a = np.array([[0, 1], [2, 3]])
    top2_b = np.array([[1, 0], [2, 1]])  # same set in another order; then a changed set
    pa = ModelPass(np.zeros((1, 2)), {"1": np.zeros((2, 4))}, {"1": np.ones((2, 2))}, {"1": top2_a})
    pb = ModelPass(np.zeros((1, 2)), {"1": np.zeros((2, 4))}, {"1": np.ones((2, 2))}, {"1": top2_b})
    assert routing.routing_stability(pa, pb)["1"] == {"top1_changed": 0.5, "topk_set_changed": 0.5, "tokens": 2}
    other = ModelPass(a.loss_NS, {"2": a.logits["1"]}, {"2": a.probs["1"]}, {"2": a.experts["1"]})
    with pytest.raises(AnalysisError, match="same architecture"):
        routing.routing_stability(a, other)


def test_router_entropy():
    logits = np.log(np.array([[0.25, 0.25, 0.25, 0.25], [0.7, 0.1, 0.1, 0.1]]))
    p = ModelPass(np.zeros((1, 2)), {"1": logits}, {}, {"1": np.zeros((2, 1), dtype=int)})
    h = -(0.7 * math.log(0.7) + 3 * 0.1 * math.log(0.1))
    out = routing.router_entropy(p, "softmax")["1"]
    assert out["mean_nats"] == pytest.approx((math.log(4) + h) / 2)
    assert out["max_nats"] == pytest.approx(math.log(4)) and out["normalized"] == pytest.approx((math.log(4) + h) / 2 / math.log(4))
    zero = ModelPass(np.zeros((1, 1)), {"1": np.zeros((1, 4))}, {}, {"1": np.zeros((1, 1), dtype=int)})
    assert routing.router_entropy(zero, "sigmoid")["1"]["normalized"] == pytest.approx(1.0)


def test_specialisation_planted():
    """Sequence routing: every token of a sequence goes where the sequence goes; sequences of
    topic 'json' to expert 2, of 'http' to expert 0 -> NMI 1 (shuffled topics score lower)."""
    topics = ["json", "http", "json", "http", "json", "http"]
    n_seq, seq = 6, 3
    expert_of_seq = [2 if t == "json" else 0 for t in topics]
    experts = np.repeat(np.array(expert_of_seq), seq)[:, None]
    p = ModelPass(np.zeros((n_seq, seq)), {"1": np.zeros((n_seq * seq, 4))}, {"1": np.ones((n_seq * seq, 1))},
                  {"1": experts})
    result = routing.specialisation(p, topics, "sequence")
    assert result["unit"] == "sequence" and result["sequences"] == 6 and result["topics"] == 2
    assert result["topic_counts"] == {"http": 3, "json": 3}
    layer = result["layers"]["1"]
    assert layer["nmi"] == pytest.approx(1.0) and layer["nmi_shuffled_mean"] < 1.0
    assert layer["experts"][2] == {"expert": 2, "units": 3, "top_topics": {"json": 1.0},
                                   "common_topics": {"http": 0.0, "json": 1.0}}
    assert layer["experts"][1]["units"] == 0 and layer["experts"][1]["common_topics"] == {"http": 0.0, "json": 0.0}
    tokens = routing.specialisation(p, topics, "token")
    assert tokens["unit"] == "token" and tokens["layers"]["1"]["experts"][0]["units"] == 9
    assert "note" not in result and "note" not in tokens
    one = routing.specialisation(p, ["json"] * 6, "sequence")
    assert one["layers"]["1"]["nmi"] is None and "from one topic" in one["note"]


def test_select_windows():
    lengths = [10, 3, 25, 9]
    # span 4 + 1 = 5: documents 0..3 give 2, 0, 5, 1 windows.
    assert routing.select_windows(lengths, 0, 4, 4, 100) == [(0, 0), (0, 5), (2, 0), (2, 5), (2, 10), (2, 15),
                                                             (2, 20), (3, 0)]
    assert routing.select_windows(lengths, 0, 4, 4, 4) == [(0, 0), (2, 0), (2, 10), (2, 20)]
    assert routing.select_windows(lengths, 1, 2, 4, 10) == []


# ----------------------------------------------------------------------------- a real model
def _tokens(n, s, seed=0, vocab=300):
    return np.random.default_rng(seed).integers(0, vocab, (n, s + 1))


def test_record_routing_sees_what_the_layers_decide():
    config = tiny_config(dict(TINY_MOE, moe_layers=[0, 1]))
    model = random_reference(config, seed=4)
    tokens_BS = torch.from_numpy(_tokens(3, 8)[:, :-1])
    with torch.no_grad():
        plain = model(tokens_BS)
        with model.record_routing() as records:
            recorded = model(tokens_BS)
        assert all(layer.mlp.on_routing is None for layer in model.layers)  # removed after the block
        again = model(tokens_BS)
    assert torch.equal(plain, recorded) and torch.equal(plain, again)
    assert [r.layer for r in records] == [0, 1]
    for r in records:
        assert r.logits_TE.shape == (24, 4) and r.experts_TX.shape == (24, 2)
        probs, experts = topk_routing(r.logits_TE, config.moe, None)
        assert torch.equal(experts, r.experts_TX) and torch.equal(probs, r.probs_TX)
    # The recorded logits are each layer's router applied to what that MoE layer received.
    inputs = {}
    hooks = [layer.mlp.register_forward_pre_hook(lambda m, args, i=i: inputs.__setitem__(i, args[0]))
             for i, layer in enumerate(model.layers)]
    with torch.no_grad():
        model(tokens_BS)
    for hook in hooks:
        hook.remove()
    for r in records:
        expected = model.layers[r.layer].mlp.router_logits(inputs[r.layer]).reshape(24, 4)
        assert torch.equal(expected, r.logits_TE)


def test_run_model_losses_and_batches():
    model = random_reference(tiny_config(TINY_MOE), seed=5)
    tokens = _tokens(5, 6)
    whole = routing.run_model(model, tokens, batch_size=5)
    split = routing.run_model(model, tokens, batch_size=2)
    with torch.no_grad():
        logits = model(torch.from_numpy(tokens[:, :-1]))
    expected = F.cross_entropy(logits.flatten(0, 1), torch.from_numpy(tokens[:, 1:]).flatten(), reduction="none")
    assert whole.loss_NS.shape == (5, 6) and whole.loss_NS.reshape(-1) == pytest.approx(expected.double().numpy(), rel=1e-6)
    assert whole.layers == ["1"] and split.layers == ["1"]
    assert np.array_equal(whole.experts["1"], split.experts["1"])
    assert split.loss_NS == pytest.approx(whole.loss_NS, rel=1e-5)
    counts = routing.routed_counts(whole, 4)["1"]
    assert sum(counts) == 5 * 6 * 2 and counts == np.bincount(whole.experts["1"].reshape(-1), minlength=4).tolist()


def test_run_model_refuses_tokens_outside_the_vocabulary():
    model = random_reference(tiny_config(TINY_MOE), seed=5)
    with pytest.raises(AnalysisError, match="token id 500 but the model's vocabulary has 384 rows"):
        routing.run_model(model, np.full((1, 5), 500))


def planted_router_model():
    """Sigmoid router with zero weights and expert bias [0, 0, 1, 2]: every token chooses experts
    3 and 2 (widths 24, 40), each with the unbiased score 0.5 -> probability 1/2."""
    config = tiny_config(dict(TINY_MOE, moe_layers=[0, 1], score_function="sigmoid", expert_bias=True))
    model = random_reference(config, seed=6)
    with torch.no_grad():
        for layer in model.layers:
            layer.mlp.router_weight.zero_()
            layer.mlp.expert_bias.copy_(torch.tensor([0.0, 0.0, 1.0, 2.0]))
    return model


def test_planted_router_on_a_real_model():
    p = routing.run_model(planted_router_model(), _tokens(4, 10), batch_size=3)
    assert routing.routed_counts(p, 4) == {"1": [0.0, 0.0, 40.0, 40.0], "2": [0.0, 0.0, 40.0, 40.0]}
    result = routing.difficulty_by_width(p, WIDTHS)
    for layer in ("1", "2"):
        assert result["layers"][layer]["mass_by_width"]["24"] == pytest.approx([0.5] * 10)
        assert result["layers"][layer]["mass_by_width"]["40"] == pytest.approx([0.5] * 10)
        assert result["layers"][layer]["mean_width"] == pytest.approx([32.0] * 10)
        assert result["layers"][layer]["spearman"]["rho"] is None  # every token has width 32
    entropy = routing.router_entropy(p, "sigmoid")
    assert entropy["1"]["normalized"] == pytest.approx(1.0)  # sigmoid(0) everywhere
    assert routing.routing_stability(p, p) == {layer: {"top1_changed": 0.0, "topk_set_changed": 0.0, "tokens": 40}
                                               for layer in ("1", "2")}
