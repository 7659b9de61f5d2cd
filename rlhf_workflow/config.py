"""Typed stage configs: YAML files plus ``key=value`` overrides, validated by pydantic.

Every stage has one ``Config`` subclass whose defaults reproduce the paper. Nested sections
are addressed with dots (``optim.lr=1e-5``). Unknown keys, wrong types and bad values are
:class:`UserError` s naming the key and what is allowed.
"""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .errors import UserError
from .io import write_text

C = TypeVar("C", bound="Config")


class Config(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated, and a
    boolean is never taken for a number (``sampling.n=true`` is an error, not n = 1)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, bool):
            annotation = cls.model_fields[info.field_name].annotation
            kinds = set(typing.get_args(annotation)) or {annotation}
            if bool not in kinds and kinds & {int, float}:
                raise ValueError("expected a number, not a boolean")
        return value


class OptimConfig(Config):
    lr: float = Field(2e-5, gt=0, description="peak learning rate")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon")
    scheduler: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="learning-rate schedule after warmup"
    )
    warmup_ratio: float = Field(0.05, ge=0, le=1, description="fraction of steps spent warming up")
    max_grad_norm: float = Field(1.0, ge=0, description="gradient clipping norm (0 = off)")


class TrainConfig(Config):
    """Settings of the shared training loop."""

    output_dir: str = Field("runs/train", description="folder for checkpoints, metrics and the final model")
    epochs: float = Field(1.0, gt=0, description="passes over the training data")
    max_steps: int = Field(0, ge=0, description="optimizer steps to run (0 = derive from epochs)")
    global_batch_size: int = Field(
        8, ge=1, description="sequences (or pairs) per optimizer step over all processes; accumulation "
        "= global / (micro_batch_size x processes)")
    micro_batch_size: int = Field(8, ge=1, description="sequences (or pairs) per forward pass per process")
    micro_batch_tokens: int = Field(
        0, ge=0, description="DPO, reward and preference models: micro-batches by tokens, not by pairs; a "
        "step's pairs are shared out over the processes balanced by tokens, and each process's share is cut "
        "into micro-batches of at most this many tokens (shared-prompt pairs packed into one row); a step "
        "holds the same pairs as without it (0 = micro_batch_size pairs per micro-batch)")
    seed: int = Field(42, description="seed for initialisation, data order and sampling")
    strategy: Literal["auto", "single", "ddp", "fsdp", "zero2", "zero3"] = Field(
        "auto", description="how processes share the work: auto (ddp on several processes), ddp, "
        "fsdp (FSDP2: weights, gradients, optimizer sharded), zero2/zero3 (DeepSpeed)")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        "auto", description="compute precision on fp32 weights: auto = bf16 on a GPU that has it, else fp32")
    grad_sync: Literal["every", "last"] = Field(
        "every", description="fsdp: reduce-scatter the gradients after every micro-batch (they stay sharded: "
        "least memory), or accumulate them unsharded on each rank and reduce once a step, on the last "
        "micro-batch (fewer collectives; a whole fp32 gradient per rank). DDP always syncs on the last")
    reduce_dtype: Literal["fp32", "bf16"] = Field(
        "fp32", description="dtype gradients are reduced in across processes (fsdp, zero2/zero3): bf16 halves "
        "the traffic at the cost of a rounding of every gradient")
    allow_low_precision_weights: bool = Field(
        False, description="allow AdamW on bf16/fp16 weights (updates below their precision are lost)")
    activation_checkpointing: bool = Field(
        False, description="recompute activations in the backward pass (less memory, ~30% more compute)")
    group_by_length: bool = Field(True, description="batch sequences of similar length to cut padding")
    log_every: int = Field(10, ge=1, description="optimizer steps between metric lines")
    eval_every: int = Field(0, ge=0, description="optimizer steps between held-out evaluations (0 = only at the end)")
    save_every: int = Field(0, ge=0, description="optimizer steps between checkpoints (0 = by time only)")
    save_minutes: float = Field(
        30.0, ge=0, description="also checkpoint when this many minutes passed since the last one (0 = off)")
    keep_checkpoints: int = Field(2, ge=1, description="how many recent checkpoints to keep")
    resume: Literal["auto", "force", "restart"] = Field(
        "auto", description="auto: continue from the last checkpoint if the settings are unchanged (else "
        "stop); force: continue with the new settings; restart: clear output_dir and start over")
    on_nonfinite: Literal["error", "skip"] = Field(
        "error", description="a nan/inf loss or gradient norm: stop (keeping the checkpoints) or skip the step")
    save_dtype: Literal["fp32", "bf16", "fp16"] | None = Field(
        None, description="dtype of the exported model (None: as trained, fp32)")
    save_file_gib: float = Field(
        5.0, gt=0, description="largest safetensors file of the exported model, GiB (a sharded model is "
        "exported file by file: this also bounds the main process's memory then)")
    timeout_minutes: float = Field(30.0, gt=0, description="how long a rank waits for the others")
    peak_tflops: float | None = Field(
        None, gt=0, description="peak TFLOP/s of one device in the compute dtype, for the MFU metric (e.g. 989 "
        "for an H100's dense bf16); None: measured at the start with a short run of matrix products")
    report_to: list[Literal["tensorboard", "wandb"]] = Field(
        default_factory=list, description="extra metric trackers besides metrics.jsonl"
    )
    progress: bool = Field(True, description="show a progress bar")

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _no_is_a_word(cls, v: Any) -> Any:
        """YAML reads an unquoted ``no`` as false: ``train.mixed_precision=no`` means "no"."""
        return "no" if v is False else v


class PairLimits(Config):
    """Lengths of preference-pair data (DPO, reward and preference models), checked together,
    and whether the tokenized pairs are cached."""

    max_length: int = Field(2048, ge=16, description="tokens of prompt + response, per sequence")
    max_prompt_length: int | None = Field(
        None, ge=1, description="prompt tokens kept at most, cut from the left (further when a response needs "
        "the room: responses are never cut)")
    on_long: Literal["skip", "error"] = Field(
        "skip", description="pair whose response cannot fit in max_length: skip and count, or fail")
    token_cache: bool = Field(
        True, description="tokenize once, sharded over the ranks, into a cache on disk ($RLHF_TOKEN_CACHE, "
        "default ~/.cache/rlhf-workflow/tokens) that later runs and resumes read; false: every rank "
        "tokenizes everything on every run")

    @model_validator(mode="after")
    def _room_for_a_response(self) -> PairLimits:
        if self.max_prompt_length is not None and self.max_prompt_length >= self.max_length:
            raise ValueError(f"max_prompt_length ({self.max_prompt_length}) must be smaller than max_length "
                             f"({self.max_length}): the response needs room")
        return self


class ModelConfig(Config):
    """A model to load: a Hugging Face folder or hub name, or a GGUF file (dequantized on load).

    ``gguf_file`` is joined into ``path``: ``path=DIR gguf_file=NAME.gguf`` and
    ``path=DIR/NAME.gguf`` are the same model, and copies of the config with another ``path``
    (the loop's next policy) do not carry a stale file name along.
    """

    path: str = Field("runs/tiny-model", description="local folder, hub name, or a .gguf file of the model to start from")
    gguf_file: str | None = Field(
        None, description="GGUF file inside `path` to load (dequantized); joined into path (path=DIR/NAME.gguf)")
    tokenizer: str | None = Field(None, description="tokenizer folder, hub name or .gguf file (default: the model's)")
    dtype: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="dtype the weights are loaded in")
    trust_remote_code: bool = Field(False, description="allow code from the model repository to run")
    attn_implementation: str | None = Field(None, description="e.g. sdpa, eager, flash_attention_2")

    @model_validator(mode="after")
    def _join_gguf_file(self) -> ModelConfig:
        if self.gguf_file:
            path, name = self.path, self.gguf_file
            object.__setattr__(self, "gguf_file", None)  # (no re-validation on assignment)
            object.__setattr__(self, "path", f"{path.rstrip('/')}/{name}")
        return self


# --------------------------------------------------------------------------- loading


def load_config(cls: type[C], path: str | Path | None = None, overrides: list[str] | None = None) -> C:
    """Build ``cls`` from an optional YAML file and ``key=value`` overrides (later wins)."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"config file not found: {p}")
        try:
            loaded = _read_yaml(p) or {}
        except yaml.YAMLError as e:
            raise UserError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(loaded, dict):
            raise UserError(f"{p}: the top level must be a mapping of keys to values")
        data = loaded
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"override {item!r} is not of the form key=value (e.g. optim.lr=1e-5)")
        _set_dotted(cls, data, key.strip(), _parse_value(raw))
    try:
        return cls.model_validate(_merge(cls().model_dump(), data))
    except ValidationError as e:
        raise UserError(_describe(cls, e)) from None


def _read_yaml(path: Path) -> Any:
    """A YAML file's data; a key given twice in one mapping is refused (YAML forbids it, and
    PyYAML would keep the last value silently)."""
    loader = yaml.SafeLoader(path.read_text())
    try:
        node = loader.get_single_node()
        if node is not None:
            _refuse_repeated_keys(path, node)
        return loader.construct_document(node) if node is not None else None
    finally:
        loader.dispose()


def _refuse_repeated_keys(path: Path, node: yaml.Node, prefix: str = "") -> None:
    if isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _refuse_repeated_keys(path, item, prefix)
    if not isinstance(node, yaml.MappingNode):
        return
    first: dict[str, int] = {}
    for key, value in node.value:
        if key.tag == "tag:yaml.org,2002:merge" or not isinstance(key, yaml.ScalarNode):
            continue  # `<<: *defaults` is overridden on purpose
        name, line = prefix + key.value, key.start_mark.line + 1
        if name in first:
            raise UserError(f"{path}, line {line}: key '{name}' is given twice (first on line {first[name]}); "
                            "keep one")
        first[name] = line
        _refuse_repeated_keys(path, value, name + ".")


def _merge(defaults: dict, data: dict) -> dict:
    """Deep-merge user values onto the stage's defaults, so that setting one key of a section
    keeps the stage's defaults for the others (not the section class's)."""
    out = dict(defaults)
    for key, value in data.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _parse_value(raw: str) -> Any:
    try:
        return yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        return raw


def _set_dotted(cls: type[Config], data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    model: Any = cls
    for i, part in enumerate(parts):
        fields = model.model_fields if _is_config(model) else None
        if fields is not None and part not in fields:
            where = ".".join(parts[:i]) or "top level"
            raise UserError(f"unknown config key {key!r}; valid keys at {where}: {', '.join(fields)}")
        if i == len(parts) - 1:
            data[part] = value
            return
        sub = data.get(part)
        if not isinstance(sub, dict):
            sub = data[part] = {}
        data = sub
        model = _section_type(fields[part].annotation) if fields is not None else None


def _is_config(t: Any) -> bool:
    return isinstance(t, type) and issubclass(t, BaseModel)


def _section_type(annotation: Any) -> Any:
    """The Config class inside an annotation such as ``SubConfig`` or ``SubConfig | None``."""
    if _is_config(annotation):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            if _is_config(arg):
                return arg
    return None


def _describe(cls: type[Config], err: ValidationError) -> str:
    e = err.errors()[0]
    loc = ".".join(str(p) for p in e["loc"])
    if e["type"] == "extra_forbidden":
        model: Any = cls
        for part in e["loc"][:-1]:
            model = _section_type(model.model_fields[part].annotation) if _is_config(model) else None
        valid = ", ".join(model.model_fields) if _is_config(model) else "?"
        return f"unknown config key {loc!r}; valid keys here: {valid}"
    got = f" (got {e['input']!r})" if "input" in e and not isinstance(e["input"], dict) else ""
    msg = e["msg"].removeprefix("Value error, ")
    return f"config key {loc!r}: {msg}{got}" if loc else f"config: {msg}"


def flatten(d: dict, prefix: str = "") -> dict:
    """A nested config dump as ``{"optim.lr": 1e-5, ...}`` (what trackers and key checks want)."""
    flat = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update(flatten(v, f"{prefix}{k}."))
        else:
            flat[prefix + k] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return flat


# --------------------------------------------------------------------------- saving / help


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML next to a stage's output."""
    write_text(path, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


def describe_options(cls: type[Config], prefix: str = "", defaults: dict | None = None) -> list[tuple[str, str, str]]:
    """(dotted key, default, description) for every leaf option, for ``--help``."""
    if defaults is None:
        defaults = cls.model_construct().model_dump(mode="json")
    rows = []
    for name, field in cls.model_fields.items():
        sub = _section_type(field.annotation)
        if sub is not None and isinstance(defaults.get(name), dict):
            rows.extend(describe_options(sub, f"{prefix}{name}.", defaults[name]))
        else:
            rows.append((prefix + name, repr(defaults.get(name)), field.description or ""))
    return rows
