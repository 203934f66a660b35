"""The training loop: deterministic DP-sharded batches, megatron's pipeline schedules, metrics,
evaluation, checkpoints and clean stops (``--exit-interval``, SIGTERM).

Batches are a pure function of (dataset, consumed samples): global step ``i`` uses samples
``[i*G, (i+1)*G)``; micro-batch ``m`` of DP rank ``d`` is the slice starting at
``i*G + (m*D + d)*B``. So any layout with the same global batch sees the same samples per
step, and a resumed run continues exactly where it stopped.
"""
from __future__ import annotations

import math
import signal
from dataclasses import dataclass
from functools import partial
from typing import Any, Iterator

import torch
import torch.distributed as dist

from modse_megatron.training.arguments import PretrainArgs
from modse_megatron.training.expert_time import ExpertTimer
from modse_megatron.training.metrics import MetricsWriter, Throughput

_BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


class NonFiniteError(RuntimeError):
    """The loss or the gradients became NaN/Inf more often than allowed; one line naming the
    iteration, the last good checkpoint and the usual fixes."""


@dataclass
class TrainState:
    iteration: int = 0
    consumed_samples: int = 0
    skipped_nonfinite: int = 0  # updates skipped because of NaN/Inf loss or gradients


def micro_batches(dataset, start: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                  num_microbatches: int) -> Iterator[dict[str, torch.Tensor]]:
    """The micro-batches of one global batch for this DP rank (see module docstring)."""
    for m in range(num_microbatches):
        first = start + (m * dp_size + dp_rank) * micro_batch_size
        items = [dataset[first + j] for j in range(micro_batch_size)]
        yield {k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in _BATCH_KEYS}


def _loss_func(loss_mask: torch.Tensor, output: torch.Tensor):
    """Masked mean of the per-token losses of one micro-batch (megatron's 2-tuple contract)."""
    mask = loss_mask.reshape(-1).float()
    loss = (output.float().reshape(-1) * mask).sum() / mask.sum().clamp_min(1.0)
    # clone: megatron divides the returned loss in place by the micro-batch count.
    return loss, {"lm_loss": loss.detach().clone()}


def _forward_step(data_iterator, model, poison: bool = False):
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    if poison:  # --debug-nonfinite-at: a NaN that flows through backward like a real blow-up
        output = output * float("nan")
    return output, partial(_loss_func, batch["loss_mask"])


def collective_device() -> torch.device:
    """Where a small tensor for a world collective must live: NCCL takes CUDA tensors only."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _reported_mean(values: list[dict[str, torch.Tensor]], key: str) -> float:
    """Mean of ``key`` over micro-batches and DP replicas, known on every rank.

    Only the last pipeline stage has losses; TP ranks hold copies. Each reporting rank
    (last stage, TP rank 0) adds its value and a count of one; one all-reduce gives all ranks
    the DP mean.
    """
    from megatron.core import parallel_state as ps

    reporter = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
    device = collective_device()
    local = torch.stack([v[key] for v in values]).float().mean().to(device) if (reporter and values) else \
        torch.zeros((), device=device)
    pair = torch.stack([local * float(reporter), torch.tensor(float(reporter), device=device)])
    dist.all_reduce(pair)
    return float(pair[0] / pair[1].clamp_min(1.0))


class Trainer:
    """Owns the model, optimizer, data and logging of one run."""

    def __init__(self, args: PretrainArgs, layout: dict[str, int], config, ddp, optimizer, scheduler,
                 datasets: tuple, metrics: MetricsWriter, state: TrainState, heartbeat=None, watch=None,
                 replanner=None):
        from megatron.core import parallel_state as ps
        from megatron.core.pipeline_parallel import get_forward_backward_func

        self.args, self.layout, self.config = args, layout, config
        self.ddp, self.optimizer, self.scheduler = ddp, optimizer, scheduler
        self.train_ds, self.valid_ds, self.test_ds = datasets
        self.metrics, self.state = metrics, state
        self.dp_rank, self.dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        self.forward_backward = get_forward_backward_func()
        self._stop_requested = False
        self.eval_batches_done = 0
        self.routers = [m for m in ddp.module.modules() if hasattr(m, "routing_stats")]
        self.expert_timer = ExpertTimer(ddp.module) if config.num_moe_experts else None
        self.heartbeat = heartbeat or (lambda: None)  # refreshes the --save lock
        self.watch = watch  # names the phase in errors about ranks that stop answering
        self.last_checkpoint: str | None = None
        self._poison = set(args.run.debug_nonfinite_at or ())
        self.replanner = replanner  # --moe-replan-interval: load statistics and live migration

    def swap(self, ddp, optimizer, scheduler) -> None:
        """Continue with a rebuilt model/optimizer (a placement migration)."""
        self.ddp, self.optimizer, self.scheduler = ddp, optimizer, scheduler
        self.routers = [m for m in ddp.module.modules() if hasattr(m, "routing_stats")]
        if self.expert_timer is not None:
            self.expert_timer.attach(ddp.module)

    # ------------------------------------------------------------------ one step
    def _run_schedule(self, dataset, start: int, forward_only: bool, poison: bool = False) -> list[dict[str, torch.Tensor]]:
        a = self.args
        data = micro_batches(dataset, start, a.optim.micro_batch_size, self.dp_rank, self.dp_size,
                             self.layout["num_microbatches"])
        return self.forward_backward(
            forward_step_func=partial(_forward_step, poison=poison) if poison else _forward_step,
            data_iterator=data,
            model=[self.ddp],
            num_microbatches=self.layout["num_microbatches"],
            seq_length=a.model.seq_length,
            micro_batch_size=a.optim.micro_batch_size,
            forward_only=forward_only,
        )

    def train_step(self) -> dict[str, Any]:
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        for router in self.routers:
            router.reset_routing_stats()
        if self.expert_timer is not None:
            self.expert_timer.take()  # this step only (not an evaluation's forward passes)
        poison = self.state.iteration + 1 in self._poison
        losses = self._run_schedule(self.train_ds, self.state.consumed_samples, forward_only=False, poison=poison)
        lm_loss = _reported_mean(losses, "lm_loss")
        finite = self._all_finite(lm_loss)
        if finite:
            ok, grad_norm, _ = self.optimizer.step()
        else:  # never apply a NaN/Inf update; the batch counts as consumed
            ok, grad_norm = False, None
            self._count_nonfinite(lm_loss)
        if ok:
            self.scheduler.step(increment=1)
        gbs = self.layout["global_batch_size"]
        self.state.iteration += 1
        self.state.consumed_samples += gbs
        record: dict[str, Any] = {
            "iteration": self.state.iteration,
            "lm_loss": lm_loss if math.isfinite(lm_loss) else None,  # JSON has no NaN
            "lr": self.optimizer.param_groups[0]["lr"],
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "skipped": not ok,
            "skipped_nonfinite": self.state.skipped_nonfinite,
        }
        if self.config.num_moe_experts:
            record.update(self._moe_metrics())
        return record

    # ------------------------------------------------------------------ non-finite values
    def _grad_buffers(self) -> list[torch.Tensor]:
        return [b.grad_data for b in self.ddp.buffers + self.ddp.expert_parallel_buffers]

    def _all_finite(self, lm_loss: float) -> bool:
        """Loss and every gradient finite on every rank (one all-reduce; all ranks agree).
        Gradients are checked after megatron's reduction, so a NaN on any rank shows here."""
        grads = self._grad_buffers()
        bad = not math.isfinite(lm_loss) or any(not bool(torch.isfinite(g).all()) for g in grads)
        flag = torch.tensor([1.0 if bad else 0.0], device=grads[0].device if grads else None)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return not bool(flag.item())

    def _count_nonfinite(self, lm_loss: float) -> None:
        self.state.skipped_nonfinite += 1
        allowed = self.args.optim.skip_nonfinite_steps
        iteration = self.state.iteration + 1
        if self.state.skipped_nonfinite <= allowed:
            self.metrics.message(f"iteration {iteration}: non-finite loss or gradients (loss {lm_loss}), update skipped "
                                 f"({self.state.skipped_nonfinite} of --skip-nonfinite-steps {allowed})")
            return
        where = f"the last good checkpoint is {self.last_checkpoint} (resume with --load)" if self.last_checkpoint \
            else "no checkpoint was saved yet"
        raise NonFiniteError(
            f"non-finite loss or gradients at iteration {iteration} (loss {lm_loss}); {where}: lower --lr or raise "
            f"--lr-warmup-iters, keep --clip-grad > 0, check the data, or skip such steps with --skip-nonfinite-steps N")

    def check_finite_parameters(self) -> None:
        """Refuse to go on (and so to save) with NaN/Inf weights on any rank."""
        params = list(self.ddp.module.parameters())
        bad = any(not bool(torch.isfinite(p).all()) for p in params)
        flag = torch.tensor([1.0 if bad else 0.0], device=params[0].device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item():
            raise NonFiniteError(f"the weights hold NaN/Inf at iteration {self.state.iteration}: not saving them; resume "
                                 f"from {self.last_checkpoint or 'an earlier checkpoint'} with a lower --lr")

    def _moe_metrics(self) -> dict[str, Any]:
        """Aux/z losses (mean over MoE layers) and tokens routed to every logical expert."""
        from megatron.core import parallel_state as ps
        from megatron.core.transformer.moe.moe_utils import (
            clear_aux_losses_tracker,
            get_moe_layer_wise_logging_tracker,
            reduce_aux_losses_tracker_across_ranks,
        )

        out: dict[str, Any] = {}
        reduce_aux_losses_tracker_across_ranks()
        for name, entry in sorted(get_moe_layer_wise_logging_tracker().items()):
            values = entry["values"].float() / self.layout["num_microbatches"]
            nonzero = values[values != 0]
            out[name] = float(nonzero.mean()) if nonzero.numel() else 0.0
        clear_aux_losses_tracker()
        if self.routers:
            # [num_layers, num_experts]: each stage fills its own layers; TP ranks hold copies.
            counts = torch.zeros(self.config.num_layers, self.config.num_moe_experts, dtype=torch.float64)
            for router in self.routers:
                counts[router.layer_number - 1] = router.routing_stats.double().cpu()
            if ps.get_tensor_model_parallel_rank() != 0:
                counts.zero_()
            counts = counts.to(collective_device())
            dist.all_reduce(counts)
            counts = counts.cpu()
            out["tokens_per_expert"] = {
                str(layer + 1): [int(c) for c in row] for layer, row in enumerate(counts.tolist()) if any(row)
            }
        if self.expert_timer is not None:  # every rank's seconds in its experts' forward (world rank order)
            mine = torch.tensor([self.expert_timer.take()], dtype=torch.float64, device=collective_device())
            every = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
            dist.all_gather(every, mine)
            out["expert_seconds_per_rank"] = [round(float(t), 6) for t in every]
        return out

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, split: str) -> float:
        dataset = self.valid_ds if split == "valid" else self.test_ds
        gbs = self.layout["global_batch_size"]
        # Each evaluation reads the next eval_iters global batches of its split (wrapping).
        span = max(len(dataset) // gbs, 1)
        self.ddp.eval()
        losses = []
        with torch.no_grad():
            for k in range(self.args.run.eval_iters):
                start = ((self.eval_batches_done + k) % span) * gbs
                losses.append(_reported_mean(self._run_schedule(dataset, start, forward_only=True), "lm_loss"))
        self.eval_batches_done += self.args.run.eval_iters
        self.ddp.train()
        loss = sum(losses) / len(losses)
        self.metrics.evaluation(self.state.iteration, split, loss)
        return loss

    # ------------------------------------------------------------------ the loop
    def _install_sigterm(self) -> None:
        def request_stop(signum, frame):
            self._stop_requested = True
            if self.watch is not None:  # torchrun tears the job down: no waiting for stragglers
                self.watch.cancelled = True

        signal.signal(signal.SIGTERM, request_stop)

    def _agreed_stop(self) -> bool:
        """All ranks stop together when any rank got SIGTERM (no rank left in a collective)."""
        flag = torch.tensor([1.0 if self._stop_requested else 0.0], device=collective_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def train(self, save_fn) -> str:
        """Run to --train-iters (or an exit condition); returns why it stopped."""
        a = self.args
        self._install_sigterm()
        tokens_per_step = self.layout["global_batch_size"] * a.model.seq_length
        timer = Throughput()
        reason = "finished"
        while self.state.iteration < a.optim.train_iters:
            self.heartbeat()
            if self.watch is not None:
                self.watch.where = f"iteration {self.state.iteration + 1}"
            record = self.train_step()
            if self.replanner is not None:
                self.replanner.observe(record)
            tps, dt = timer.lap(tokens_per_step)
            record["tokens_per_sec"], record["step_time_s"] = tps, dt
            it = self.state.iteration
            if it % a.run.log_interval == 0 or it == a.optim.train_iters:
                self.metrics.train(record)
            self.metrics.advance()
            if it % a.run.eval_interval == 0 and it < a.optim.train_iters:
                self.evaluate("valid")
            if self.replanner is not None and it < a.optim.train_iters:
                self.replanner.maybe_replan(it)
            if a.run.save and a.run.save_interval and it % a.run.save_interval == 0 and it < a.optim.train_iters:
                save_fn(self)
            if a.run.exit_interval and it >= a.run.exit_interval:
                reason = f"exit interval {a.run.exit_interval} reached"
                break
            if self._agreed_stop():
                reason = "SIGTERM"
                break
            timer = Throughput()  # evaluation and saving are not training throughput
        return reason
