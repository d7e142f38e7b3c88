"""Built-in tiny models: random weights from a fixed seed and a real byte-level BPE tokenizer,
saved in Hugging Face format so they load through the same `from_pretrained` path as any checkpoint.

`checkpoints.resolve_model("tiny")` builds one into a cache folder on first use.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

TINY_VERSION = "v2"  # v2: the Llama and Qwen2 tokenizers carry a chat template
EOS_TOKEN = "<|endoftext|>"

# Name -> architecture. `tiny` is the Llama one.
TINY_MODELS = {"tiny": "llama", "tiny-llama": "llama", "tiny-qwen2": "qwen2", "tiny-gpt2": "gpt2"}

# A ChatML template (SmolLM2's and Qwen2's format). The GPT-2 tiny model keeps none, as GPT-2.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# A small, fixed corpus: English prose, code and some non-ASCII text so that the tokenizer has
# merges for common words and splits multi-byte characters across tokens.
_CORPUS = """\
kvray serves autoregressive language models from a cluster of Ray actors. Each worker holds one
model replica and its paged KV cache. A router shards requests across the replicas, coordinates
their batched prefill and decode steps, and streams tokens to clients over gRPC.
The quick brown fox jumps over the lazy dog. Once upon a time there was a little model that
wanted to write stories about the sea, the mountains and the people who lived between them.
def fibonacci(n):
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a
Hello, world! How are you today? I am fine, thank you. What is the capital of France? Paris.
Café, naïve, résumé, Zürich, São Paulo, Kraków. 日本語のテキスト、中文文本、한국어 텍스트.
Emoji: 🚀 ✨ 🙂 — and symbols: ∑ ∞ ≤ ≥ → ← € £ ¥.
"""


def _arch_config(arch: str, vocab_size: int, eos_id: int) -> PretrainedConfig:
    import transformers

    common: dict[str, Any] = dict(vocab_size=vocab_size, bos_token_id=eos_id, eos_token_id=eos_id)
    builders: dict[str, Callable[[], PretrainedConfig]] = {
        "llama": lambda: transformers.LlamaConfig(
            hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=2048, initializer_range=0.2,
            tie_word_embeddings=False, **common,
        ),
        "qwen2": lambda: transformers.Qwen2Config(
            hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=1, max_position_embeddings=2048, initializer_range=0.2,
            tie_word_embeddings=True, use_sliding_window=False, **common,
        ),
        "gpt2": lambda: transformers.GPT2Config(
            n_embd=64, n_layer=2, n_head=4, n_positions=1024, initializer_range=0.2, **common,
        ),
    }  # fmt: skip
    if arch not in builders:
        raise ValueError(f"arch must be one of {', '.join(builders)}, got {arch!r}")
    return builders[arch]()


def make_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on the built-in corpus (deterministic, offline)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN
    )


def make_tiny_model(out_dir: str | os.PathLike[str], *, arch: str = "llama", seed: int = 0) -> Path:
    """Build a randomly initialised tiny model of `arch` with a fixed seed and save it.

    The large `initializer_range` keeps the top logits well apart, so greedy decoding does not
    hinge on float rounding. Returns the output directory.
    """
    import torch
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    tokenizer = make_tokenizer()
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    assert isinstance(eos_id, int)
    config = _arch_config(arch, vocab_size=len(tokenizer), eos_id=eos_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = eos_id
    if arch != "gpt2":
        tokenizer.chat_template = CHAT_TEMPLATE
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
