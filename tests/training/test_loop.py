"""Training-loop pieces that need no model: which samples each rank's micro-batches hold, the
masked loss, the reported mean, and the checkpoint tracker.

Whole training runs (losses equal across layouts, resume, SIGTERM) are in test_pretrain.py.
"""
import pytest
import torch

from modse_megatron.training.loop import _loss_func, _reported_mean, micro_batches

SEQ = 4


class _Samples:
    """A dataset whose sample ``i`` holds ``i`` in every position (so batches name their samples)."""

    def __getitem__(self, i):
        return {"tokens": torch.full((SEQ,), i), "labels": torch.full((SEQ,), i + 1),
                "loss_mask": torch.ones(SEQ), "position_ids": torch.arange(SEQ)}


def _sample_ids(batch):
    return batch["tokens"][:, 0].tolist()


@pytest.mark.parametrize("dp, mbs, num_micro", [(1, 8, 1), (1, 2, 4), (2, 2, 2), (4, 1, 2), (2, 4, 1)])
def test_every_layout_sees_the_same_samples_per_step(dp, mbs, num_micro):
    """Global batch 8 at step 3 (consumed 24): samples 24..31, split over DP ranks and
    micro-batches without overlap, whatever the layout."""
    assert dp * mbs * num_micro == 8
    per_rank = {}
    for rank in range(dp):
        batches = list(micro_batches(_Samples(), 24, mbs, rank, dp, num_micro))
        assert len(batches) == num_micro
        assert all(b["tokens"].shape == (mbs, SEQ) and b["tokens"].dtype == torch.int64 for b in batches)
        assert set(batches[0]) == {"tokens", "labels", "loss_mask", "position_ids"}
        per_rank[rank] = [i for b in batches for i in _sample_ids(b)]
    everything = sorted(i for ids in per_rank.values() for i in ids)
    assert everything == list(range(24, 32))
    # micro-batch m of rank d starts at start + (m*D + d)*B
    assert per_rank[dp - 1][:mbs] == list(range(24 + (dp - 1) * mbs, 24 + dp * mbs))


def test_loss_is_the_masked_mean_and_a_copy_is_reported():
    losses = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, 6.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]])
    loss, reported = _loss_func(mask, losses)
    assert loss.item() == pytest.approx(3.5)  # the masked positions do not count
    loss /= 2  # megatron divides the returned loss in place by the micro-batch count
    assert reported["lm_loss"].item() == pytest.approx(3.5)
    empty, _ = _loss_func(torch.zeros(2, 4), losses)
    assert empty.item() == 0.0  # an all-masked micro-batch: zero, not NaN


def test_reported_mean_over_micro_batches(one_rank):
    values = [{"lm_loss": torch.tensor(v)} for v in (2.0, 3.0, 7.0)]
    assert _reported_mean(values, "lm_loss") == pytest.approx(4.0)
    assert _reported_mean([], "lm_loss") == 0.0


def test_checkpoint_tracker(tmp_path):
    from modse_megatron.checkpoint.errors import CheckpointError
    from modse_megatron.training.checkpointing import TRACKER, iteration_dir, latest_iteration

    assert latest_iteration(str(tmp_path)) is None  # no checkpoint yet
    (tmp_path / TRACKER).write_text("12\n")
    assert latest_iteration(str(tmp_path)) == 12
    assert iteration_dir(str(tmp_path), 12) == tmp_path / "iter_0000012"
    (tmp_path / TRACKER).write_text("twelve")
    with pytest.raises(CheckpointError) as err:
        latest_iteration(str(tmp_path))
    assert str(err.value) == (f"{tmp_path / TRACKER} is corrupt ('twelve'): restore it or point --load at "
                              f"another directory")
