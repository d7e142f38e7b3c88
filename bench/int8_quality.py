"""What `quantization: int8` and `w8a8` (and bf16) cost in quality, on the real SmolLM2.

On a fixed set of chat prompts (the model's chat template), each variant:
  equal to fp32 / bf16  kvray's own greedy output (32 new tokens) against kvray fp32's and
                    bf16's: the share of prompts that agree on every token, and the mean number
                    of leading tokens that agree
  mean KL           KL(fp32 || variant) of the next-token distribution at every position of
                    the prompt and fp32's continuation (teacher forcing), in nats, from Hugging
                    Face forwards of the same weights (int8 / w8a8: kvray's layers)
  perplexity        of a fixed English text (public-domain openings, `TEXT`), one teacher-forced
                    Hugging Face forward of the variant's layers, and its change against bf16

    python bench/int8_quality.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from common import log

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a hash table is in two sentences.",
    "Give me three tips for learning a new language.",
    "What causes the seasons on Earth?",
    "Translate 'good morning' into Spanish and German.",
    "Write a Python function that reverses a string.",
    "Why is the sky blue?",
    "Summarize the plot of Romeo and Juliet in one paragraph.",
    "What is the difference between weather and climate?",
    "List the planets of the solar system in order.",
    "How do vaccines work?",
    "Suggest a name for a coffee shop by the beach.",
    "What is 17 times 23? Show your steps.",
    "Describe a cat to someone who has never seen one.",
    "What are the benefits of regular exercise?",
]
TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife. However little known the feelings or views of such a man may be "
    "on his first entering a neighbourhood, this truth is so well fixed in the minds of the "
    "surrounding families, that he is considered as the rightful property of some one or other "
    "of their daughters.\n\n"
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the "
    "age of foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the "
    "season of Light, it was the season of Darkness, it was the spring of hope, it was the "
    "winter of despair, we had everything before us, we had nothing before us, we were all "
    "going direct to Heaven, we were all going direct the other way.\n\n"
    "Call me Ishmael. Some years ago, never mind how long precisely, having little or no money "
    "in my purse, and nothing particular to interest me on shore, I thought I would sail about "
    "a little and see the watery part of the world. It is a way I have of driving off the "
    "spleen and regulating the circulation.\n\n"
    "When in the Course of human events, it becomes necessary for one people to dissolve the "
    "political bands which have connected them with another, and to assume among the powers of "
    "the earth, the separate and equal station to which the Laws of Nature and of Nature's God "
    "entitle them, a decent respect to the opinions of mankind requires that they should "
    "declare the causes which impel them to the separation.\n\n"
    "A hash table stores key and value pairs in an array of buckets. A hash function maps each "
    "key to the index of a bucket, so that looking up a key takes constant time on average. "
    "When two keys map to the same bucket, the table resolves the collision, for example by "
    "keeping a short list in each bucket or by probing the next free slot.\n"
)
VARIANTS = {  # name -> kvray options
    "fp32": dict(dtype="float32"),
    "bf16": dict(dtype="bfloat16"),
    "int8": dict(dtype="bfloat16", quantization="int8"),
    "w8a8": dict(dtype="bfloat16", quantization="w8a8"),
    "w8a8-fp32": dict(dtype="float32", quantization="w8a8"),  # fp32 activations in and out
}


def greedy(prompts: list[list[int]], max_tokens: int, **options: object) -> list[list[int]]:
    from kvray import LLM, SamplingParams

    llm = LLM("smollm2", max_model_len=1024, **options)
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens))
    return [o.token_ids for o in outputs]


def hf_model(path: str, variant: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    from kvray.workers.quantization import quantize_linears
    from kvray.workers.w8a8 import quantize_linears_w8a8

    dtype = torch.float32 if VARIANTS[variant]["dtype"] == "float32" else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    if VARIANTS[variant].get("quantization") == "int8":
        quantize_linears(model)
    elif VARIANTS[variant].get("quantization") == "w8a8":
        quantize_linears_w8a8(model)
    return model


@torch.inference_mode()
def perplexity(model: torch.nn.Module, ids: list[int]) -> float:
    logits = model(torch.tensor([ids])).logits[0, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]))
    return float(torch.exp(nll))


def agreement(outputs: list[list[int]], refs: list[list[int]]) -> tuple[int, float]:
    """(prompts whose every token agrees, the mean number of leading tokens that agree)"""
    agree, prefix = 0, 0
    for ours, ref in zip(outputs, refs):
        agree += ours == ref
        prefix += next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), len(ref))
    return agree, prefix / len(refs)


@torch.inference_mode()
def mean_kl(reference: torch.nn.Module, model: torch.nn.Module, seqs: list[list[int]]) -> float:
    total, count = 0.0, 0
    for ids in seqs:
        x = torch.tensor([ids])
        p = torch.log_softmax(reference(x).logits[0].float(), -1)
        q = torch.log_softmax(model(x).logits[0].float(), -1)
        total += torch.sum(p.exp() * (p - q)).item()
        count += len(ids)
    return total / count


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()

    from kvray.cluster.tokenizer import load_tokenizer
    from kvray.workers.checkpoints import resolve_model

    path = str(resolve_model("smollm2"))
    tokenizer = load_tokenizer(path)
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True
        )
        for p in PROMPTS
    ]
    prompts = [list(p if isinstance(p, list) else p["input_ids"]) for p in prompts]
    outputs = {}
    for name, options in VARIANTS.items():
        log(f"greedy {name}")
        outputs[name] = greedy(prompts, args.max_tokens, **options)

    log("teacher-forced forwards")
    seqs = [p + o for p, o in zip(prompts, outputs["fp32"])]
    text_ids = list(tokenizer(TEXT)["input_ids"])
    reference = hf_model(path, "fp32")
    rows = {}
    for name in VARIANTS:
        model = reference if name == "fp32" else hf_model(path, name)
        kl = 0.0 if name == "fp32" else mean_kl(reference, model, seqs)
        rows[name] = (kl, perplexity(model, text_ids))
    n = len(PROMPTS)
    print(
        f"SmolLM2-135M-Instruct, {n} chat prompts, {args.max_tokens} greedy tokens; "
        f"perplexity of a {len(text_ids)}-token text"
    )
    print(
        f"{'variant':<10} {'equal to fp32':>14} {'prefix':>7} {'equal to bf16':>14} {'prefix':>7}"
        f" {'mean KL':>8} {'perplexity':>11} {'vs bf16':>8}"
    )
    for name, (kl, ppl) in rows.items():
        to_fp32, prefix_fp32 = agreement(outputs[name], outputs["fp32"])
        to_bf16, prefix_bf16 = agreement(outputs[name], outputs["bf16"])
        change = ppl / rows["bf16"][1] - 1
        print(
            f"{name:<10} {to_fp32:>10}/{n:<3} {prefix_fp32:>7.1f} {to_bf16:>10}/{n:<3}"
            f" {prefix_bf16:>7.1f} {kl:>8.4f} {ppl:>11.3f} {change:>+8.2%}"
        )


if __name__ == "__main__":
    main()
