"""The loop's test configuration: two iterations on the tiny policy, the trained judge and the
sandbox prompts, small enough to run in about a minute."""

import pytest

from rlhf_workflow.config import load_config
from rlhf_workflow.online.loop import LoopConfig


@pytest.fixture(scope="session")
def loop_cfg(tiny_model, sandbox_data, trained_rm):
    """``loop_cfg(out, *overrides)``: the test loop's config writing to ``out``."""
    def make(out, *extra):
        return load_config(LoopConfig, None, [
            f"out={out}", "iterations=2", f"policy.path={tiny_model}",
            f"prompts.source={sandbox_data / 'prompts_train.jsonl'}", "prompts.per_iteration=8",
            "generate.sampling.n=3", "generate.sampling.max_new_tokens=10", "generate.chunk_size=4",
            f"annotate.annotator.path={trained_rm}", "annotate.annotator.dtype=fp32",
            "annotate.annotator.max_length=256", "annotate.chunk_size=4",
            "dpo.data.max_length=96", "dpo.optim.lr=1e-3", "dpo.train.epochs=1", "dpo.train.global_batch_size=4",
            "dpo.train.progress=false", "dpo.train.save_every=1",
            f"eval.prompts={sandbox_data / 'prompts_eval.jsonl'}", "eval.limit=6", "eval.sampling.n=2", "eval.winrate=true",
            "eval.sampling.max_new_tokens=10", *extra])
    return make
