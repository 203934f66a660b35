"""Model-based routing analyses on held-out text, with the pure-PyTorch reference model.

The exported model (:class:`~modse_megatron.inference.model.ReferenceGPT`, megatron's logits to
~1e-7) runs N windows of ``seq_length + 1`` tokens, each inside one document (so each has one
source/topic), with :meth:`~ReferenceGPT.record_routing` on. From one pass:

* **difficulty x width** (the MoDSE paper's "harder tokens go to larger experts"): every
  predicted token's loss, its loss decile, and the routing mass it sends to each expert width
  (top-k probabilities renormalised to 1); the routed mean width per decile and Spearman's rho
  between loss and routed mean width, with a t-test p-value (tokens as independent) and a 95%
  interval that resamples whole sequences (they are not independent);
* **router entropy**: mean over tokens of the entropy of the router's distribution over all E
  experts (softmax of the logits; sigmoid scores normalised to sum 1), nats and / ln E;
* **routing stability** between two models on the same tokens: share whose top-1 expert (the
  first choice) changed, and whose set of k experts changed;
* **routed tokens per expert** on this data (for the EP ranks' compute load);
* **specialisation**: for each expert, the topics of what it receives, and the normalised
  mutual information between top-1 expert and topic, next to the same NMI with topics shuffled
  over sequences (NMI is biased upward with few units and many topics; the shuffled value is
  the "no specialisation" level at this sample size). Units: sequences under sequence-level
  routing (the whole sequence goes to the same experts), tokens otherwise.

Layer keys are megatron's 1-based layer numbers as strings, as in ``metrics.jsonl``.

Shape legend: N windows (sequences), S predicted positions per window, T = N*S tokens,
E experts, X top-k choices, V padded vocabulary, W distinct expert widths, K topics.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import AnalysisError
from .stats import bootstrap_spearman, entropy, normalized_mutual_information, spearman

DECILES = 10
SHUFFLES = 20


# ----------------------------------------------------------------------------- data windows
def select_windows(lengths: Sequence[int], first: int, last: int, seq_length: int,
                   max_sequences: int) -> list[tuple[int, int]]:
    """``(document, offset)`` of up to ``max_sequences`` windows of ``seq_length + 1`` tokens
    inside documents ``first..last-1``: all non-overlapping windows, then evenly spaced picks
    (deterministic; coverage proportional to document length)."""
    span = seq_length + 1
    windows = [(d, k * span) for d in range(first, last) for k in range(int(lengths[d]) // span)]
    if len(windows) <= max_sequences:
        return windows
    return [windows[(i * len(windows)) // max_sequences] for i in range(max_sequences)]


def window_tokens(dataset, windows: Sequence[tuple[int, int]], seq_length: int) -> np.ndarray:
    """tokens_N(S+1) int64 of the windows, read from a megatron ``IndexedDataset``."""
    rows = [np.asarray(dataset.get(d, offset=o, length=seq_length + 1), dtype=np.int64) for d, o in windows]
    return np.stack(rows) if rows else np.zeros((0, seq_length + 1), dtype=np.int64)


# ----------------------------------------------------------------------------- one model pass
@dataclass
class ModelPass:
    """Per-token loss and per-MoE-layer routing of one model over tokens_N(S+1)."""

    loss_NS: np.ndarray
    logits: dict[str, np.ndarray]   # layer -> logits_TE (what top-k saw)
    probs: dict[str, np.ndarray]    # layer -> probs_TX
    experts: dict[str, np.ndarray]  # layer -> experts_TX

    @property
    def layers(self) -> list[str]:
        return list(self.experts)


@torch.no_grad()
def run_model(model, tokens_NS1: np.ndarray, batch_size: int = 8) -> ModelPass:
    """Run ``model`` (a ReferenceGPT) on the windows: inputs ``[:, :-1]``, labels ``[:, 1:]``,
    loss over the full padded vocabulary (as megatron's cross-entropy)."""
    vocab = model.config.padded_vocab_size
    if tokens_NS1.size and (tokens_NS1.max() >= vocab or tokens_NS1.min() < 0):
        raise AnalysisError(f"the data has token id {int(tokens_NS1.max())} but the model's vocabulary has {vocab} "
                            f"rows: analyse the data the model was trained on (--data/--tokenizer)")
    losses, records = [], []
    for start in range(0, len(tokens_NS1), batch_size):
        batch_BS1 = torch.from_numpy(tokens_NS1[start:start + batch_size])
        with model.record_routing() as routing:
            logits_BSV = model(batch_BS1[:, :-1])
        loss_BS = F.cross_entropy(logits_BSV.flatten(0, 1), batch_BS1[:, 1:].flatten(), reduction="none")
        losses.append(loss_BS.view(batch_BS1.shape[0], -1).double().numpy())
        records.append(routing)
    logits, probs, experts = {}, {}, {}
    for per_batch in zip(*records) if records else ():
        layer = str(per_batch[0].layer + 1)
        logits[layer] = torch.cat([r.logits_TE for r in per_batch]).float().numpy()
        probs[layer] = torch.cat([r.probs_TX for r in per_batch]).double().numpy()
        experts[layer] = torch.cat([r.experts_TX for r in per_batch]).numpy()
    return ModelPass(np.concatenate(losses) if losses else np.zeros((0, 0)), logits, probs, experts)


def _mass(probs_TX: np.ndarray) -> np.ndarray:
    """Top-k probabilities renormalised to sum 1 per token (topk_scaling_factor, sigmoid
    scores and pre-softmax top-k do not sum to 1 otherwise)."""
    total_T1 = probs_TX.sum(axis=1, keepdims=True)
    return probs_TX / np.where(total_T1 > 0, total_T1, 1.0)


def routed_width(p: ModelPass, layer: str, widths: Sequence[int]) -> np.ndarray:
    """width_T: each token's probability-weighted mean width of its chosen experts."""
    return (_mass(p.probs[layer]) * np.asarray(widths, dtype=np.float64)[p.experts[layer]]).sum(axis=1)


# ----------------------------------------------------------------------------- analyses
def decile_of(loss_T: np.ndarray, buckets: int = DECILES) -> np.ndarray:
    """Equal-count loss buckets 0 (easiest) .. buckets-1 (hardest), by rank (ties by order)."""
    order = np.argsort(loss_T, kind="stable")
    bucket_T = np.empty(len(loss_T), dtype=np.int64)
    bucket_T[order] = (np.arange(len(loss_T)) * buckets) // max(len(loss_T), 1)
    return bucket_T


def difficulty_by_width(p: ModelPass, widths: Sequence[int], buckets: int = DECILES) -> dict[str, Any]:
    """Loss deciles x routing mass per expert width, per layer and for the mean over layers."""
    loss_T = p.loss_NS.reshape(-1)
    n_seq, seq = p.loss_NS.shape
    seq_T = np.repeat(np.arange(n_seq), seq)
    bucket_T = decile_of(loss_T, buckets)
    distinct = sorted(set(widths))
    width_E = np.asarray(widths)
    deciles = [{"decile": b + 1, "tokens": int((bucket_T == b).sum()),
                "loss_mean": float(loss_T[bucket_T == b].mean()), "loss_min": float(loss_T[bucket_T == b].min()),
                "loss_max": float(loss_T[bucket_T == b].max())} for b in range(buckets) if (bucket_T == b).any()]
    present = [b for b in range(buckets) if (bucket_T == b).any()]

    def summary(width_T: np.ndarray, mass_TW: np.ndarray) -> dict[str, Any]:
        out: dict[str, Any] = {"mass_by_width": {str(w): [float(mass_TW[bucket_T == b, i].mean()) for b in present]
                                                 for i, w in enumerate(distinct)}}
        out["mean_width"] = [float(width_T[bucket_T == b].mean()) for b in present]
        out["hardest_minus_easiest_width"] = out["mean_width"][-1] - out["mean_width"][0]
        out["spearman"] = spearman(loss_T, width_T)
        out["spearman"]["ci95_by_sequence"] = bootstrap_spearman(loss_T, width_T, seq_T)
        return out

    layers: dict[str, Any] = {}
    widths_LT, mass_LTW = [], []
    for layer in p.layers:
        mass_TX, experts_TX = _mass(p.probs[layer]), p.experts[layer]
        mass_TW = np.stack([(mass_TX * (width_E[experts_TX] == w)).sum(axis=1) for w in distinct], axis=1)
        width_T = mass_TW @ np.asarray(distinct, dtype=np.float64)
        widths_LT.append(width_T)
        mass_LTW.append(mass_TW)
        layers[layer] = summary(width_T, mass_TW)
    result = {"tokens": int(len(loss_T)), "sequences": int(n_seq), "widths": distinct, "deciles": deciles,
              "layers": layers}
    if widths_LT:
        result["all_layers"] = summary(np.mean(widths_LT, axis=0), np.mean(mass_LTW, axis=0))
    if len(distinct) == 1:
        result["note"] = "every expert has the same width: no width preference to measure (rho is undefined)"
    return result


def router_entropy(p: ModelPass, score_function: str) -> dict[str, Any]:
    """Mean entropy of the router's distribution over all experts, per layer."""
    out = {}
    for layer, logits_TE in p.logits.items():
        logits_TE = logits_TE.astype(np.float64)
        if score_function == "sigmoid":
            scores_TE = 1.0 / (1.0 + np.exp(-logits_TE))
            dist_TE = scores_TE / scores_TE.sum(axis=1, keepdims=True)
        else:
            shifted_TE = np.exp(logits_TE - logits_TE.max(axis=1, keepdims=True))
            dist_TE = shifted_TE / shifted_TE.sum(axis=1, keepdims=True)
        h_T = entropy(dist_TE, axis=1)
        num_experts = logits_TE.shape[1]
        out[layer] = {"mean_nats": float(h_T.mean()), "max_nats": float(np.log(num_experts)),
                      "normalized": float(h_T.mean() / np.log(num_experts)) if num_experts > 1 else 0.0}
    return out


def routing_stability(a: ModelPass, b: ModelPass) -> dict[str, Any]:
    """Share of tokens whose top-1 expert / set of top-k experts differs between two passes
    over the same tokens."""
    if a.layers != b.layers:
        raise AnalysisError(f"--checkpoint-b has MoE layers {b.layers}, the model {a.layers}: compare checkpoints "
                            f"of the same architecture")
    out = {}
    for layer in a.layers:
        ea, eb = a.experts[layer], b.experts[layer]
        if ea.shape != eb.shape or a.logits[layer].shape[1] != b.logits[layer].shape[1]:
            raise AnalysisError(f"--checkpoint-b routes layer {layer} over {b.logits[layer].shape[1]} experts with "
                                f"top-{eb.shape[1]}, the model over {a.logits[layer].shape[1]} with top-{ea.shape[1]}: "
                                f"compare checkpoints of the same architecture")
        top1 = float((ea[:, 0] != eb[:, 0]).mean()) if len(ea) else 0.0
        sets = float((np.sort(ea, axis=1) != np.sort(eb, axis=1)).any(axis=1).mean()) if len(ea) else 0.0
        out[layer] = {"top1_changed": top1, "topk_set_changed": sets, "tokens": int(len(ea))}
    return out


def routed_counts(p: ModelPass, num_experts: int) -> dict[str, list[float]]:
    """Top-k assignments per logical expert on this data, per layer (like metrics' counts)."""
    return {layer: np.bincount(e.reshape(-1), minlength=num_experts).astype(float).tolist()
            for layer, e in p.experts.items()}


def specialisation(p: ModelPass, topics_N: Sequence[str], granularity: str, top: int = 5,
                   seed: int = 0, common: int = 12) -> dict[str, Any]:
    """Experts x topics: what each expert receives (its ``top`` topics, and its share of each of
    the ``common`` most frequent topics: the heat map), and NMI(top-1 expert, topic) vs shuffled."""
    topics_N = np.asarray(topics_N)
    n_seq, seq = p.loss_NS.shape
    by_sequence = granularity == "sequence"
    rng = np.random.default_rng(seed)
    shuffles = [rng.permutation(n_seq) for _ in range(SHUFFLES)]
    frequent = list(_counts(topics_N))[:common]
    layers = {}
    for layer in p.layers:
        experts_NSX = p.experts[layer].reshape(n_seq, seq, -1)
        # Under sequence routing every token of a window has the window's experts: one unit each.
        experts_UX = experts_NSX[:, 0] if by_sequence else experts_NSX.reshape(n_seq * seq, -1)
        unit_seq_U = np.arange(n_seq) if by_sequence else np.repeat(np.arange(n_seq), seq)
        topics_U = topics_N[unit_seq_U]
        experts = []
        for e in range(p.logits[layer].shape[1]):
            received_U = (experts_UX == e).any(axis=1)
            names, counts = np.unique(topics_U[received_U], return_counts=True)
            order = np.argsort(-counts, kind="stable")[:top]
            total = int(received_U.sum())
            share = dict(zip(names.tolist(), (counts / max(total, 1)).tolist()))
            experts.append({"expert": e, "units": total,
                            "top_topics": {str(names[i]): float(counts[i] / total) for i in order},
                            "common_topics": {t: float(share.get(t, 0.0)) for t in frequent}})
        if len(set(topics_N.tolist())) < 2:  # NMI would be 0 by construction, not by measurement
            nmi, null = None, []
        else:
            nmi = normalized_mutual_information(experts_UX[:, 0], topics_U)
            null = [normalized_mutual_information(experts_UX[:, 0], topics_N[perm][unit_seq_U]) for perm in shuffles]
            null = [v for v in null if v is not None]
        layers[layer] = {"nmi": nmi, "nmi_shuffled_mean": float(np.mean(null)) if null else None,
                         "nmi_shuffled_p95": float(np.percentile(null, 95)) if null else None, "experts": experts}
    result = {"unit": "sequence" if by_sequence else "token", "sequences": int(n_seq),
              "topics": int(len(set(topics_N.tolist()))), "topic_counts": _counts(topics_N), "layers": layers}
    if result["topics"] < 2:
        result["note"] = ("the analysed sequences come from one topic, so specialisation cannot be measured: analyse "
                          "more documents (--split all, or more --max-sequences)")
    return result


def _counts(labels: np.ndarray) -> dict[str, int]:
    names, counts = np.unique(labels, return_counts=True)
    order = np.argsort(-counts, kind="stable")
    return {str(names[i]): int(counts[i]) for i in order}
