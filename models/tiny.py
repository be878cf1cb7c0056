"""Tiny random text encoders built locally (never downloaded): the demo's text encoder and the tests'.

A decoder-only LLM (Gemma architecture, 2 layers) with a word-level tokenizer that adds <bos> like Gemma's, or a T5
encoder whose tokenizer appends </s>. Random weights still give every word its own features, which is all a model
trained on those features needs to tell "red" from "blue".
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch

BASE_WORDS = (
    "a an the of on in with and is at by to from under over near "
    "red blue green yellow black white grey gray orange purple big small tiny large old new bright dark "
    "cat dog bird fish horse house tree car boat flower mountain river sky city road forest beach "
    "photo painting drawing sketch render portrait landscape cinematic sunset night morning "
    "circle square triangle background tone pitched low middle high sphere cube cylinder"
).split()
SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>"]


def vocabulary(extra_text: Iterable[str] = ()) -> list[str]:
    """Base words plus every lower-case word of ``extra_text`` (e.g. a data set's captions), de-duplicated, in order."""
    words = list(BASE_WORDS)
    seen = set(words)
    for text in extra_text:
        for word in text.lower().replace(",", " ").replace(".", " ").split():
            if word not in seen:
                seen.add(word)
                words.append(word)
    return words


def word_level_tokenizer(words: list[str], style: str = "gemma"):
    """A PreTrainedTokenizerFast over ``words``: ``gemma`` puts <bos> first ("" → [<bos>]), ``t5`` appends <eos>.

    Saved with left padding on purpose (Gemma's default): the TextEncoder must force right padding itself.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIAL_TOKENS + [w for w in words if w not in SPECIAL_TOKENS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if style == "gemma":
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])])
    elif style == "t5":
        tok.post_processor = processors.TemplateProcessing(
            single="$A <eos>", pair="$A $B <eos>", special_tokens=[("<eos>", vocab["<eos>"])])
    else:
        raise ValueError(f"unknown tokenizer style {style!r}; choose gemma or t5")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                        unk_token="<unk>", padding_side="left")
    return tokenizer, vocab


def make_tiny_text_encoder(path, hidden_size: int = 32, seed: int = 0, words: list[str] | None = None) -> str:
    """A tiny random GemmaModel + tokenizer saved in ``path``; returns the path."""
    from transformers import GemmaConfig, GemmaModel

    tokenizer, vocab = word_level_tokenizer(words or vocabulary(), "gemma")
    config = GemmaConfig(
        vocab_size=len(vocab), hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=hidden_size // 2, max_position_embeddings=512,
        pad_token_id=vocab["<pad>"], bos_token_id=vocab["<bos>"], eos_token_id=vocab["<eos>"],
    )
    torch.manual_seed(seed)
    GemmaModel(config).eval().save_pretrained(Path(path))
    tokenizer.save_pretrained(Path(path))
    return str(path)


def make_tiny_t5(path, d_model: int = 32, seed: int = 0, words: list[str] | None = None) -> str:
    """A tiny random T5EncoderModel + tokenizer saved in ``path``; returns the path."""
    from transformers import T5Config, T5EncoderModel

    tokenizer, vocab = word_level_tokenizer(words or vocabulary(), "t5")
    config = T5Config(vocab_size=len(vocab), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2, num_heads=4,
                      pad_token_id=vocab["<pad>"], eos_token_id=vocab["<eos>"], decoder_start_token_id=0)
    torch.manual_seed(seed)
    T5EncoderModel(config).eval().save_pretrained(Path(path))
    tokenizer.save_pretrained(Path(path))
    return str(path)
