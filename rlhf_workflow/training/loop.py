"""The one training loop, shared by SFT, the reward model, the preference model and DPO.

Stages differ only in how rows of examples become a batch (``TrainData.collate``) and how a
batch becomes a loss (an :data:`Objective`). Everything else lives here, once:

- the global batch is a setting (``train.global_batch_size``); accumulation is derived from
  the world size and the micro-batch, so a recipe means the same on 1 GPU and on 64;
- accumulation normalised by the number of loss items (tokens or pairs) in the *whole*
  optimizer step across all micro-batches and ranks, so 8 x 1 and 2 x 4 give the same update;
- AdamW with a warmup + cosine/linear/constant schedule, clipping, bf16 compute on fp32
  weights, and the distribution strategy (one process, DDP, FSDP2, ZeRO-2/3) of
  :mod:`.engine`;
- a seeded data order that depends only on (seed, epoch); every item is trained on whatever
  the world size, and every rank runs the same number of micro-batches in every step (a rank
  left short in a step's last round repeats one of its micro-batches at zero weight), so
  collectives never wait on a rank that has nothing to do and 2 ranks compute 1 rank's update;
- checkpoints (sharded; by steps and by wall-clock minutes), resume only under the settings
  the run started with, metrics.jsonl, trackers, and the final Hugging Face export.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import threading
import time
from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path

import torch
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler

from ..config import Config, OptimConfig, TrainConfig, flatten
from ..data.batching import plan_batches
from ..distributed import all_sum, barrier, to_device
from ..errors import UserError
from ..io import write_json
from .checkpoints import checkpoints, resume, save_checkpoint, truncate_metrics
from .engine import engine_for, reshard
from .flops import matmul_params, measured_peak, step_flops


@dataclass
class StepOutput:
    """What an objective returns for one micro-batch: summed loss and summed metrics."""

    loss_sum: torch.Tensor
    metric_sums: dict[str, torch.Tensor | float]


Objective = Callable[[torch.nn.Module, dict], StepOutput]


@dataclass
class TrainData:
    """The training examples as the loop sees them.

    ``lengths[i]`` is the token count of example i; ``collate(rows)`` turns rows of example
    indices into a batch dict holding tensors plus ``num_items`` (loss items: tokens or
    pairs) and ``num_tokens`` (tokens processed, for throughput).
    """

    lengths: list[int]
    collate: Callable[[list[list[int]]], dict]
    pack_length: int = 0
    by_tokens: bool = False  # whether the stage takes micro-batches by tokens (train.micro_batch_tokens)


# --------------------------------------------------------------------------- batch plan


def batch_sizes(global_batch: int, micro: int, world: int) -> tuple[int, int]:
    """(micro-batch size, accumulation steps) per rank for a global batch over ``world`` ranks."""
    if global_batch % world:
        raise UserError(f"train.global_batch_size={global_batch} is not divisible by the {world} "
                        "processes")
    per_rank = global_batch // world
    micro = min(micro, per_rank)
    if per_rank % micro:
        raise UserError(f"train.micro_batch_size={micro} does not divide the {per_rank} examples each "
                        f"of {world} process(es) takes per step (global batch {global_batch})")
    return micro, per_rank // micro


class StepPlan:
    """Which micro-batches make each optimizer step, epoch by epoch.

    A step holds ``accum * world`` consecutive micro-batches of the epoch's plan (fewer in an
    epoch's last step). They are dealt to the ranks in rounds of ``world``, alternately from
    rank 0 up and from the last rank down: length-grouped micro-batches come longest first,
    and this way no rank takes the longest of every round. A rank left without one in the
    last round gets a *filler*: a copy of a micro-batch of the step, run at zero weight, so
    every rank runs the same number of forward passes and no item is dropped. Packing gives
    each epoch its own number of rows, so every epoch is counted.

    With ``train.micro_batch_tokens``, a step's examples (the same as without it) are shared out
    over the ranks balanced by tokens, and each rank cuts its share into micro-batches of at most
    that many tokens, one row each (:func:`by_tokens`); a rank with fewer than the most gets
    fillers.
    """

    def __init__(self, data: TrainData, cfg: TrainConfig, micro: int, accum: int, world: int):
        self.data, self.cfg, self.micro, self.accum, self.world = data, cfg, micro, accum, world
        self.tokens = cfg.micro_batch_tokens
        if self.tokens and not data.by_tokens:
            raise UserError("train.micro_batch_tokens is for the pair stages (DPO, reward and preference "
                            "models); SFT packs rows of data.max_length tokens")
        # the epoch's plan: step_size micro-batches a step; by tokens, one entry holds a whole step
        self._micro, self.step_size = (micro * accum * world, 1) if self.tokens else (micro, accum * world)
        full = math.floor(cfg.epochs)
        sizes = [len(self.plan(e)) for e in range(math.ceil(cfg.epochs))]
        counts = [math.ceil(n / self.step_size) for n in sizes]
        if full < len(counts):  # a fractional last epoch
            counts[-1] = math.ceil((cfg.epochs - full) * counts[-1])
        if not all(counts):
            raise UserError("no examples to train on")
        self.sizes, self.ends = sizes, list(accumulate(counts))
        self.total = cfg.max_steps or self.ends[-1]
        self._cached: tuple[int, list] | None = None

    def plan(self, epoch: int) -> list:
        return plan_batches(self.data.lengths, self._micro, self.step_size, self.cfg.seed, epoch,
                            self.cfg.group_by_length, self.data.pack_length)

    def micro_batches(self, step: int, rank: int) -> tuple[float, list, int]:
        """(epoch position after this step, this rank's micro-batches of optimizer step ``step``,
        how many of them are real: the rest are fillers)."""
        cycle = step // self.ends[-1]  # max_steps beyond the epochs set: go round again
        e = bisect_right(self.ends, step % self.ends[-1])
        k = step % self.ends[-1] - (self.ends[e - 1] if e else 0)
        epoch = cycle * len(self.ends) + e
        if self._cached is None or self._cached[0] != epoch:
            self._cached = (epoch, self.plan(epoch))
        lo, hi = k * self.step_size, min((k + 1) * self.step_size, self.sizes[e])
        steps_in_epoch = self.ends[e] - (self.ends[e - 1] if e else 0)
        return (epoch + (k + 1) / steps_in_epoch, *self._dealt(self._cached[1][lo:hi], rank))

    def _dealt(self, batches: list, rank: int) -> tuple[list, int]:
        """(this rank's micro-batches of a step, fillers last; how many are real)."""
        if self.tokens:
            shares = by_tokens([i for mb in batches for row in mb for i in row], self.data.lengths, self.tokens,
                               self.world)
            rounds = max(len(share) for share in shares)
            mine = shares[rank] or [shares[0][-1]]  # (a rank with no example at all repeats one at zero weight)
            return mine + [mine[-1]] * (rounds - len(mine)), len(shares[rank])
        mine = [batches[i] for i in deal(len(batches), self.world)[rank]]
        rounds = math.ceil(len(batches) / self.world)
        return mine + [batches[-1]] * (rounds - len(mine)), len(mine)

    def first_epoch(self, rank: int) -> list[tuple[list, int]]:
        """This rank's micro-batches of every step of the first epoch, as :func:`train` runs
        them (whatever ``max_steps`` says): every example is in one real micro-batch of one
        rank. The reference pass computes on exactly these batches."""
        plan = self.plan(0)
        return [self._dealt(plan[lo : lo + self.step_size], rank) for lo in range(0, len(plan), self.step_size)]


def step_plan(data: TrainData, cfg: TrainConfig, world: int) -> StepPlan:
    """The plan :func:`train` follows on ``world`` ranks."""
    micro = cfg.global_batch_size // world if cfg.micro_batch_tokens else cfg.micro_batch_size
    return StepPlan(data, cfg, *batch_sizes(cfg.global_batch_size, micro, world), world)


def by_tokens(items: list[int], lengths: list[int], budget: int, world: int) -> list[list[list[list[int]]]]:
    """Each rank's micro-batches (each one row of examples) for one step's ``items``.

    The examples go longest first to the rank with the fewest tokens so far (ties: the lowest
    rank), so the ranks' shares differ by at most one example's length; each share is then
    packed first-fit, longest first, into micro-batches of at most ``budget`` tokens (an
    example longer than that alone). Depends on the items and lengths only."""
    shares: list[list[int]] = [[] for _ in range(world)]
    load = [0] * world
    ordered = sorted(items, key=lambda i: (-lengths[i], i))
    for i in ordered:
        r = min(range(world), key=lambda k: (load[k], k))
        shares[r].append(i)
        load[r] += lengths[i]
    out = []
    for share in shares:
        rows: list[list[int]] = []
        room: list[int] = []
        for i in share:
            j = next((j for j, free in enumerate(room) if free >= lengths[i]), None)
            if j is None:
                rows.append([i])
                room.append(budget - lengths[i])
            else:
                rows[j].append(i)
                room[j] -= lengths[i]
        out.append([[row] for row in rows])
    return out


def deal(n: int, world: int) -> list[list[int]]:
    """Indices of n micro-batches per rank: round r of ``world`` goes to ranks 0, 1, ... when r
    is even and to ranks world - 1, world - 2, ... when it is odd."""
    ranks: list[list[int]] = [[] for _ in range(world)]
    for i in range(n):
        r, j = divmod(i, world)
        ranks[j if r % 2 == 0 else world - 1 - j].append(i)
    return ranks


# --------------------------------------------------------------------------- the loop


def train(
    model: torch.nn.Module,
    tokenizer,
    data: TrainData,
    objective: Objective,
    cfg: TrainConfig,
    optim: OptimConfig,
    evaluate: Callable[[torch.nn.Module], dict[str, float]] | None = None,
    on_step: Callable[[int, dict], None] | None = None,
    run_config: Config | None = None,
    finish: Callable[[dict], None] | None = None,
) -> dict[str, float]:
    """Train ``model``, save it to ``<output_dir>/model`` and return the last metrics.

    ``finish(record)`` runs on the main process after the export and before
    ``train_result.json``, which marks the run complete."""
    out = Path(cfg.output_dir)
    eng = engine_for(cfg)
    rank, world, device = eng.rank, eng.world, eng.device
    if eng.deepspeed and cfg.on_nonfinite == "skip":
        raise UserError("train.on_nonfinite=skip is not available with DeepSpeed (it steps inside its engine)")
    set_seed(cfg.seed)
    plan = step_plan(data, cfg, world)
    micro, accum, total = plan.micro, plan.accum, plan.total
    warmup = math.ceil(optim.warmup_ratio * total)
    if cfg.activation_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.20
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False

    def make_optimizer(m: torch.nn.Module) -> torch.optim.Optimizer:
        params = list(m.parameters())  # fused: one kernel for all tensors (4x faster on CPU)
        return torch.optim.AdamW(_param_groups(m, optim.weight_decay), lr=optim.lr, betas=optim.betas,
                                 eps=optim.eps, fused=all(p.device.type in ("cpu", "cuda") for p in params))

    params, model_config = matmul_params(model), model.config
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(eng.precision, torch.float32)
    peak = all_sum(torch.tensor(cfg.peak_tflops * 1e12 if cfg.peak_tflops else measured_peak(device, dtype),
                                device=device)).item()  # of all the devices
    model, optimizer = eng.wrap(model, make_optimizer, micro, accum, optim.max_grad_norm,
                                cfg.allow_low_precision_weights)
    scheduler = get_scheduler(
        {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[optim.scheduler],
        optimizer, num_warmup_steps=warmup, num_training_steps=total,
    )
    layout = {"strategy": eng.strategy, "precision": "bf16 compute, fp32 weights" if eng.precision == "bf16"
              else eng.precision if eng.precision != "no" else "fp32", "processes": world,
              "global_batch_size": cfg.global_batch_size, "optimizer_steps": total, "warmup_steps": warmup,
              "peak_tflops_per_device": round(peak / world / 1e12, 4), "matmul_params": params,
              **({"micro_batch_tokens": plan.tokens} if plan.tokens else {"micro_batch_size": micro,
                                                                          "grad_accum": accum})}
    split = (f"{world} share(s) balanced by tokens, in micro-batches of <= {plan.tokens} tokens" if plan.tokens
             else f"{micro} x {accum} accumulation x {world}")
    start = resume(eng, out, scheduler)
    if eng.is_main:
        write_json(out / "train_plan.json", layout)
        print(f"train {out.name}: {eng.strategy} on {world} process(es), {layout['precision']}; global "
              f"batch {cfg.global_batch_size} = {split}; {total} optimizer "
              f"steps, {warmup} warmup; " + (f"resuming at step {start}" if start else "starting fresh"))
        if total < 10 and not cfg.max_steps:
            print(f"warning: only {total} optimizer step(s): with {len(data.lengths)} examples and a global "
                  f"batch of {cfg.global_batch_size} the schedule barely starts; lower "
                  "train.global_batch_size or raise train.epochs")
        truncate_metrics(out / "metrics.jsonl", start)
    trackers = make_trackers(cfg.report_to, out, run_config) if eng.is_main else []

    record: dict[str, float] = {}
    model.train()
    t0, last_save, tokens_seen, flops_seen = time.perf_counter(), time.monotonic(), 0.0, 0.0
    skipped = 0
    with StopOnSignal() as stop, tqdm(total=total, initial=start, disable=not (cfg.progress and eng.is_main),
                                      desc=f"train {out.name}", dynamic_ncols=True) as bar:
        for step in range(start, total):
            epoch, micro_list, real = plan.micro_batches(step, rank)
            batches = [data.collate(rows) for rows in micro_list]
            items = all_sum(torch.tensor(float(sum(b["num_items"] for b in batches[:real])), device=device)).item()
            items = max(items, 1.0)
            lr = scheduler.get_last_lr()[0]  # the rate this step uses
            sums: dict[str, torch.Tensor] = {}
            loss_total = torch.zeros((), device=device)
            for i, batch in enumerate(batches):
                tensors = to_device(batch, device)
                keep = float(i < real)  # a filler counts for nothing
                with eng.micro_batch(last=i == len(batches) - 1):
                    res = objective(model, tensors)
                    eng.backward(res.loss_sum * (keep * world / items))
                loss_total += res.loss_sum.detach().float() * keep
                for name, v in res.metric_sums.items():
                    sums[name] = sums.get(name, 0) + torch.as_tensor(v, dtype=torch.float32).detach() * keep
            names = sorted(sums)
            due_time = eng.is_main and cfg.save_minutes > 0 and time.monotonic() - last_save > 60 * cfg.save_minutes
            local = [loss_total, *(sums[n].to(device) for n in names),
                     torch.tensor(step_flops(params, model_config, batches[:real]), device=device),
                     torch.tensor(float(sum(b["num_tokens"] for b in batches[:real])), device=device),
                     torch.tensor(float(due_time), device=device), torch.tensor(float(stop.requested), device=device)]
            reduced = all_sum(torch.stack([x.float().reshape(()) for x in local])).tolist()
            loss = reduced[0] / items
            grad_norm, updated = eng.step(optim.max_grad_norm, skip=not math.isfinite(loss))
            if not (updated and math.isfinite(loss) and math.isfinite(grad_norm)):
                skipped = _nonfinite(cfg, out, step + 1, loss, grad_norm, skipped, applied=updated)
            scheduler.step()  # after the check: no scheduler warning in front of a stopped run's error
            flops_seen, tokens_seen = flops_seen + reduced[-4], tokens_seen + reduced[-3]
            record = {"step": step + 1, "epoch": round(epoch, 4), "loss": loss, "lr": lr,
                      "grad_norm": grad_norm, "items": items}
            record.update({n: v / items for n, v in zip(names, reduced[1:-4], strict=True)})
            elapsed = time.perf_counter() - t0
            record["tokens_per_s"] = round(tokens_seen / elapsed, 1)
            record["mfu"] = round(flops_seen / (elapsed * peak), 4)
            if skipped:
                record["skipped_steps"] = skipped
            if device.type == "cuda":
                record["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            done = step + 1 == total
            if evaluate is not None and (done or (cfg.eval_every and (step + 1) % cfg.eval_every == 0)):
                model.eval()
                record.update({f"eval/{key}": v for key, v in evaluate(eng.module()).items()})
                reshard(model)  # (FSDP2: no weights left gathered for a checkpoint or the export)
                model.train()
            if eng.is_main and ((step + 1) % cfg.log_every == 0 or done or any(k.startswith("eval/") for k in record)):
                with (out / "metrics.jsonl").open("a") as f:
                    f.write(json.dumps(record) + "\n")
                for tracker in trackers:
                    tracker.log(record, step=step + 1)
            bar.set_postfix(_shown(record), refresh=False)
            bar.update(1)
            stopping = reduced[-1] > 0 and not done
            if not done and ((cfg.save_every and (step + 1) % cfg.save_every == 0) or reduced[-2] > 0 or stopping):
                save_checkpoint(eng, out, step + 1, cfg.keep_checkpoints)
                last_save = time.monotonic()
            if stopping:
                raise KeyboardInterrupt(f"stopped at step {step + 1} of {total}, checkpoint saved")
            if on_step is not None:
                on_step(step + 1, record)
    barrier()
    eng.export(tokenizer, out / "model", cfg.save_dtype, int(cfg.save_file_gib * 2**30))
    barrier()
    if eng.is_main:
        if finish is not None:
            finish(record)
        write_json(out / "train_result.json", {"steps": total, **layout, **record,
                                               "train_seconds": round(time.perf_counter() - t0, 2)})
    for tracker in trackers:
        tracker.finish()
    barrier()
    return record


class StopOnSignal:
    """Ctrl-C (SIGINT) or a scheduler's SIGTERM during training: finish the step, save a
    checkpoint, stop; a second signal stops at once. Every rank agrees on the step (the flag
    travels with the step's reduced numbers)."""

    def __init__(self):
        self.requested, self.previous = False, {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(f"{signal.Signals(signum).name}: stopping after this step (send it again to stop at once)",
              file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _nonfinite(cfg: TrainConfig, out: Path, step: int, loss: float, grad_norm: float, skipped: int,
               applied: bool = False) -> int:
    """A step whose loss or gradient norm is nan/inf: stop (the checkpoints so far are kept), or
    with ``train.on_nonfinite=skip`` count it and go on. One process, DDP and FSDP2 updated
    nothing; DeepSpeed (``applied``) steps inside its engine and applied the update."""
    what = f"step {step}: loss {loss}, gradient norm {grad_norm}"
    if cfg.on_nonfinite == "error":
        last = checkpoints(out)[-1][1].name if checkpoints(out) else "none yet"
        done = ("DeepSpeed applied the update (it steps inside its engine), so the weights in memory are "
                "not trusted and" if applied else "the weights were not updated and")
        raise UserError(f"{what}: {done} training stopped (last checkpoint: {last}, from before it); lower "
                        "optim.lr, check the data" + ("" if applied else ", or set train.on_nonfinite=skip"))
    print(f"warning: {what}: step skipped", file=sys.stderr)
    return skipped + 1


def _shown(record: dict) -> dict[str, str]:
    """The progress line: loss, lr, the stage's headline metric, the last held-out ones, speed."""
    shown = {"loss": f"{record['loss']:.4f}", "lr": f"{record['lr']:.2e}"}
    for k in ("reward_acc", "accuracy", "rewards/margin", "eval/loss", "eval/accuracy"):
        if k in record:
            shown[k] = f"{record[k]:.3f}"
    shown.update({"tok/s": f"{record['tokens_per_s']:.0f}", "mfu": f"{record['mfu']:.1%}"})
    return shown


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases, norms and embeddings' 1-D parameters."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def make_trackers(names: list[str], out: Path, run_config: Config | None) -> list:
    """accelerate's TensorBoard / W&B trackers, one run named after ``out`` (TensorBoard's
    event files under it), the run's config stored flattened."""
    from accelerate.tracking import TensorBoardTracker, WandBTracker

    made = []
    for name in names:
        tracker = TensorBoardTracker(out.name, out) if name == "tensorboard" else WandBTracker(out.name)
        if hasattr(tracker, "start"):
            tracker.start()
        if run_config is not None:
            tracker.store_init_configuration(flatten(run_config.model_dump(mode="json")))
        made.append(tracker)
    return made
