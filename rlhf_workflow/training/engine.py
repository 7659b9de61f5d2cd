"""How a training run is spread over processes: one process, DDP, FSDP2 or DeepSpeed ZeRO.

The training loop (:mod:`.loop`) never touches a distributed API itself; it asks the
:class:`Engine` to wrap the model and the optimizer, to run each micro-batch (with or
without gradient synchronisation), to clip and step, to sum numbers over ranks, to save
and load sharded checkpoints, and to gather the final weights. Existing engines only:

- ``single``: one process, the model on the GPU if there is one;
- ``ddp``: :class:`torch.nn.parallel.DistributedDataParallel`, gradients synchronised on the
  last micro-batch of a step only;
- ``fsdp``: PyTorch's FSDP2 (``fully_shard`` on every decoder layer, the reward head and the
  root), parameters, gradients and optimizer states sharded; gradients reduce-scattered
  every micro-batch so they stay sharded (``train.grad_sync=last``: accumulated unsharded,
  reduced once a step), in ``train.reduce_dtype``;
- ``zero2`` / ``zero3``: DeepSpeed ZeRO (the ``deepspeed`` extra), which owns accumulation:
  the loop marks the accumulation boundary itself, so DeepSpeed steps once per optimizer
  step and never rescales the loss.

Precision: weights (and so AdamW's states) stay fp32, "master weights"; with
``mixed_precision=bf16`` the compute runs in bf16: autocast for ``single``/``ddp``,
``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`` for FSDP2, DeepSpeed's bf16
mode (fp32 master copy in the optimizer) for ZeRO. Training bf16/fp16 parameters with AdamW
is refused unless asked for: at lr 5e-7 most updates round away in bf16.

Attention: on CUDA, training never uses cuDNN's attention kernel (see :func:`training_attention`).

Checkpoints: ``single``/``ddp``/``fsdp`` write model and optimizer with
``torch.distributed.checkpoint`` (one shard file per rank, reshardable to another world
size); ZeRO writes DeepSpeed's own checkpoint. Every rank also saves its RNG states. The final
export of a sharded model is streamed, tensor by tensor (:meth:`Engine.export`).
"""

from __future__ import annotations

import gc
import math
import random
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from ..config import ModelConfig, TrainConfig
from ..distributed import setup
from ..errors import UserError
from ..models.loading import load_with_info, save_model, unwrap
from ..models.sharded import load_sharded, save_streamed

STRATEGIES = ("single", "ddp", "fsdp", "zero2", "zero3")


def _state_options():
    """Checkpointed state: the trained weights (a LoRA run's frozen base is not saved) and the
    optimizer; loading is strict, so a missing or unexpected key is an error, not skipped."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, strict=True)


def setup_for(cfg: TrainConfig) -> tuple[int, int, torch.device]:
    """(rank, world size, device) of a training stage's process; FSDP and ZeRO get a process
    group even when it runs alone."""
    return setup(cfg.timeout_minutes, group_of_one=cfg.strategy in ("fsdp", "zero2", "zero3"))


def engine_for(cfg: TrainConfig) -> Engine:
    """The engine of a training stage's process: its strategy, precision, rank and device."""
    rank, world, device = setup_for(cfg)
    return Engine(resolve_strategy(cfg.strategy, world), resolve_precision(cfg.mixed_precision, device),
                  rank, world, device, cfg.grad_sync, cfg.reduce_dtype)


def load_trainable(cfg: TrainConfig, spec: ModelConfig, head: str = "causal_lm", prepare=None,
                   **kwargs) -> tuple[torch.nn.Module, list[str]]:
    """(the model a stage trains, names of weights newly initialised), loaded as its strategy lays
    it out (see :meth:`Engine.load`)."""
    return engine_for(cfg).load(spec, head, prepare, **kwargs)


def load_frozen(spec: ModelConfig, shard: bool, precision: str = "no", head: str = "causal_lm",
                **kwargs) -> tuple[torch.nn.Module, list[str]]:
    """(a model for inference only, a reference or a judge, in eval mode on this process's
    device; names of weights newly initialised). With ``shard`` and a process group it is sharded
    over its ranks with FSDP2, no optimizer, each rank loading only its share (every rank must then
    run the same forward passes: :func:`..distributed.run_batched`); otherwise each rank holds a
    whole copy, the choice where it fits. ``precision="bf16"`` computes in bf16 under FSDP2."""
    rank, world, device = setup()
    strategy = "fsdp" if shard and torch.distributed.is_initialized() else "single"
    model, missing = Engine(strategy, precision if strategy == "fsdp" else "no", rank, world, device).load(
        spec, head, **kwargs)
    return model.to(device).eval(), missing


def resolve_strategy(strategy: str, world: int) -> str:
    """``auto`` is DDP on several processes and ``single`` on one."""
    if strategy == "auto" or (strategy == "ddp" and world == 1):
        return "ddp" if world > 1 else "single"
    if strategy == "single" and world > 1:
        raise UserError(f"train.strategy=single but {world} processes were launched; use ddp, fsdp, "
                        "zero2 or zero3")
    return strategy


def resolve_precision(mixed_precision: str, device: torch.device) -> str:
    """``auto`` is bf16 on a GPU that supports it and fp32 ("no") elsewhere."""
    if mixed_precision != "auto":
        return mixed_precision
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "no"


def inference_precision(strategy: str, precision: str, model_dtype: str) -> tuple[str, str | None]:
    """(dtype to load a frozen model in, autocast dtype or None) so that its forward computes
    as a training forward under ``strategy`` does: FSDP2 and ZeRO run bf16 weights, one
    process and DDP autocast their weights."""
    if precision == "bf16" and strategy in ("fsdp", "zero2", "zero3"):
        return "bf16", None
    return model_dtype, precision if precision in ("bf16", "fp16") else None


# --------------------------------------------------------------------------- the engine


def training_attention() -> None:
    """Leave cuDNN out of ``scaled_dot_product_attention`` for training.

    Since torch 2.11, cuDNN is the default SDPA kernel on H100/H200 for bf16/fp16 with a mask,
    and its backward returns NaN gradients for some masked shapes (pytorch/pytorch#196678):
    measured on an H100 (torch 2.11), a reward model's first step in bf16 had a NaN gradient
    norm with cuDNN and finite ones with the memory-efficient and math kernels and eager
    attention. The memory-efficient kernel takes over. The switch is process-wide."""
    torch.backends.cuda.enable_cudnn_sdp(False)


class Engine:
    """One strategy's way of wrapping, stepping, checkpointing and exporting a model."""

    def __init__(self, strategy: str, precision: str, rank: int, world: int, device: torch.device,
                 grad_sync: str = "every", reduce_dtype: str = "fp32"):
        self.strategy, self.precision = strategy, precision
        self.grad_sync, self.reduce_dtype = grad_sync, reduce_dtype
        if grad_sync == "last" and strategy.startswith("zero"):
            raise UserError("train.grad_sync=last is for fsdp: DeepSpeed ZeRO reduces every micro-batch")
        self.rank, self.world, self.device = rank, world, device
        self.is_main = rank == 0
        self.deepspeed = strategy.startswith("zero")
        if precision == "fp16" and strategy not in ("single", "ddp"):
            raise UserError(f"mixed_precision=fp16 is supported with single and ddp only; use bf16 "
                            f"with {strategy}")
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        self.model = self.optimizer = None
        if device.type == "cuda":
            training_attention()

    # ----------------------------------------------------------------- loading and wrapping

    def load(self, spec: ModelConfig, head: str = "causal_lm", prepare=None,
             **kwargs) -> tuple[torch.nn.Module, list[str]]:
        """(model, names of weights newly initialised). Under FSDP2 each rank builds the model on
        the meta device, shards it and reads only its own shards from the safetensors files
        (:mod:`..models.sharded`); otherwise, or for a checkpoint that cannot be read that way
        (GGUF, a hub name, weight names the model does not use), the whole model is loaded. Under
        ZeRO-3 transformers builds the model inside ``deepspeed.zero.Init`` and loads the weights
        into each rank's partition. ``prepare(model)`` runs before sharding (e.g. a new pad
        token's embedding row)."""
        if self.strategy == "fsdp":
            loaded = load_sharded(spec, self._fully_shard, self.device, head, prepare, **kwargs)
            if loaded is not None:
                return loaded
            if self.is_main:
                print(f"note: {spec.path} cannot be read shard by shard (not a local safetensors folder "
                      "with the model's weight names); every rank loads it whole first")
        zero_init = None  # ZeRO-3: while it lives, transformers loads inside deepspeed.zero.Init
        if self.strategy == "zero3":
            zero_init = _deepspeed_module().HfDeepSpeedConfig({  # (what zero.Init reads; batches come later)
                "train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3},
                "bf16": {"enabled": self.precision == "bf16"}})
        model, missing = load_with_info(spec, head, **kwargs)
        if prepare is not None:
            prepare(model)
        del zero_init  # (later loads of frozen models are plain ones)
        return model, missing

    def wrap(self, model: torch.nn.Module, make_optimizer, micro_batch_size: int, accum: int,
             max_grad_norm: float, allow_low_precision: bool = False):
        """(wrapped model, optimizer); ``make_optimizer(model)`` builds AdamW on the parameters
        as the strategy lays them out."""
        low = sorted({str(p.dtype) for p in model.parameters()
                      if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16)})
        if low and not allow_low_precision and not self.deepspeed:
            raise UserError(
                f"refusing to train {'/'.join(low)} parameters with AdamW: updates smaller than the "
                "weights' precision are lost (most of them at lr 5e-7). Load the model in fp32 "
                "(model.dtype=fp32) and compute in bf16 with train.mixed_precision=bf16, or set "
                "train.allow_low_precision_weights=true")
        if hasattr(model, "peft_config") and self.strategy not in ("single", "ddp"):
            raise UserError(f"LoRA trains with train.strategy=single or ddp (the adapters are small); "
                            f"got {self.strategy}")
        if self.strategy == "single":
            model = model.to(self.device)
            optimizer = make_optimizer(model)
        elif self.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            model = DistributedDataParallel(
                model.to(self.device), device_ids=[self.device.index] if self.device.type == "cuda" else None)
            optimizer = make_optimizer(model)
        elif self.strategy == "fsdp":
            from torch.distributed.fsdp import FSDPModule

            if not isinstance(model, FSDPModule):  # (sharded when loaded: :meth:`load`)
                self._fully_shard(model.to(self.device))
            reshard(model)  # the optimizer must see the shards, not weights an inference pass left gathered
            optimizer = make_optimizer(model)
        else:
            model, optimizer = self._deepspeed(model, make_optimizer, micro_batch_size, accum, max_grad_norm)
        self.model, self.optimizer = model, optimizer
        return model, optimizer

    def _fully_shard(self, model):
        """FSDP2 units: each decoder layer (the model's ``_no_split_modules``), a reward head
        (called on its own by the shared-prompt reward path), and the root."""
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if self.precision == "bf16" else None,
                                  reduce_dtype=torch.bfloat16 if self.reduce_dtype == "bf16" else torch.float32)
        inner = unwrap_peft(model)
        blocks = set(getattr(inner, "_no_split_modules", None) or [])
        units = [m for m in model.modules() if type(m).__name__ in blocks]
        if getattr(inner, "score", None) is not None:
            units.append(inner.score)
        for module in units:
            fully_shard(module, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        return model

    def _deepspeed(self, model, make_optimizer, micro_batch_size, accum, max_grad_norm):
        deepspeed = _deepspeed_module().deepspeed
        config = deepspeed_config(self.strategy, self.precision, micro_batch_size, accum, self.world,
                                  max_grad_norm)
        if self.reduce_dtype == "bf16":
            config["communication_data_type"] = "bf16"
        optimizer = make_optimizer(model)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        return engine, optimizer  # ZeRO steps this optimizer's param groups: the scheduler drives them

    # ----------------------------------------------------------------- a step

    @contextmanager
    def micro_batch(self, last: bool):
        """Context for the forward and backward of one micro-batch; gradients are synchronised
        across ranks on the ``last`` micro-batch of a step (FSDP2 and ZeRO reduce every time,
        keeping gradients sharded; FSDP2 with ``grad_sync="last"`` on the last only)."""
        if self.deepspeed:
            self.model.set_gradient_accumulation_boundary(last)
        if self.strategy == "fsdp" and self.grad_sync == "last":
            self.model.set_requires_gradient_sync(last)
        sync = self.model.no_sync() if self.strategy == "ddp" and not last else nullcontext()
        with sync, self.autocast():
            yield

    def autocast(self):
        """bf16/fp16 autocast where the strategy computes that way (FSDP2 and ZeRO cast the
        parameters themselves)."""
        on = self.precision in ("bf16", "fp16") and self.strategy in ("single", "ddp")
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype) if on else nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        if self.deepspeed:
            self.model.backward(loss, scale_wrt_gas=False)  # the loss is already normalised
        else:
            self.scaler.scale(loss).backward()

    def step(self, max_grad_norm: float, skip: bool = False) -> tuple[float, bool]:
        """Clip, update, zero the gradients: (gradient norm before clipping, whether the weights
        were updated). Nothing is updated when ``skip`` is set or the norm is not finite
        (under fp16 the loss scaler handles overflow itself; DeepSpeed always steps)."""
        if self.deepspeed:  # it steps inside its engine: a non-finite update is applied too
            self.model.step()
            norm = self.model.get_global_grad_norm()
            return (float(norm) if norm is not None else 0.0), True
        self.scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.grad is not None]
        if max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params]) if params else torch.zeros(())
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        update = self.scaler.is_enabled() or (not skip and math.isfinite(norm))
        if update:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return norm, update

    def module(self):
        """The model to call for evaluation (the sharded module itself under FSDP/ZeRO-3)."""
        return unwrap(self.model)

    # ----------------------------------------------------------------- checkpoints

    @property
    def checkpoint_format(self) -> str:
        return "deepspeed" if self.deepspeed else "dcp"

    def save_state(self, path: Path) -> None:
        """Model and optimizer state (sharded: every rank writes its part) and this rank's RNG."""
        if self.deepspeed:
            self.model.save_checkpoint(str(path), tag="state", save_latest=False)
        else:
            import torch.distributed.checkpoint as dcp

            with _single_process_ok():
                dcp.save(self._state_dicts(), checkpoint_id=str(path / "state"))
        torch.save(rng_state(), path / f"rng-{self.rank}.pt")

    def load_state(self, path: Path, fmt: str) -> None:
        if fmt != self.checkpoint_format:
            raise UserError(f"{path} was saved by {fmt} training; it cannot be resumed with "
                            f"train.strategy={self.strategy} (use train.resume=restart to start over)")
        if self.deepspeed:
            self.model.load_checkpoint(str(path), tag="state", load_lr_scheduler_states=False)
        else:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import set_state_dict

            state = self._state_dicts()
            with _single_process_ok():
                dcp.load(state, checkpoint_id=str(path / "state"))
            set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optim"], options=_state_options())
        own = path / f"rng-{self.rank}.pt"
        if own.exists():  # a run resumed on more ranks than it was saved with reseeds the rest
            set_rng_state(torch.load(own, weights_only=True))

    def _state_dicts(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(self.model, self.optimizer, options=_state_options())
        return {"model": msd, "optim": osd}

    def export(self, tokenizer, out: Path, dtype: str | None, max_file_bytes: int) -> None:
        """Save the trained model as a Hugging Face folder at ``out`` (every rank calls it). One
        process and DDP: the main process saves its whole model. FSDP2 and ZeRO: each tensor is
        gathered on every rank in turn (ZeRO: the fp32 master weights) and the main process writes
        it into files of at most ``max_file_bytes`` as they fill, so no process ever holds the
        whole state dict (:func:`..models.sharded.save_streamed`)."""
        if self.strategy in ("single", "ddp"):
            if self.is_main:
                model = self.module()
                if hasattr(model, "peft_config"):
                    save_model(model, None, out.with_name("adapter"))
                    model = model.merge_and_unload()
                save_model(model, tokenizer, out, dtype=dtype, max_shard_bytes=max_file_bytes)
            return
        reshard(self.model)
        if self.deepspeed:
            from deepspeed.utils import safe_get_full_fp32_param

            def gather(t):
                return safe_get_full_fp32_param(t) if isinstance(t, torch.nn.Parameter) else t
        else:
            from torch.distributed.tensor import DTensor

            def gather(t):
                return t.full_tensor() if isinstance(t, DTensor) else t
        save_streamed(unwrap(self.model), tokenizer, out, gather, self.is_main, dtype, max_file_bytes)


def reshard(model: torch.nn.Module) -> None:
    """Free the gathered weights of every FSDP2 unit of ``model``. A forward pass without a
    backward (evaluation, the reference pass) leaves the root unit's weights gathered, the
    parameters then being whole tensors instead of their shards."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def free(model: torch.nn.Module) -> None:
    """Return a model's memory now (its gathered FSDP2 weights too), before the next one loads.
    Every reference to it must be gone after the call."""
    reshard(model)
    model.to("meta")  # (the storage goes even where a reference to the module lingers)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def unwrap_peft(model):
    """The transformers model inside a wrapper and a PEFT model."""
    model = unwrap(model)
    base = getattr(model, "base_model", None)
    return getattr(base, "model", model) if hasattr(model, "peft_config") else model


def _deepspeed_module():
    """``deepspeed`` and transformers' ``HfDeepSpeedConfig``, or one line saying how to get them."""
    from types import SimpleNamespace

    try:
        import deepspeed
        from transformers.integrations import HfDeepSpeedConfig
    except ImportError:
        raise UserError("train.strategy=zero2/zero3 needs the deepspeed extra: pip install "
                        "'rlhf-workflow[deepspeed]'") from None
    return SimpleNamespace(deepspeed=deepspeed, HfDeepSpeedConfig=HfDeepSpeedConfig)


def deepspeed_config(strategy: str, precision: str, micro: int, accum: int, world: int,
                     max_grad_norm: float) -> dict:
    """The DeepSpeed config of a ZeRO strategy; the batch numbers are the loop's own."""
    stage = int(strategy[-1])
    zero = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True}
    if stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * world,
        "gradient_clipping": max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }


@contextmanager
def _single_process_ok():
    """Distributed checkpoints work without a process group; no need to warn about it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def rng_state() -> dict:
    """This rank's random states: Python's, the CPU's and its own GPU's (not every GPU of the
    host: a run may resume on a host with fewer)."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if isinstance(cuda, list):  # (saved by an older version: one state per visible GPU)
        own = torch.cuda.current_device() if torch.cuda.is_available() else len(cuda)
        cuda = cuda[own] if own < len(cuda) else None
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda)
