"""``rlhf check --config loop.yaml``: consistency checks of the policy, the reference and the
judge of a loop config, before the hours of generation start.

Only tokenizers, ``config.json`` and ``generation_config.json`` are read (no weights). For
each model, what would break the run or make it quietly wrong:

- **BOS**: the token ids this project builds (the rendered template, encoded without special
  tokens) start with two BOS (error); the template writes BOS and the tokenizer adds another
  when text is encoded with special tokens, which tools that do so see twice (warning); the
  tokenizer adds BOS to plain text but the template writes none, so the model never sees one
  here (warning).
- **End of turn** (policy): the token that closes an assistant turn in the template must be
  one special token the generator stops on (``generation.hf.stop_token_ids`` plus
  ``sampling.stop_token_ids``), or sampling runs to the token limit (error).
- **Pad** (BT judge): pad == EOS or no pad token; the score head then reads the wrong token
  (error). **Labels** (PM judge): ``A`` / ``B`` single tokens answered right after the
  assistant header (error).
- **Template**: a default system prompt (note: it is in every sequence, trained on,
  sampled from and scored), today's date (warning), not prefix-stable (error when the last
  turn is affected, as the loop's DPO and BT scoring locate it; warning for earlier turns).
- **Judge versus policy**: another tokenizer or template is allowed (note): annotation passes
  each response as text and renders it with the judge's own template.
- **Lengths** longer than the model's positions (error).

Each finding is one line: who, level, what is wrong, what to do. :func:`run_check` prints
them and stops with a :class:`UserError` when there is an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from .config import ModelConfig
from .data.chat import TemplateRefused, encode_prompt, render
from .errors import UserError
from .models.loading import Loaded, load_parts

if TYPE_CHECKING:
    from .online.annotate import AnnotatorConfig
    from .online.config import LoopConfig

Level = Literal["error", "warning", "note"]
USER, REPLY, USER2, REPLY2, SYSTEM = "Ping 17?", "Pong 17.", "Ping 23?", "Pong 23.", "Rules 5."


@dataclass(frozen=True)
class Finding:
    who: str  # "policy", "reference" or "judge"
    level: Level
    problem: str
    fix: str

    def __str__(self) -> str:
        return f"{self.who}: {self.level}: {self.problem} -> {self.fix}"


# --------------------------------------------------------------------------- template checks


def check_template(who: str, tokenizer, earlier_turns: bool = True) -> list[Finding]:
    """BOS handling, default system prompt, date, prefix stability of a chat template
    (``earlier_turns``: also of turns before the last, which SFT on multi-turn data needs)."""
    if not getattr(tokenizer, "chat_template", None):
        return [Finding(who, "error", f"tokenizer {tokenizer.name_or_path!r} has no chat template",
                        "use a tokenizer with one (model.tokenizer=...)")]
    try:
        out = check_bos(who, tokenizer) + check_system_prompt(who, tokenizer)
        return out + check_prefix_stable(who, tokenizer, earlier_turns)
    except Exception as e:  # a template that raises on a plain conversation
        return [Finding(who, "error", f"the chat template fails on a plain user/assistant conversation "
                        f"({type(e).__name__}: {e})", "fix or replace the template")]


def check_bos(who: str, tokenizer) -> list[Finding]:
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    ids = encode_prompt(tokenizer, [{"role": "user", "content": USER}])
    lead = next((i for i, t in enumerate(ids) if t != bos), len(ids))
    adds = tokenizer("x")["input_ids"][:1] == [bos]
    name = tokenizer.bos_token
    if lead >= 2:
        return [Finding(who, "error", f"double BOS: the rendered chat template starts with {lead} {name!r} tokens",
                        f"write {name!r} once: remove the extra bos_token from the template")]
    if lead == 1 and adds:
        return [Finding(who, "warning", f"double BOS elsewhere: the template writes {name!r} and the tokenizer "
                        "adds another when text is encoded with special tokens (rlhf encodes the rendered "
                        "text without them: one BOS)",
                        "a tool that renders the template and encodes with special tokens (a transformers "
                        "pipeline, the official rewardbench scripts) sees two: set add_bos_token=false in "
                        "tokenizer_config.json or encode with add_special_tokens=False there")]
    if lead == 0 and adds:
        return [Finding(who, "warning", f"no BOS: the tokenizer adds {name!r} to plain text but the chat "
                        "template writes none, and rlhf encodes the rendered text without special tokens",
                        "start the chat template with {{ bos_token }} if the model was trained with one")]
    return []


def check_system_prompt(who: str, tokenizer) -> list[Finding]:
    out = []
    if "strftime_now" in tokenizer.chat_template:
        out.append(Finding(who, "warning", "the chat template writes today's date: the same conversation "
                           "tokenizes differently from one day to the next",
                           "remove the date from the template (or pin it) for reproducible runs"))
    text = render(tokenizer, [{"role": "user", "content": USER}], True)
    head = text[: text.index(USER)]
    try:
        explicit = render(tokenizer, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}], True)
    except TemplateRefused as e:
        return out + [Finding(who, "warning", f"{e}: a prompt or conversation with a system turn is a bad "
                              "record, an error naming it (data.on_bad=skip: skipped and counted)",
                              "give no system turns, or use a template that takes them")]
    if "system" not in head:
        return out
    default = head
    if SYSTEM in explicit:
        pre = explicit[: explicit.index(SYSTEM)]
        post = explicit[explicit.index(SYSTEM) + len(SYSTEM) : explicit.index(USER)]
        if head.startswith(pre) and head.endswith(post):
            default = head[len(pre) : len(head) - len(post)] or head
    shown = default if len(default) <= 90 else default[:87] + "..."
    return out + [Finding(who, "note", f"the chat template adds a default system prompt when the prompt has "
                          f"no system turn: {shown!r}",
                          "it is in every sequence trained on, sampled from and scored; give the prompts a "
                          "system turn of your own to replace it")]


def check_prefix_stable(who: str, tokenizer, earlier_turns: bool = True) -> list[Finding]:
    """The rendered prompt (with the generation prompt) must be the start of the rendered
    prompt + response, as text and as tokens; earlier turns must not be re-rendered."""
    msgs = [{"role": "user", "content": USER}, {"role": "assistant", "content": REPLY},
            {"role": "user", "content": USER2}, {"role": "assistant", "content": REPLY2}]
    full = render(tokenizer, msgs)
    if not full.startswith(render(tokenizer, msgs[:3], True)):
        return [Finding(who, "error", "the chat template is not prefix-stable: the prompt rendered with the "
                        "generation prompt is not the start of the prompt + response, so the response's "
                        "tokens cannot be located", "use a template that renders a turn the same whatever follows")]
    out = []
    if earlier_turns and not (render(tokenizer, msgs[:2]).startswith(render(tokenizer, msgs[:1], True))
            and full.startswith(render(tokenizer, msgs[:2]))):
        out.append(Finding(who, "warning", "the chat template re-renders earlier turns: multi-turn SFT data "
                           "cannot locate earlier assistant turns (the loop trains on the last turn only)",
                           "train SFT on the last turn only, or use a prefix-stable template"))
    prompt_ids = encode_prompt(tokenizer, msgs[:3])
    full_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    if full_ids[: len(prompt_ids)] != prompt_ids:
        out.append(Finding(who, "warning", "the prompt's tokens change when a response follows (the generation "
                           "prompt and the response merge into other tokens): the policy samples after other "
                           "tokens than it is trained and scored on",
                           "end the template's generation prompt with a special token or a newline"))
    return out


# --------------------------------------------------------------------------- model checks


def end_of_turn(tokenizer) -> tuple[str, int | None]:
    """(the text that closes an assistant turn, its first token id or None when empty)."""
    text = render(tokenizer, [{"role": "user", "content": USER}, {"role": "assistant", "content": REPLY}])
    after = text[text.rindex(REPLY) + len(REPLY) :]
    marker = after.strip() or after
    ids = tokenizer(marker, add_special_tokens=False)["input_ids"] if marker else []
    return marker, (ids[0] if ids else None)


def check_stops(who: str, loaded: Loaded, samplings: dict) -> list[Finding]:
    """The template's end-of-turn token must be a special token every sampling config stops on."""
    from .generation.sampling import stop_token_ids

    tok = loaded.tokenizer
    marker, eot = end_of_turn(tok)
    if eot is None:
        return [Finding(who, "error", "the chat template writes nothing after an assistant turn: SFT never "
                        "teaches the model to stop", "use a template that closes each turn with an end token")]
    special = set(tok.all_special_ids) | set(getattr(tok, "added_tokens_decoder", {}))
    if eot not in special:
        return [Finding(who, "error", f"the template closes an assistant turn with {marker!r}, which is not a "
                        "special token: generation cannot stop on it",
                        f"register it as a special token, or set generate.sampling.stop=[{marker!r}]")]
    base = stop_token_ids(loaded.generation_config, tok)
    out = []
    for where, sampling in samplings.items():
        stops = base + list(sampling.stop_token_ids)
        if eot not in stops:
            out.append(Finding(who, "error", f"the template ends an assistant turn with {marker!r} (id {eot}) but "
                               f"{where} stops only on {sorted(set(stops))}: responses run to max_new_tokens",
                               f"set {where}.stop_token_ids=[{eot}] (or add {eot} to eos_token_id in "
                               "generation_config.json)"))
    return out


def check_pad(who: str, loaded: Loaded) -> list[Finding]:
    """A BT judge needs a pad token, the same in its config, distinct from EOS when it reads the
    chat template (the rule ``annotate`` and ``rm eval`` enforce at load)."""
    tok = loaded.tokenizer
    pad = loaded.config.get_text_config().pad_token_id
    if tok.pad_token_id is None:
        problem = "no pad token"
    elif tok.pad_token_id == tok.eos_token_id and getattr(tok, "chat_template", None):
        problem = f"pad == EOS ({tok.pad_token!r}, id {tok.pad_token_id})"
    elif pad != tok.pad_token_id:
        problem = f"config.json's pad_token_id={pad} is not the tokenizer's pad {tok.pad_token_id}"
    else:
        return []
    return [Finding(who, "error", f"{problem}: the score head reads the wrong token, chosen and rejected can "
                    "score the same (annotate refuses such a model)",
                    "train the judge with `rlhf rm train` (it adds a dedicated <|pad|>), or give its "
                    "tokenizer and config.json one pad token distinct from EOS")]


def check_labels(who: str, tokenizer) -> list[Finding]:
    from .reward.pm import label_token_ids

    try:
        label_token_ids(tokenizer)
    except UserError as e:
        return [Finding(who, "error", str(e), "use a tokenizer/template that answers A or B as single tokens")]
    return []


def max_positions(config) -> int | None:
    text = config.get_text_config()
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(text, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_lengths(who: str, config, lengths: dict[str, int | None], room: tuple[str, ...] = ()) -> list[Finding]:
    """Each length must fit the model's positions; those in ``room`` must leave room for a prompt."""
    limit = max_positions(config)
    if limit is None:
        return []
    out = []
    for key, n in lengths.items():
        if n is None:
            continue
        if n > limit or (key in room and n >= limit):
            what = "leaves no room for the prompt within" if n <= limit else "is longer than"
            out.append(Finding(who, "error", f"{key}={n} {what} the model's {limit} positions",
                               f"set {key} below {limit}" + (" minus the longest prompt" if key in room else "")))
    return out


def check_same_tokenizer(policy, judge) -> list[Finding]:
    """A judge with another tokenizer or template than the policy's (allowed)."""
    def vocab(tok) -> dict:
        return {k: v for k, v in tok.get_vocab().items() if k != tok.pad_token}

    differs = []
    if vocab(policy) != vocab(judge):
        differs.append(f"tokenizer ({len(judge)} tokens, the policy's {len(policy)})")
    if getattr(policy, "chat_template", None) != getattr(judge, "chat_template", None):
        differs.append("chat template")
    if not differs:
        return []
    return [Finding("judge", "note", f"its {' and '.join(differs)} differ from the policy's",
                    "allowed: annotate passes each response as text and renders it with the judge's own "
                    "template, never the policy's token ids")]


# --------------------------------------------------------------------------- the loop


def check_loop(cfg: LoopConfig) -> list[Finding]:
    """Every finding for a loop config: policy (pi_0), reference, judge."""
    out: list[Finding] = []
    policy = _load_for_check("policy", cfg.policy, out)
    if policy is not None:
        out += check_template("policy", policy.tokenizer)
        samplings = {"generate.sampling": cfg.generate.sampling}
        if cfg.eval.prompts:
            samplings["eval.sampling"] = cfg.eval.sampling
        out += check_stops("policy", policy, samplings)
        lengths = {"generate.sampling.max_new_tokens": cfg.generate.sampling.max_new_tokens,
                   "dpo.data.max_length": cfg.dpo.data.max_length}
        if cfg.generate.backend == "vllm":
            lengths["generate.vllm.max_model_len"] = cfg.generate.vllm.max_model_len
        if cfg.eval.prompts:
            lengths["eval.sampling.max_new_tokens"] = cfg.eval.sampling.max_new_tokens
        out += check_lengths("policy", policy.config, lengths,
                             room=("generate.sampling.max_new_tokens", "eval.sampling.max_new_tokens"))
        # the reference is pi_0 (reference=sft) or the previous policy, saved with pi_0's tokenizer
        out += check_lengths("reference", policy.config, {"dpo.data.max_length": cfg.dpo.data.max_length})
    judge_cfg = cfg.annotate.annotator
    for c in judge_cfg.combine or [judge_cfg]:
        out += check_judge(c, policy)
    return out


def check_judge(judge_cfg: AnnotatorConfig, policy: Loaded | None) -> list[Finding]:
    """A reward function is imported and its signature checked; a judge model is loaded and its
    template, padding, labels and lengths checked."""
    out: list[Finding] = []
    if judge_cfg.kind in ("gold", "function"):
        from .reward.functions import load_function
        from .sandbox.rewards import GOLD

        try:
            load_function(judge_cfg.function or GOLD)
        except UserError as e:
            out.append(Finding("judge", "error", str(e), "fix annotator.function"))
        return out
    judge = _load_for_check("judge", ModelConfig(path=judge_cfg.path), out)
    if judge is None:
        return out
    tok = judge.tokenizer
    if judge_cfg.kind == "bt":
        out += check_pad("judge", judge)
        if getattr(tok, "chat_template", None):  # encoders read text pairs
            out += check_template("judge", tok, earlier_turns=False)
    elif judge_cfg.kind == "dpo":
        out += check_template("judge", tok, earlier_turns=False)
        ref = _load_for_check("judge reference", ModelConfig(path=judge_cfg.reference), out)
        if ref is not None and ref.tokenizer.get_vocab() != tok.get_vocab():
            out.append(Finding("judge", "error", f"its reference {judge_cfg.reference} has another tokenizer",
                               "annotator.reference must be the model the DPO judge was trained from"))
    else:
        out += check_template("judge", tok, earlier_turns=False) + check_labels("judge", tok)
    out += check_lengths("judge", judge.config, {"annotate.annotator.max_length": judge_cfg.max_length})
    if policy is not None:
        out += check_same_tokenizer(policy.tokenizer, tok)
    return out


def _load_for_check(who: str, spec: ModelConfig, out: list[Finding]) -> Loaded | None:
    try:
        return load_parts(spec)
    except UserError as e:
        out.append(Finding(who, "error", str(e), "fix the model path"))
        return None


def judge_name(judge: AnnotatorConfig) -> str:
    """kind and path (or function) of a judge, of each component of a combined one."""
    if judge.kind == "combine":
        return " + ".join(f"{c.weight:g} x {judge_name(c)}" for c in judge.combine)
    return judge.kind + {"gold": "", "function": f" {judge.function}"}.get(judge.kind, f" {judge.path}")


def run_check(cfg: LoopConfig) -> list[Finding]:
    """Print the findings of :func:`check_loop`, one a line; a :class:`UserError` if any is
    an error. The loop calls it before its first stage; ``rlhf check`` runs it alone."""
    findings = check_loop(cfg)
    for f in findings:
        print(f)
    errors = sum(f.level == "error" for f in findings)
    judge = cfg.annotate.annotator
    print(f"check: policy {cfg.policy.path}, reference {'pi_0' if cfg.reference == 'sft' else 'previous policy'}, "
          f"judge {judge_name(judge)}: {errors} error(s), "
          f"{len(findings) - errors} other finding(s)")
    if errors:
        raise UserError(f"check: {errors} error(s) above; fix them before the loop runs")
    return findings
