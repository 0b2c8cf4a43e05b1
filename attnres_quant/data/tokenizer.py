"""Byte-level BPE tokenizer trained with the ``tokenizers`` library, saved in HF format.

Pre-tokenisation isolates every newline (so a prompt ending in ``"\n"`` -- HumanEval
style -- tokenizes exactly as inside the training text, where ``"\n    return"``
would otherwise merge into one token), splits every digit into its own piece (helps
arithmetic) and then applies GPT-2 style byte-level splitting; the vocabulary starts from the 256 byte
symbols, so any text round-trips.  Special tokens: ``<pad>`` (0), ``<bos>`` (1),
``<eos>`` (2), ``<unk>`` (3, never produced).  The saved directory loads with
``AutoTokenizer.from_pretrained(dir)`` (``PreTrainedTokenizerFast``).
"""

from __future__ import annotations

from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split("\n", behavior="isolated"),
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    for i, name in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(name) == i, (name, tok.token_to_id(name))
    return tok


def to_hf(tok: Tokenizer, model_max_length: int = 2048):
    """Wrap as ``PreTrainedTokenizerFast`` (no automatic BOS: callers prepend it)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )


def token_byte_lengths(hf_tokenizer) -> list[int]:
    """UTF-8 byte length of every token id (0 for special tokens); for bits-per-byte."""
    specials = set(hf_tokenizer.all_special_ids)
    vocab = hf_tokenizer.convert_ids_to_tokens(list(range(len(hf_tokenizer))))
    # byte-level BPE: each character of a token string stands for one byte
    return [0 if i in specials else len(t) for i, t in enumerate(vocab)]
