"""Tiny offline models and tokenizers for tests, examples and CPU benchmarks.

Nothing here touches a model hub: the tokenizer is built with the `tokenizers` library
(one token per character, plus ChatML special tokens) and the model from a config.

Note from DESIGN.md: a tiny random model with the default init (std 0.02) gives
near-uniform logits that LoRA alone cannot sharpen, so learning tests use a larger
`initializer_range`.
"""

from __future__ import annotations

import string

import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<pad>", "<|im_start|>", "<|im_end|>", "<unk>"]
CHARACTERS = string.ascii_letters + string.digits + string.punctuation + " \n"


def tiny_tokenizer(chat_template: bool = True, pad_token: bool = True):
    """A character-level `PreTrainedTokenizerFast` with ChatML special tokens.

    Ids: 0 `<pad>`, 1 `<|im_start|>`, 2 `<|im_end|>` (eos), 3 `<unk>`, then one id per
    character of `CHARACTERS` (vocab size 4 + 96 = 100). Round-trips any ASCII text.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in CHARACTERS:
        vocab[ch] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # Split into single characters so that every character is one token.
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        eos_token="<|im_end|>",
        pad_token="<pad>" if pad_token else None,
        additional_special_tokens=["<|im_start|>"],
    )
    if chat_template:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_model(
    vocab_size: int = 100,
    hidden_size: int = 64,
    num_layers: int = 2,
    initializer_range: float = 0.3,
    seed: int = 0,
    tie_word_embeddings: bool = True,
):
    """A 2-layer Qwen3 causal LM with random weights (float32, CPU, eval mode)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden_size // 4,
        max_position_embeddings=512,
        initializer_range=initializer_range,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=None,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    model.eval()
    return model


def tiny_gpt2(eos_token_id: int = 2, pad_token_id: int = 0):
    """A tiny 2-layer GPT-2 with random weights: learned ABSOLUTE positions, so wrong
    position ids under left padding change its outputs (Qwen3's RoPE is shift-invariant and
    would not notice)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=100, n_positions=256, n_embd=32, n_layer=2, n_head=2,
                        initializer_range=0.3, bos_token_id=None, eos_token_id=eos_token_id,
                        pad_token_id=pad_token_id)
    return GPT2LMHeadModel(config).eval()


def chat_prompt(tokenizer, content: str) -> str:
    """One user turn through the tokenizer's chat template, ready for the assistant."""
    return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)


def save_tiny_model(path, **model_kwargs):
    """A folder holding `tiny_model(**model_kwargs)` and `tiny_tokenizer()`, loadable by
    `train.py --model PATH` / `test.py --model PATH` (float32, offline). Returns the path."""
    tiny_model(**model_kwargs).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path
