"""Every mistake a user can make with their input is one line: exit code 2, ``error:`` and what
is wrong (for a record: the file, the line and the field), no traceback, and no output that
looks finished. One table of cases through the command line, as a user meets them."""

import gzip
import json
import re
import shutil

import pytest
import yaml

from rlhf_workflow.cli import main

PAIR = {"prompt": "What is 2 + 3?", "chosen": "Answer: 5", "rejected": "Answer: 6"}
SFT = {"messages": [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}]}
PROMPT = {"prompt": "What is 2 + 3?", "id": "p1"}


def _sft(**kw):
    return {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", **kw}]}


GOOD = {"sft": SFT, "dpo": PAIR, "rm train": PAIR, "pm train": PAIR, "rm eval": PAIR, "generate": PROMPT,
        "annotate": {"prompt": "q", "responses": ["a"], "meta": {"skill": "add", "answer": "1"}},
        "pairs": {"prompt": "q", "responses": ["a", "b"], "rewards": [1.0, 0.0]}}


def _after_good(command, bad):
    """A file whose second line is ``bad`` (a raw string is written as it is)."""
    return [GOOD[command], bad]


LATIN_1 = json.dumps({"prompt": "Qu'est-ce qu'un caf\u00e9 ?"}, ensure_ascii=False).encode("latin-1") + b"\n"


# (name, command, records of the file (None: no file), extra args, message regex)
CASES = [(n, c, b if b is None or isinstance(b, list) else _after_good(c, b), e, m) for n, c, b, e, m in [
    ("sft: no messages", "sft", {"text": "hi"}, [], r"data.jsonl, line 2: field 'messages': Field required"),
    ("sft: no assistant turn", "sft", {"messages": [{"role": "user", "content": "q"}]}, [],
     r"line 2: field 'messages': needs at least one assistant message"),
    ("sft: blank assistant turn", "sft", _sft(content="   "), [],
     r"line 2: field 'messages': an assistant message is empty or only whitespace"),
    ("sft: unknown role", "sft", {"messages": [{"role": "robot", "content": "q"}]}, [],
     r"line 2: field 'messages.0.role': Input should be"),
    ("sft: content not text", "sft", _sft(content=5), [], r"line 2: field 'messages.1.content': Input should be a valid string"),
    ("sft: not JSON", "sft", "{not json", [], r"data.jsonl, line 2: not valid JSON"),
    ("sft: not an object", "sft", "[1, 2]\n", [], r"line 2: expected a JSON object, got list"),
    ("sft: missing file", "sft", None, [], r"data file not found: .*missing.jsonl"),
    ("dpo: blank prompt", "dpo", {**PAIR, "prompt": " \n "}, [], r"line 2: field 'prompt': must not be empty or only whitespace"),
    ("dpo: chosen == rejected", "dpo", {**PAIR, "rejected": "Answer: 5"}, [],
     r"line 2: field 'chosen': equal to rejected \(the pair carries no preference\)"),
    ("dpo: no rejected", "dpo", {"prompt": "q", "chosen": "a"}, [], r"line 2: field 'rejected': Field required"),
    ("dpo: chosen a number", "dpo", {**PAIR, "chosen": 5}, [], r"line 2: field 'chosen': Input should be a valid string"),
    ("dpo: chosen ends with a user turn", "dpo", {**PAIR, "chosen": [{"role": "user", "content": "a"}]}, [],
     r"line 2: field 'chosen': must end with a non-empty assistant message"),
    ("dpo: empty file", "dpo", [], [], r"data.jsonl: no records"),
    ("dpo: response that cannot fit", "dpo", {**PAIR, "chosen": "five " * 200}, ["data.max_length=32", "data.on_long=error"],
     r"data.jsonl, line 2: a response does not fit in data.max_length=32"),
    ("rm: chosen == rejected", "rm train", {**PAIR, "rejected": "Answer: 5"}, [],
     r"line 2: field 'chosen': equal to rejected"),
    ("rm: margin not a number", "rm train", [{**PAIR, "m": "big"}], ["data.margin_field=m"],
     r"line 1: field 'm': the margin must be a number"),
    ("pm: blank chosen", "pm train", {**PAIR, "chosen": ""}, [], r"line 2: field 'chosen': must not be empty"),
    ("rm eval: bad pair", "rm eval", {**PAIR, "rejected": None}, [], r"line 2: field 'rejected': Input should be"),
    ("generate: blank prompt", "generate", {"prompt": "\t "}, [], r"line 2: field 'prompt': must not be empty or only whitespace"),
    ("generate: no prompts", "generate", [], [], r"no prompts to generate from"),
    ("generate: prompt too long for the model", "generate", {"prompt": "seven " * 400},
     ["sampling.max_new_tokens=200"], r"data.jsonl, line 2: the prompt has \d+ tokens, and the model.s 512 positions leave room for 312"),
    ("generate: a Latin-1 file", "generate", LATIN_1, [],
     r"data.jsonl, line 2: not UTF-8 text \(byte 0xe9 at byte 32 of the line; save the file as UTF-8\)"),
    ("generate: a damaged gzip file", "generate", [gzip.compress(json.dumps(PROMPT).encode() * 50)[:40]], [],
     r"data.jsonl: a damaged gzip file"),
    ("generate: an image part", "generate",
     {"prompt": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}]}]}, [],
     r"line 2: field 'prompt.0.content': only text parts are supported \(part 0 is 'image_url'\)"),
    ("generate: an id that is a float", "generate", {"prompt": "q", "id": 1.5}, [],
     r"line 2: field 'id': an id is a string or an integer, got 1.5"),
    ("annotate: no responses", "annotate", {"prompt": "q", "responses": []}, [],
     r"line 2: field 'responses': List should have at least 1 item"),
    ("pairs: no rewards", "pairs", {"prompt": "q", "responses": ["a", "b"]}, [], r"needs one reward per response"),
    ("config: unknown key", "sft", SFT, ["optim.lrr=1"], r"unknown config key 'optim.lrr'; valid keys at optim: lr, "),
    ("config: boolean for a number", "generate", PROMPT, ["sampling.n=true"],
     r"config key 'sampling.n': expected a number, not a boolean"),
    ("config: out of range", "sft", SFT, ["optim.lr=-1"], r"config key 'optim.lr': Input should be greater than 0"),
    ("config: bad choice", "sft", SFT, ["train.strategy=mpi"], r"config key 'train.strategy': Input should be 'auto', "),
    ("config: prompt longer than the sequence", "dpo", PAIR, ["data.max_prompt_length=64", "data.max_length=64"],
     r"max_prompt_length \(64\) must be smaller than max_length \(64\)"),
    ("config: not key=value", "sft", SFT, ["optim.lr"], r"override 'optim.lr=true'|not of the form key=value"),
    ("model: path not found", "sft", SFT, ["model.path=/nowhere/model"], r"model path not found: /nowhere/model"),
    ("model: a folder that is not a model", "sft", SFT, ["model.path=DATA_DIR"],
     r"holds no tokenizer: expected tokenizer.json or tokenizer_config.json .*; found data.jsonl"),
    ("model: a folder with a tokenizer only", "dpo", PAIR, ["model.path=TOKENIZER_ONLY"],
     r"is not a Hugging Face model folder: expected config.json and \*.safetensors weights"),
    ("model: pickled weights only", "dpo", PAIR, ["model.path=PICKLED"], r"holds only pickled weights \(pytorch_model.bin\)"),
    ("model: truncated weights", "dpo", PAIR, ["model.path=TRUNCATED"], r"a weight file is corrupt or truncated"),
]]

COMMANDS = {  # what each command needs besides its data file
    "sft": ["model.path=MODEL", "data.train=DATA", "data.max_length=64", "train.max_steps=1", "train.output_dir=OUT"],
    "dpo": ["model.path=MODEL", "data.train=DATA", "data.max_length=64", "train.max_steps=1", "train.output_dir=OUT"],
    "rm train": ["model.path=MODEL", "data.train=DATA", "data.test=DATA", "data.max_length=64", "train.max_steps=1",
                 "train.output_dir=OUT"],
    "pm train": ["model.path=MODEL", "data.train=DATA", "data.test=DATA", "data.max_length=128", "train.max_steps=1",
                 "train.output_dir=OUT"],
    "rm eval": ["model.path=MODEL", "input=DATA", "out=OUT/eval.json"],
    "generate": ["model.path=MODEL", "input=DATA", "out=OUT/rollouts.jsonl", "sampling.n=1", "sampling.max_new_tokens=4"],
    "annotate": ["annotator.path=MODEL", "annotator.kind=gold", "input=DATA", "out=OUT/scored.jsonl"],
    "pairs": ["input=DATA", "out=OUT/pairs.jsonl"],
}


@pytest.fixture(scope="module")
def broken_models(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("broken")
    pickled, truncated = root / "pickled", root / "truncated"
    for d in (pickled, truncated):
        shutil.copytree(tiny_model, d)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    tokenizer_only = root / "tokenizer_only"
    shutil.copytree(tiny_model, tokenizer_only)
    (tokenizer_only / "model.safetensors").unlink()
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return {"PICKLED": pickled, "TRUNCATED": truncated, "TOKENIZER_ONLY": tokenizer_only}


def test_the_table_has_at_least_thirty_cases():
    assert len(CASES) >= 30 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("name,command,bad,extra,message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_no_output(name, command, bad, extra, message, tiny_model, trained_rm,
                                                      broken_models, tmp_path, capsys):
    data = tmp_path / ("missing.jsonl" if bad is None else "data.jsonl")
    if bad is not None:
        data.write_bytes(b"".join(r if isinstance(r, bytes) else r.encode() if isinstance(r, str)
                                  else json.dumps(r).encode() + b"\n" for r in bad))
    out = tmp_path / "out"
    subst = {"MODEL": str(trained_rm if command == "rm eval" else tiny_model), "DATA": str(data), "OUT": str(out),
             "DATA_DIR": str(tmp_path), **{k: str(v) for k, v in broken_models.items()}}
    args = [re.sub(r"\b(MODEL|DATA_DIR|DATA|OUT|PICKLED|TRUNCATED|TOKENIZER_ONLY)\b", lambda m: subst[m.group(1)], a)
            for a in COMMANDS[command] + extra]
    capsys.readouterr()
    code = main([*command.split(), *args])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, err[-2000:]
    assert len(lines) == 1 and re.search(message, lines[0]), err[-2000:]
    assert "Traceback" not in err
    finished = [p for p in (out / "model", out / "eval.json", out / "rollouts.jsonl", out / "scored.jsonl",
                            out / "pairs.jsonl", out / "train_result.json") if p.exists()]
    assert finished == []


def test_a_byte_order_mark_gzip_text_parts_and_integer_ids_are_read(tiny_model, tmp_path):
    """A BOM is skipped; a gzip file is read as it is; text parts are one text; an integer id
    stays an integer in the output (7 and "7" are two ids)."""
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is"}, {"type": "text", "text": "2 + 3?"}]}]
    records = [PROMPT, {"prompt": parts, "id": 7}, {"prompt": "What is 2 + 3?", "id": "7"}]
    for name, data in (("prompts.jsonl", "\ufeff".encode() + json.dumps(PROMPT).encode() + b"\n"),
                       ("prompts.jsonl.gz", gzip.compress("".join(json.dumps(r) + "\n" for r in records).encode()))):
        (tmp_path / name).write_bytes(data)
        out = tmp_path / f"{name}.out.jsonl"
        assert main(["generate", f"model.path={tiny_model}", f"input={tmp_path / name}", f"out={out}",
                     "sampling.n=1", "sampling.max_new_tokens=2"]) == 0
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert [r["id"] for r in rows] == ["p1", 7, "7"][: len(rows)] and len(rows) == (1 if name.endswith("l") else 3)
    assert rows[1]["prompt"] == [{"role": "user", "content": "What is\n2 + 3?"}]


def test_bad_yaml_files_are_one_line(tmp_path, capsys):
    cases = {"missing.yaml": r"config file not found", "bad.yaml": r"not valid YAML", "list.yaml": r"top level must be a mapping",
             "key.yaml": r"key.yaml, line 3: key 'optim.lr' is given twice \(first on line 2\); keep one",
             "section.yaml": r"section.yaml, line 5: key 'optim' is given twice \(first on line 1\)"}
    (tmp_path / "bad.yaml").write_text("a: [1, 2\n")
    (tmp_path / "key.yaml").write_text("optim:\n  lr: 1.0e-3\n  lr: 0.5\n")
    (tmp_path / "section.yaml").write_text("optim:\n  lr: 1.0e-3\ntrain:\n  max_steps: 3\noptim:\n  warmup_ratio: 0\n")
    (tmp_path / "list.yaml").write_text(yaml.safe_dump([1, 2]))
    for name, message in cases.items():
        assert main(["sft", "--config", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert re.search(message, err) and err.count("\n") == 1, err
    # YAML's merge key overrides on purpose: not a repeated key
    (tmp_path / "merge.yaml").write_text("optim: &o {lr: 1.0e-3}\nrm_optim:\n  <<: *o\n  lr: 2.0e-3\n")
    assert main(["sft", "--config", str(tmp_path / "merge.yaml")]) == 2
    assert "unknown config key 'rm_optim'" in capsys.readouterr().err


# --------------------------------------------------------------------------- records a chat template refuses

SYSTEM_REFUSED = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"


@pytest.fixture(scope="module")
def strict_model(tiny_model, tmp_path_factory):
    """The tiny model with a Gemma-style template: a system turn raises."""
    out = tmp_path_factory.mktemp("strict") / "model"
    shutil.copytree(tiny_model, out)
    (out / "chat_template.jinja").write_text(SYSTEM_REFUSED + (out / "chat_template.jinja").read_text())
    return out


SYSTEM = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"}]
REFUSED = {  # command: (records, the second refused; what a skipping run must have written)
    "sft": ([SFT, {"messages": SYSTEM + [{"role": "assistant", "content": "5"}]}, SFT], "model"),
    "dpo": ([PAIR, {**PAIR, "prompt": SYSTEM}, PAIR], "model"),
    "generate": ([PROMPT, {"prompt": SYSTEM, "id": "p2"}, {"prompt": "What is 1 + 1?", "id": "p3"}],
                 "rollouts.jsonl"),
}


@pytest.mark.parametrize("command", REFUSED)
def test_a_record_the_chat_template_refuses_is_one_line_or_skipped(command, strict_model, tmp_path, capsys):
    records, product = REFUSED[command]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "out"
    args = [a.replace("MODEL", str(strict_model)).replace("DATA", str(data)).replace("OUT", str(out))
            for a in COMMANDS[command]]
    capsys.readouterr()
    assert main([*command.split(), *args]) == 2
    err = capsys.readouterr().err
    where = "line 2 (id 'p2')" if command == "generate" else "line 2"
    assert re.search(rf"^error: .*data.jsonl, {re.escape(where)}: the chat template of .* refused the conversation: "
                     r"System role not supported", err, re.M), err[-2000:]
    assert "Traceback" not in err and not (out / product).exists()
    skip = "on_bad=skip" if command == "generate" else "data.on_bad=skip"
    assert main([*command.split(), *args, skip]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"1 skipped: the chat template refused them|skipped 1 x refused by the chat template", printed)
    if command == "generate":
        assert [json.loads(x)["id"] for x in (out / product).read_text().splitlines()] == ["p1", "p3"]
    assert (out / product).exists()
