"""What `quantization: int8` (and bf16) cost in quality, against fp32, on the real SmolLM2.

On a fixed set of chat prompts (the model's chat template), each variant:
  greedy agreement  kvray's own greedy output (32 new tokens) equal to kvray fp32's: the share
                    of prompts that agree on every token, and the mean number of leading tokens
                    that agree
  mean KL           KL(fp32 || variant) of the next-token distribution at every position of
                    the prompt and fp32's continuation (teacher forcing), in nats, from Hugging
                    Face forwards of the same weights (int8: kvray's `Int8Linear` layers)

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
VARIANTS = {  # name -> kvray options
    "fp32": dict(dtype="float32"),
    "bf16": dict(dtype="bfloat16"),
    "int8": dict(dtype="bfloat16", quantization="int8"),
}


def greedy(prompts: list[list[int]], max_tokens: int, **options: object) -> list[list[int]]:
    from kvray import LLM, SamplingParams

    llm = LLM("smollm2", max_model_len=1024, **options)
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens))
    return [o.token_ids for o in outputs]


def hf_model(path: str, variant: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    from kvray.workers.quantization import quantize_linears

    dtype = torch.float32 if variant == "fp32" else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    if variant == "int8":
        quantize_linears(model)
    return model


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
    reference = hf_model(path, "fp32")
    print(f"SmolLM2-135M-Instruct, {len(PROMPTS)} chat prompts, {args.max_tokens} greedy tokens")
    print(
        f"{'variant':<8} {'all tokens equal':>17} {'mean equal prefix':>18} {'mean KL (nats)':>15}"
    )
    for name in VARIANTS:
        agree, prefix = 0, 0
        for ours, ref in zip(outputs[name], outputs["fp32"]):
            agree += ours == ref
            prefix += next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), len(ref))
        kl = 0.0 if name == "fp32" else mean_kl(reference, hf_model(path, name), seqs)
        print(f"{name:<8} {agree:>10}/{len(PROMPTS):<6} {prefix / len(PROMPTS):>18.1f} {kl:>15.4f}")


if __name__ == "__main__":
    main()
