"""The loop's settings (``rlhf loop --help``), apart from the loop so that its pre-flight check
(``checks.py``) and the loop both read them from below."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..config import Config, ModelConfig, TrainConfig
from ..evaluation.iteration import HeldOutConfig
from ..training.dpo import DPOConfig, DPODataConfig, ReferenceConfig
from .annotate import AnnotateConfig
from .generate import GenerateConfig
from .pairs import SelectConfig

SET = "(set by the loop)"


class PromptPoolConfig(Config):
    source: str = Field("RLHFlow/iterative-prompt-v1-iter1-20K", description="prompt pool: file or hub dataset")
    split: str = Field("train", description="split, for hub datasets")
    per_iteration: int = Field(20000, ge=1, description="fresh prompts per iteration (disjoint slices)")


class LoopConfig(Config):
    out: str = Field("runs/online", description="run directory")
    seed: int = Field(42, description="seed of the prompt slices, sampling, pair selection and DPO")
    iterations: int = Field(3, ge=1, description="online iterations T")
    policy: ModelConfig = ModelConfig(path="RLHFlow/LLaMA3-SFT")
    reference: Literal["sft", "previous"] = Field("sft", description="DPO reference: pi_0 (SFT) or pi_{t-1}")
    prompts: PromptPoolConfig = PromptPoolConfig()
    generate: GenerateConfig = GenerateConfig(model=ModelConfig(path=SET), input=SET, out=SET)
    annotate: AnnotateConfig = AnnotateConfig(input=SET, out=SET)
    select: SelectConfig = SelectConfig()
    dpo: DPOConfig = DPOConfig(model=ModelConfig(path=SET), reference=ReferenceConfig(path=SET),
                               data=DPODataConfig(train=SET),
                               train=TrainConfig(output_dir=SET, epochs=2, global_batch_size=128,
                                                 micro_batch_size=8, save_every=50))
    eval: HeldOutConfig = HeldOutConfig()
    processes: int = Field(1, ge=1, description="processes (e.g. GPUs) per stage and node; > 1 runs generate, "
                           "annotate, DPO and the evaluation on that many ranks (the loop itself stays one process)")
    launcher: list[str] = Field(
        default_factory=list, description="command that starts a stage's ranks (set: every stage goes through it, "
        "even with processes=1, e.g. one process on each of several nodes), followed by `-m rlhf_workflow.cli "
        "STAGE --config FILE`; '{processes}' is replaced. Default: torchrun --standalone --nproc_per_node "
        "{processes} when processes > 1. E.g. [accelerate, launch, --config_file, acc.yaml], or an srun + "
        "torchrun line for several nodes")
    report_to: list[Literal["tensorboard", "wandb"]] = Field(
        default_factory=list, description="trackers for the loop's per-iteration metrics and sample pairs (one run, "
        "iterations as steps; TensorBoard's files under out/), besides summary.json")
    force: bool = Field(False, description="resume even though the config changed")
