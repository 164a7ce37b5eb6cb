"""Excitor/Adapter as a PEFT method: get_peft_model, disable_adapter, save/load (also in a fresh process),
Trainer with checkpoint and resume, TRL's SFTTrainer, AdaptionPrompt conversion, the README's lines."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import AdaptionPromptConfig, PeftModel, get_peft_model
from safetensors import safe_open

import excitor_kernels
from excitor_kernels.patch import excitor_layers
from excitor_kernels.peft_method import from_adaption_prompt, to_adaption_prompt
from tiny_models import HEADS, HIDDEN, KV_HEADS, VOCAB, rel, tiny_model, tokens

ROOT = Path(__file__).resolve().parent.parent
OPTIONS = [dict(mode="excitor"), dict(mode="excitor", sim_rank=3, gate_scale=True), dict(mode="adapter")]


def config(**kw):
    return excitor_kernels.ExcitorConfig(task_type="CAUSAL_LM", num_prompts=4, num_layers=2, backend="reference", **kw)


def randomize(peft_model, seed=2):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen))
    return peft_model


@pytest.mark.parametrize("options", OPTIONS)
def test_get_peft_model_disable_save_and_load(options, tmp_path):
    x = tokens("cpu")
    with torch.no_grad():
        base_logits = tiny_model()(input_ids=x).logits
    model = randomize(get_peft_model(tiny_model(), config(**options)))
    trainable, total = model.get_nb_trainable_parameters()
    d = HIDDEN // HEADS
    per_layer = 4 * HIDDEN + HEADS + (3 * (HIDDEN + KV_HEADS * d) + 1 if "sim_rank" in options else 0)
    assert trainable == 2 * per_layer
    with torch.no_grad():
        logits = model(input_ids=x).logits
        with model.disable_adapter():
            assert not excitor_layers(model.base_model.model)
            assert torch.equal(model(input_ids=x).logits, base_logits)
        assert torch.equal(model(input_ids=x).logits, logits)
    assert rel(logits, base_logits) > 1e-3
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert len(keys) == sum(1 for p in model.parameters() if p.requires_grad)
    assert all(".self_attn." in k and k.split(".self_attn.")[1].split(".")[0] in
               ("prompts", "gate", "gate_scale", "sim_down", "sim_up") for k in keys)
    loaded = PeftModel.from_pretrained(tiny_model(), tmp_path)
    assert loaded.peft_config["default"].mode == options["mode"]
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=x).logits, logits)


def test_reload_in_a_fresh_process(tmp_path):
    x = tokens("cpu")
    model = randomize(get_peft_model(tiny_model(), config(sim_rank=2)))
    with torch.no_grad():
        torch.save(model(input_ids=x).logits, tmp_path / "logits.pt")
    model.save_pretrained(tmp_path / "adapter")
    script = f"""
import sys, torch
sys.path.insert(0, {str(ROOT / 'tests')!r})
import excitor_kernels
from peft import PeftModel
from tiny_models import tiny_model, tokens
model = PeftModel.from_pretrained(tiny_model(), {str(tmp_path / 'adapter')!r})
with torch.no_grad():
    assert torch.equal(model(input_ids=tokens("cpu")).logits, torch.load({str(tmp_path / 'logits.pt')!r}))
print("same logits")
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "same logits" in out.stdout, out.stderr[-2000:]


class _Data(torch.utils.data.Dataset):
    def __init__(self, n=8, length=12):
        gen = torch.Generator().manual_seed(7)
        self.rows = torch.randint(3, VOCAB, (n, length), generator=gen)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


def _trainer(model, out, max_steps):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(out), max_steps=max_steps, save_steps=2, per_device_train_batch_size=2,
                             learning_rate=5e-2, report_to=[], use_cpu=True, logging_steps=1, seed=0,
                             dataloader_num_workers=0)
    return Trainer(model=model, args=args, train_dataset=_Data())


def test_trainer_checkpoint_and_resume(tmp_path):
    full = get_peft_model(tiny_model(), config(sim_rank=2))
    _trainer(full, tmp_path / "full", 4).train()
    expected = {n: p.detach().clone() for n, p in full.named_parameters() if p.requires_grad}
    assert (tmp_path / "full" / "checkpoint-2" / "adapter_model.safetensors").exists()
    resumed = get_peft_model(tiny_model(), config(sim_rank=2))
    _trainer(resumed, tmp_path / "full", 4).train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    got = {n: p.detach() for n, p in resumed.named_parameters() if p.requires_grad}
    assert set(got) == set(expected)
    moved = get_peft_model(tiny_model(), config(sim_rank=2))
    for name, p in got.items():
        assert rel(p, expected[name]) <= 1e-5, name
    assert any(rel(p, dict(moved.named_parameters())[n]) > 1e-3 for n, p in got.items()), "training must move them"


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def test_trl_sft_trainer_with_the_config(tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    gen = torch.Generator().manual_seed(3)
    texts = [" ".join(f"w{int(t)}" for t in torch.randint(3, VOCAB, (10,), generator=gen)) for _ in range(8)]
    args = SFTConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, learning_rate=5e-2,
                     report_to=[], use_cpu=True, logging_steps=1, save_strategy="no", max_length=32, bf16=False)
    trainer = SFTTrainer(model=tiny_model(), args=args, train_dataset=Dataset.from_dict({"text": texts}),
                         processing_class=_tokenizer(), peft_config=config(mode="adapter"))
    assert isinstance(trainer.model, PeftModel) and len(excitor_layers(trainer.model.base_model.model)) == 2
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    assert any(not torch.equal(after[n], b) for n, b in before.items())
    trainer.model.save_pretrained(tmp_path / "adapter")
    x = tokens("cpu")
    with torch.no_grad():
        assert torch.equal(PeftModel.from_pretrained(tiny_model(), tmp_path / "adapter")(input_ids=x).logits,
                           trainer.model(input_ids=x).logits)


def test_adaption_prompt_conversion_in_one_call():
    x = tokens("cpu")
    ap = get_peft_model(tiny_model(), AdaptionPromptConfig(adapter_len=4, adapter_layers=2, task_type="CAUSAL_LM"))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in ap.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen))
        want = ap(input_ids=x).logits
    ours = from_adaption_prompt(ap, backend="reference")
    assert ours.peft_config["default"].peft_type == "EXCITOR"
    with torch.no_grad():
        assert rel(ours(input_ids=x).logits, want) <= 1e-5
    back = to_adaption_prompt(ours)
    with torch.no_grad():
        assert rel(back(input_ids=x).logits, want) <= 1e-5
    with pytest.raises(ValueError, match="mode='adapter'"):
        to_adaption_prompt(get_peft_model(tiny_model(), config()))


def test_the_readme_lines(tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text()
    code = re.search(r"<!-- peft-lines -->\n```python\n(.*?)```", text, re.S).group(1)
    assert len([line for line in code.splitlines() if line.strip()]) == 5
    monkeypatch.chdir(tmp_path)
    scope = {"model": tiny_model(), "fresh_base_model": tiny_model()}
    exec(compile(code, "README.md", "exec"), scope)
    x = tokens("cpu")
    with torch.no_grad():
        assert torch.equal(scope["reloaded"](input_ids=x).logits, scope["peft_model"](input_ids=x).logits)
    assert (tmp_path / "excitor-adapter" / "adapter_config.json").exists()
