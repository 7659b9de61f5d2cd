"""Bradley-Terry reward model: ``rlhf rm train`` and ``rlhf rm score``, plus the scoring API.

A sequence-classification model with one output reads ``prompt + response`` and returns a
scalar reward; training minimises ``-log sigmoid(r_chosen - r_rejected - margin)`` with the
chosen and rejected sequences of each pair in the same forward pass (RECIPE.md, paper
defaults: global batch 512, lr 2e-6, 1 epoch, cosine, warmup 0.03).

- **Pad token.** Decoder score heads read the rightmost token that is not the pad token. If
  pad == EOS, the end-of-turn tokens count as padding, and with the older "first pad" rule
  the head reads a prompt token, so chosen and rejected score the same. :func:`ensure_pad_token`
  adds a dedicated pad token (and resizes the embeddings) when there is none or it equals EOS.
- **Truncation** keeps the end of the response (what the head reads): the prompt is cut from
  the left first, down to ``max_prompt_length`` tokens, then the response from its start.
  Truncated pairs are counted and reported (``data.on_long`` can skip or reject them instead).
- **Shared prompt.** A decoder reads a pair as one row: the prompt once, then the chosen and
  the rejected response, each at the positions it has in its own sequence, a mask keeping
  them apart; the head reads each response's last token. Same rewards as two rows, with the
  prompt computed once (``data.share_prompt``; encoders and flash attention use two rows).
- **Encoders** (BERT-style, no chat template) read ``prompt`` and ``response`` as a text pair
  with the tokenizer's own special tokens (``[CLS] prompt [SEP] response [SEP]``, token types
  0/1); their head reads ``[CLS]``.
- **Bad pairs** (missing fields, non-string content, empty or identical responses) are a
  one-line error naming file and line, or counted skips with ``data.on_bad=skip``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, ValidationError
from tqdm.auto import tqdm

from ..config import Config, ModelConfig, OptimConfig, PairLimits, TrainConfig
from ..data import readers
from ..data.batching import attention_mask, collate_rows
from ..data.chat import IGNORE, Tokenized
from ..data.pairs import TokenizedPair, collate_pairs, tokenize_pair, tokenize_response
from ..data.readers import PairRow, describe, read_pairs, split_held_out
from ..data.readers import fmt_counts as _fmt_counts
from ..data.records import PreferencePair, Prompt
from ..distributed import device as distributed_device
from ..distributed import rank_and_world, run_batched, to_device
from ..errors import UserError
from ..io import write_json, write_jsonl
from ..losses import bt_loss
from ..models.loading import load_model, load_tokenizer, param_dtype, unwrap, uses_flash_attention
from ..training.loop import StepOutput, TrainData, start_run, train

PAD_TOKEN = "<|pad|>"


# --------------------------------------------------------------------------- configs


class PairDataConfig(PairLimits):
    train: str = Field(
        "hendrydong/preference_700K",
        description="preference pairs: .jsonl/.parquet file or hub dataset",
    )
    test: str | None = Field(
        None, description="held-out pairs (default: hold out eval_fraction of train)"
    )
    split: str = Field("train", description="split, for hub datasets")
    eval_fraction: float = Field(
        0.01, ge=0, lt=1, description="share of train held out when test is unset"
    )
    on_bad: Literal["error", "skip"] = Field(
        "error",
        description="invalid pair (missing/non-string field, empty or identical responses): "
        "fail, or skip and count",
    )


class RMDataConfig(PairDataConfig):
    margin_field: str | None = Field(
        None,
        description="numeric field (top level or in meta) used as the BT margin (Llama-2 style)",
    )
    share_prompt: bool = Field(
        True,
        description="decoders: one row per pair, the prompt once, then chosen and rejected behind "
        "a mask (not with flash attention)",
    )


class RMTrainConfig(Config):
    model: ModelConfig = ModelConfig(path="meta-llama/Meta-Llama-3-8B-Instruct")
    data: RMDataConfig = RMDataConfig()
    optim: OptimConfig = OptimConfig(lr=2e-6, warmup_ratio=0.03)
    train: TrainConfig = TrainConfig(
        output_dir="runs/rm", epochs=1, global_batch_size=512, micro_batch_size=8, eval_every=100
    )
    eval_batch_size: int = Field(32, ge=1, description="sequences per forward pass when evaluating")


class RMScoreConfig(Config):
    model: ModelConfig = ModelConfig(path="runs/rm/model")
    input: str = Field(
        "rollouts.jsonl",
        description="rollouts ({prompt, responses}) or pairs ({prompt, chosen, rejected})",
    )
    out: str = Field(
        "scored.jsonl",
        description="the same records plus rewards (or chosen_reward/rejected_reward)",
    )
    batch_size: int = Field(32, ge=1, description="sequences per forward pass")
    max_length: int = Field(2048, ge=16, description="tokens per sequence (prompt + response)")
    max_prompt_length: int | None = Field(
        None, ge=1, description="prompt tokens kept when too long (default max_length // 2)"
    )
    sort_by_length: bool = Field(
        True, description="batch sequences of similar length (the output keeps the input order)"
    )
    progress: bool = Field(True, description="show a progress bar")


# --------------------------------------------------------------------------- tokenization


def ensure_pad_token(model, tokenizer) -> bool:
    """Give the tokenizer a pad token distinct from EOS (``<|pad|>``, added to the vocabulary
    if missing, the embeddings resized), and set ``config.pad_token_id``. Returns whether the
    pad token changed."""
    changed = tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id
    if changed:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.get_text_config().pad_token_id = tokenizer.pad_token_id
    return changed


def _check_pad(model, tokenizer) -> None:
    pad = model.config.get_text_config().pad_token_id
    if (
        pad is None
        or pad != tokenizer.pad_token_id
        or (uses_chat_template(tokenizer) and pad == tokenizer.eos_token_id)
    ):
        raise UserError(
            f"reward model {model.config.name_or_path!r} has no dedicated pad token "
            f"(config pad_token_id={pad}, tokenizer pad {tokenizer.pad_token_id}, "
            f"eos {tokenizer.eos_token_id}); "
            "models trained with `rlhf rm train` have one"
        )


def uses_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def encode(
    tokenizer,
    prompt: list[dict],
    response: list[dict],
    max_length: int,
    max_prompt_length: int | None = None,
) -> tuple[Tokenized, bool]:
    """(prompt + response as the reward model reads it, whether it was truncated).

    Chat template if the tokenizer has one, else a text pair with its special tokens. The
    loss mask marks the response (for encoders: the response and its closing special tokens).
    """
    mpl = max_prompt_length if max_prompt_length is not None else max_length // 2
    if uses_chat_template(tokenizer):
        return tokenize_response(tokenizer, prompt, response, max_length, mpl, keep="end")
    return _encode_text_pair(
        tokenizer, _prompt_text(prompt), response[-1]["content"], max_length, mpl
    )


def encode_pair(
    tokenizer, pair: PreferencePair, max_length: int, max_prompt_length: int | None = None
) -> TokenizedPair | None:
    """A training pair as the reward model reads it: both responses whole, the prompt cut as
    needed (:func:`..data.pairs.tokenize_pair`); None when a response cannot fit."""
    if uses_chat_template(tokenizer):
        return tokenize_pair(tokenizer, pair, max_length, max_prompt_length)
    prompt, chosen, rejected = pair.conversations()
    room = max_length - tokenizer.backend_tokenizer.num_special_tokens_to_add(is_pair=True) - 1
    if any(len(tokenizer(m[-1]["content"], add_special_tokens=False)["input_ids"]) > room
           for m in (chosen, rejected)):
        return None
    mpl = max_prompt_length or max_length
    c, tc = encode(tokenizer, prompt, chosen, max_length, mpl)
    r, tr = encode(tokenizer, prompt, rejected, max_length, mpl)
    return TokenizedPair(c, r, tc or tr)


def _prompt_text(prompt: list[dict]) -> str:
    if len(prompt) == 1:
        return prompt[0]["content"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def _encode_text_pair(
    tokenizer, prompt: str, response: str, max_length: int, max_prompt_length: int
) -> tuple[Tokenized, bool]:
    backend = tokenizer.backend_tokenizer
    p = backend.encode(prompt, add_special_tokens=False)
    r = backend.encode(response, add_special_tokens=False)
    room = max_length - backend.num_special_tokens_to_add(is_pair=True)
    truncated = len(p.ids) + len(r.ids) > room
    if truncated:
        keep_prompt = min(len(p.ids), max(room - len(r.ids), min(max_prompt_length, room - 1)))
        p.truncate(keep_prompt, direction="left")
        r.truncate(room - keep_prompt, direction="left")
    enc = backend.post_process(p, r, add_special_tokens=True)
    seq = enc.sequence_ids
    first = next((i for i, s in enumerate(seq) if s == 1), len(seq))
    return Tokenized(list(enc.ids), [i >= first for i in range(len(seq))]), truncated


def tokenize_pairs(
    tokenizer, rows: list[PairRow], cfg: PairDataConfig, encoder=None
) -> tuple[list[tuple[PairRow, Any]], int, int]:
    """Tokenize pairs with ``encoder(tokenizer, pair, max_length, max_prompt_length)``;
    applies ``cfg.on_long``. Returns ([(row, tokenized)], truncated count, skipped count)."""
    encoder = encoder or encode_pair
    out, truncated, skipped = [], 0, 0
    for row in tqdm(rows, desc="tokenize", disable=len(rows) < 5000, dynamic_ncols=True):
        tok = encoder(tokenizer, row.pair, cfg.max_length, cfg.max_prompt_length)
        if tok is None:
            if cfg.on_long == "error":
                raise UserError(f"{row.where}: a response does not fit in data.max_length={cfg.max_length} "
                                "tokens (responses are never cut; set data.on_long=skip to skip such pairs)")
            skipped += 1
            continue
        truncated += tok.truncated
        out.append((row, tok))
    return out, truncated, skipped


# --------------------------------------------------------------------------- model forward


def rewards(model, batch: dict) -> torch.Tensor:
    """Scalar reward per row, (B,). Rows are right-padded; the head reads the last real token
    (decoders, via the dedicated pad token) or ``[CLS]`` (encoders). In the shared-prompt
    layout, one reward per response, (2N,), the chosen first."""
    if "branch" in batch:
        mask = attention_mask(batch["seq_ids"], True, param_dtype(model), batch["branch"])
        hidden = model(input_ids=batch["input_ids"], attention_mask=mask,
                       position_ids=batch["position_ids"], output_hidden_states=True).hidden_states[-1]
        rows = torch.arange(len(hidden), device=hidden.device)
        last = torch.cat([hidden[rows, batch["ends"][:, 0]], hidden[rows, batch["ends"][:, 1]]])
        return unwrap(model).score(last)[:, 0].float()
    extra = {}
    if getattr(unwrap(model).config, "type_vocab_size", 0) > 1:  # text pairs: response tokens are type 1
        types = torch.zeros_like(batch["input_ids"])
        types[:, 1:] = (batch["targets"][:, :-1] != IGNORE).long()
        extra["token_type_ids"] = types
    out = model(input_ids=batch["input_ids"], attention_mask=(batch["seq_ids"] > 0).long(), **extra)
    return out.logits[:, 0].float()


def shares_prompt(model, tokenizer) -> bool:
    """Whether pairs can use the shared-prompt layout: a decoder reading the chat template,
    with a ``score`` head, and attention that takes a 4-D mask (not flash attention)."""
    return uses_chat_template(tokenizer) and hasattr(model, "score") and not uses_flash_attention(model)


def bt_objective(model, batch: dict) -> StepOutput:
    """Summed BT loss over the N pairs of a batch (2N rows, chosen first, or N shared-prompt
    rows), plus metrics."""
    r = rewards(model, batch)
    n = batch["num_items"]
    chosen, rejected = r[:n], r[n:]
    loss = bt_loss(chosen, rejected, batch.get("margin", 0.0)).sum()
    diff = (chosen - rejected).detach()
    return StepOutput(
        loss,
        {
            "accuracy": _wins(diff).sum(),
            "margin": diff.sum(),
            "reward_chosen": chosen.detach().sum(),
        },
    )


def _wins(diff: torch.Tensor) -> torch.Tensor:
    """1 where chosen scored higher, 0.5 for a tie, 0 otherwise."""
    return (diff > 0).float() + 0.5 * (diff == 0).float()


def score_tokenized(
    model,
    seqs: list[Tokenized],
    pad_id: int,
    batch_size: int = 32,
    progress: bool = False,
    sort_by_length: bool = True,
    shard: bool = False,
) -> list[float]:
    """Rewards of tokenized sequences in their order, computed in length-sorted batches (with
    ``shard``, shared out over the ranks of the process group)."""
    device = next(model.parameters()).device

    def run(idx: list[int]) -> torch.Tensor:
        batch = collate_rows([[(seqs[i].input_ids, seqs[i].targets())] for i in idx], pad_id)
        return rewards(model, to_device(batch, device))

    return run_batched([len(s.input_ids) for s in seqs], batch_size, run, shard,
                       "score" if progress else None, sort_by_length).tolist()


def score(
    model,
    tokenizer,
    prompts: list[list[dict]],
    responses: list[str],
    batch_size: int = 32,
    max_length: int = 2048,
    progress: bool = True,
    max_prompt_length: int | None = None,
    sort_by_length: bool = True,
) -> list[float]:
    """Reward of each (prompt messages, response text), in the input order. No gradients;
    the model's dtype decides the precision (see :func:`load_reward_model`)."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    _check_pad(model, tokenizer)
    model.eval()
    seqs = [
        encode(tokenizer, p, [{"role": "assistant", "content": r}], max_length, max_prompt_length)[
            0
        ]
        for p, r in zip(prompts, responses, strict=True)
    ]
    return score_tokenized(
        model, seqs, tokenizer.pad_token_id, batch_size, progress, sort_by_length
    )


def load_reward_model(path: str | Path, dtype: str = "fp32", device: str | None = None):
    """(model, tokenizer) of a saved reward model in eval mode, on ``device`` (default: the GPU
    if there is one)."""
    spec = ModelConfig(path=str(path), dtype=dtype)
    return _load_for_scoring(spec, device)


def load_seq_cls(spec: ModelConfig):
    """(one-output sequence-classification model, names of the weights newly initialised)."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # the new head is reported here, not as a warning table
    hf_logging.disable_progress_bar()
    try:
        model, info = load_model(spec, head="seq_cls", num_labels=1, output_loading_info=True)
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
    return model, sorted(info.get("missing_keys", []))


def _load_for_scoring(spec: ModelConfig, device: str | None = None):
    tokenizer = load_tokenizer(spec)
    model, missing = load_seq_cls(spec)
    if missing:
        raise UserError(
            f"{spec.path} is not a trained reward model: weights {', '.join(missing)} "
            "are missing from the checkpoint"
        )
    _check_pad(model, tokenizer)
    return model.to(device or distributed_device()).eval(), tokenizer


# --------------------------------------------------------------------------- rm train


def run_rm_train(cfg: RMTrainConfig, on_step=None) -> Path:
    """Train a BT reward model; writes ``<output_dir>/model`` and ``<output_dir>/eval.json``."""
    out = Path(cfg.train.output_dir)
    if start_run(cfg, cfg.train) is not None:
        return out / "model"
    d = cfg.data
    rows, bad = read_pairs(d.train, d.split, d.on_bad, d.margin_field)
    if d.test:
        test_rows, bad_test = read_pairs(d.test, d.split, d.on_bad, d.margin_field)
        bad += bad_test
    else:
        rows, test_rows = split_held_out(rows, d.eval_fraction, cfg.train.seed)

    tokenizer = load_tokenizer(cfg.model)
    torch.manual_seed(cfg.train.seed)  # the new score head's initialisation
    model, missing = load_seq_cls(cfg.model)
    if missing:
        print(f"rm: new reward head {', '.join(missing)} initialised (seed {cfg.train.seed})")
    if ensure_pad_token(model, tokenizer):
        print(
            f"rm: pad token set to {PAD_TOKEN!r} (id {tokenizer.pad_token_id}, distinct from EOS); "
            f"vocabulary {len(tokenizer)}"
        )
    train_set, n_trunc, n_long = tokenize_pairs(tokenizer, rows, d)
    test_set, n_trunc_test, n_long_test = tokenize_pairs(tokenizer, test_rows, d)
    if not train_set:
        raise UserError(f"{d.train}: no pair left to train on")
    stats = {
        "train_pairs": len(train_set),
        "held_out_pairs": len(test_set),
        "truncated": n_trunc + n_trunc_test,
        "skipped_long": n_long + n_long_test,
        "skipped_invalid": dict(bad),
    }
    print(
        f"rm: {len(train_set)} training pairs, {len(test_set)} held out; truncated "
        f"{stats['truncated']}, skipped {n_long + n_long_test} over-long"
        + (f", skipped invalid: {_fmt_counts(bad)}" if bad else "")
    )

    pad_id = tokenizer.pad_token_id
    shared = d.share_prompt and shares_prompt(model, tokenizer)
    print("rm: " + ("one row per pair, prompt shared" if shared else "two rows per pair"))

    def collate(batch_rows: list[list[int]]) -> dict:
        items = [train_set[r[0]] for r in batch_rows]
        batch = collate_pairs([tok for _, tok in items], pad_id, shared)
        if d.margin_field:
            batch["margin"] = torch.tensor([row.margin for row, _ in items])
        return batch

    def evaluate(m) -> dict[str, float]:
        return evaluate_pairs(m, test_set, pad_id, cfg.eval_batch_size) if test_set else {}

    data = TrainData([tok.shared_len() if shared else len(tok) for _, tok in train_set], collate)
    def finish(record: dict) -> None:
        result = {**stats, **{k[5:]: v for k, v in record.items() if k.startswith("eval/")}}
        write_eval(out, result, "rm", len(test_set))

    train(model, tokenizer, data, bt_objective, cfg.train, cfg.optim, run_config=cfg,
          evaluate=evaluate, on_step=on_step, finish=finish)
    return out / "model"


def write_eval(out: Path, result: dict, name: str, n_held_out: int) -> None:
    """Write ``eval.json`` of a trained judge and print its held-out accuracy per subset."""
    write_json(out / "eval.json", result)
    if n_held_out:
        print(
            f"{name}: held-out accuracy {result['accuracy']:.4f} on {n_held_out} pairs "
            + " ".join(f"{k[9:]}={v:.4f}" for k, v in result.items() if k.startswith("accuracy/"))
        )


def evaluate_pairs(
    model, pairs: list[tuple[PairRow, TokenizedPair]], pad_id: int, batch_size: int = 32
) -> dict[str, float]:
    """Held-out BT loss and accuracy (ties count half), overall and per subset."""
    was_training = model.training
    model.eval()
    seqs = [tok.chosen for _, tok in pairs] + [tok.rejected for _, tok in pairs]
    r = torch.tensor(score_tokenized(model, seqs, pad_id, batch_size, shard=True))
    model.train(was_training)
    n = len(pairs)
    margins = torch.tensor([row.margin for row, _ in pairs])
    wins = _wins(r[:n] - r[n:]).double()  # float64: the same numbers as `rlhf rm eval`
    result = {"loss": bt_loss(r[:n], r[n:], margins).mean().item(), "accuracy": wins.mean().item()}
    subsets = [row.pair.subset for row, _ in pairs]
    for s in sorted({s for s in subsets if s}):
        mask = torch.tensor([x == s for x in subsets])
        result[f"accuracy/{s}"] = wins[mask].mean().item()
    return result


# --------------------------------------------------------------------------- rm score


def run_rm_score(cfg: RMScoreConfig) -> Path:
    """Add ``rewards`` to rollout records (or ``chosen_reward``/``rejected_reward`` to pairs)."""
    records = read_scoring_records(cfg.input)
    model, tokenizer = _load_for_scoring(cfg.model)
    seqs, n_trunc = [], 0
    for _, prompt, responses in records:
        for resp in responses:
            tok, truncated = encode(tokenizer, prompt, resp, cfg.max_length, cfg.max_prompt_length)
            seqs.append(tok)
            n_trunc += truncated
    t0 = time.perf_counter()
    values = score_tokenized(
        model, seqs, tokenizer.pad_token_id, cfg.batch_size, cfg.progress, cfg.sort_by_length, shard=True
    )
    dt = time.perf_counter() - t0
    out, k = [], 0
    for rec, _, responses in records:
        r, k = values[k : k + len(responses)], k + len(responses)
        out.append(
            {**rec, "rewards": r}
            if "responses" in rec
            else {**rec, "chosen_reward": r[0], "rejected_reward": r[1]}
        )
    if rank_and_world()[0] != 0:
        return Path(cfg.out)
    write_jsonl(cfg.out, out)
    print(
        f"rm score: {len(seqs)} responses of {len(records)} records in {dt:.1f}s "
        f"({len(seqs) / max(dt, 1e-9):.1f}/s), {n_trunc} truncated to max_length "
        f"{cfg.max_length} -> {cfg.out}"
    )
    return Path(cfg.out)


def read_scoring_records(path: str) -> list[tuple[dict, list[dict], list[list[dict]]]]:
    """(record, prompt messages, response conversations) of a rollout or pair file. Any
    malformed line is an error: a scorer that dropped records would break the one-to-one
    link between its input and output."""
    if not Path(path).is_file():
        raise UserError(f"input file not found: {path}")
    out = []
    for at, row in readers.iter_rows(path):
        if not isinstance(row, dict):
            raise UserError(f"{at}: expected a JSON object, got {type(row).__name__}")
        if "responses" in row:
            try:
                prompt = Prompt.model_validate(row).messages()
            except ValidationError as e:
                raise UserError(f"{at}: field 'prompt': {e.errors()[0]['msg']}") from None
            resp = row["responses"]
            if not isinstance(resp, list) or not resp or not all(isinstance(x, str) for x in resp):
                raise UserError(f"{at}: field 'responses' must be a non-empty list of strings")
            out.append((row, prompt, [[{"role": "assistant", "content": x}] for x in resp]))
        elif "chosen" in row or "rejected" in row:
            try:
                pair = PreferencePair.model_validate(row)
            except ValidationError as e:
                raise UserError(f"{at}: {describe(e)}") from None
            prompt, chosen, rejected = pair.conversations()
            out.append((row, prompt, [chosen, rejected]))
        else:
            raise UserError(
                f"{at}: neither a rollout (prompt, responses) nor a pair (prompt, chosen, rejected)"
            )
    if not out:
        raise UserError(f"{path}: no records")
    return out
