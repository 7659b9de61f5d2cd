"""Each rank its share: a model built on the meta device, sharded with FSDP2 on 2 real ranks and
filled from the safetensors files equals ``from_pretrained``'s (a new head initialised as it
initialises one, rows grown for a new token zero, a tied head sharing the embedding); a
checkpoint it cannot read that way is left to the plain loader."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import torch
from safetensors.torch import load_file, save_file

from rlhf_workflow.config import ModelConfig
from rlhf_workflow.models.sharded import load_sharded

SCRIPT = textwrap.dedent('''
    import sys, torch
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM
    from rlhf_workflow.config import ModelConfig
    from rlhf_workflow.distributed import setup
    from rlhf_workflow.models.loading import load_with_info
    from rlhf_workflow.models.sharded import load_sharded

    rank, world, device = setup()
    assert world == 2

    def shard(model):
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)

    def grow(model):  # three new token rows, as a new pad token adds one
        old = model.get_input_embeddings().num_embeddings
        model.resize_token_embeddings(old + 3, mean_resizing=False)
        with torch.no_grad():
            for emb in (model.get_input_embeddings(), model.get_output_embeddings()):
                if emb is not None:
                    emb.weight[old:].zero_()

    for path, head in ((sys.argv[1], "causal_lm"), (sys.argv[1], "seq_cls"), (sys.argv[2], "causal_lm")):
        kwargs = {"num_labels": 1} if head == "seq_cls" else {}
        torch.manual_seed(7)
        sharded, fresh = load_sharded(ModelConfig(path=path), shard, device, head, grow, **kwargs)
        torch.manual_seed(7)
        whole, missing = load_with_info(ModelConfig(path=path), head, **kwargs)
        grow(whole)
        assert fresh == missing, (fresh, missing)
        full = {k: v.full_tensor() for k, v in sharded.state_dict().items()}
        assert full.keys() == whole.state_dict().keys()
        for k, v in whole.state_dict().items():
            assert torch.equal(full[k], v), (path, head, k)
        tied = sharded.config.tie_word_embeddings
        assert tied == (path == sys.argv[2])
        if tied:
            assert sharded.lm_head.weight is sharded.model.embed_tokens.weight
        ids = torch.tensor([[5, 17, 42, 99, 7]])
        with torch.no_grad():
            a, b = sharded.eval()(ids).logits, whole.eval()(ids).logits
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
        if rank == 0:  # (both ranks assert; one reports)
            print("checked", head, "tied" if tied else "untied", "new:", fresh, flush=True)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()  # (a rank exiting inside its group can abort at shutdown)
''')


def test_two_ranks_load_their_shards_as_from_pretrained_loads_the_whole(tiny_model, tmp_path):
    tied = tmp_path / "tied"
    _tied_copy(tiny_model, tied)
    script = tmp_path / "check.py"
    script.write_text(SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(tiny_model), str(tied)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    lines = sorted(line for line in done.stdout.splitlines() if line.startswith("checked"))
    assert lines == sorted(f"checked {what}" for what in (
        "causal_lm untied new: []", "seq_cls untied new: ['score.weight']", "causal_lm tied new: []"))


def _tied_copy(src, out):
    """The tiny model with its LM head tied to the embedding (as SmolLM2 and Llama-3.2 1B are):
    the config says so and the checkpoint holds the embedding only."""
    import json
    import shutil

    shutil.copytree(src, out)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    weights = load_file(src / "model.safetensors")
    save_file({k: v for k, v in weights.items() if k != "lm_head.weight"}, out / "model.safetensors",
              metadata={"format": "pt"})


def test_checkpoints_it_cannot_read_by_name_are_left_to_the_plain_loader(tiny_model, tmp_path):
    def no_shard(model):
        raise AssertionError("sharding was attempted")

    cpu = torch.device("cpu")
    assert load_sharded(ModelConfig(path=str(tmp_path / "m.gguf")), no_shard, cpu) is None
    assert load_sharded(ModelConfig(path="org/hub-model"), no_shard, cpu) is None
    renamed = tmp_path / "renamed"  # weights under names the model does not use
    renamed.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (renamed / f).write_bytes((tiny_model / f).read_bytes())
    weights = load_file(tiny_model / "model.safetensors")
    save_file({k.replace("layers.", "blocks."): v for k, v in weights.items()}, renamed / "model.safetensors")
    assert load_sharded(ModelConfig(path=str(renamed)), no_shard, cpu) is None
