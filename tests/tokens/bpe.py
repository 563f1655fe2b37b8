"""A tiny byte-level BPE tokenizer trained on the fly (no download), for tests that need real sub-word pieces."""

from __future__ import annotations

from functools import lru_cache

TRAINING_TEXT = [
    "King is to queen as man is to woman.", "Happy means joyful. Big versus small.",
    "If it rains, the grass gets wet because water falls.", "2 + 3 = 5 and 3.14 - 2 = 1.14",
    "def hello(x):\n    if x > 0:\n        return x + 1\n    return -2\n",
    "The elephant is bigger than the mouse. What is a dog? A dog is an animal.",
    "Paris is to France as Rome is to Italy. She did not go to the park.",
] * 20


@lru_cache(maxsize=1)
def tiny_bpe_tokenizer(vocab_size: int = 300):
    """A ``PreTrainedTokenizerFast`` (byte-level BPE, BOS ``<s>`` added, offsets available)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TRAINING_TEXT, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
