"""Tiny Hugging Face model directories built here: seeded configs, a tokenizer trained here.

No hub download: every test builds what it needs (HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "confidential models run inside a trusted execution environment",
    "sealed weights are decrypted only inside the enclave",
    "a key server releases the key to attested code",
    "hello world, hello tokenizer, hello sealed model",
] * 20
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
SPECIALS = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]


def train_tokenizer(vocab_size: int = 300) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", chat_template=CHAT_TEMPLATE)


def llama_config(vocab: int, **extra: Any) -> Any:
    from transformers import LlamaConfig

    options: dict[str, Any] = {
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
        "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    return LlamaConfig(vocab_size=vocab, **{**options, **extra})


def gpt2_config(vocab: int) -> Any:
    from transformers import GPT2Config

    return GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)


def bert_config(vocab: int, **extra: Any) -> Any:
    from transformers import BertConfig

    return BertConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4,
                      max_position_embeddings=128, pad_token_id=0, **extra)


def make_model_dir(root: Path, kind: str, *, seed: int = 0, shard: str | None = None,
                   bin_weights: bool = False) -> Path:
    """Save a seeded tiny model of ``kind`` with the trained tokenizer into ``root``."""
    from transformers import (
        BertForSequenceClassification,
        BertModel,
        GPT2LMHeadModel,
        LlamaForCausalLM,
    )

    tokenizer = train_tokenizer()
    vocab = len(tokenizer)
    classes = {"llama": (LlamaForCausalLM, llama_config), "gpt2": (GPT2LMHeadModel, gpt2_config),
               "bert": (BertModel, bert_config),
               "bert-cls": (BertForSequenceClassification,
                            lambda v: bert_config(v, num_labels=3))}
    cls, make_config = classes[kind]
    torch.manual_seed(seed)
    model = cls(make_config(vocab)).eval()
    root.mkdir(parents=True, exist_ok=True)
    if bin_weights:
        model.config.architectures = [cls.__name__]
        model.config.save_pretrained(root)
        torch.save(model.state_dict(), root / "pytorch_model.bin")
    else:
        model.save_pretrained(root, **({"max_shard_size": shard} if shard else {}))
    tokenizer.save_pretrained(root)
    return root
