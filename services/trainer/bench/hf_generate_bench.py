"""PyTorch + transformers `generate` on the CPU: the baseline `generate_bench`
is compared with. Loads the model directory `flywheel model import-gguf`
wrote (so this is also the check that transformers reads our config,
weights and tokenizer), asks the same questions with the chat template,
samples at temperature 0.7 / top-p 0.9 with left padding, and reports
generated tokens per second.

Usage: python3 hf_generate_bench.py MODEL_DIR BATCH MAX_NEW_TOKENS
Prints one JSON line.
"""

import json
import os
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

QUESTIONS = [
    "What is the capital of France?",
    "Give me a tip for writing clean code.",
    "How do I boil an egg?",
    "Why is the sky blue?",
    "Suggest a name for a pet turtle.",
    "What does HTTP stand for?",
    "How can I sleep better?",
    "Explain what a prime number is.",
]


def main():
    model_dir, batch, max_new = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    threads = int(os.environ.get("OMP_NUM_THREADS", os.cpu_count()))
    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    # Each request's own number makes every prompt distinct, as on our side
    # (which shares one prompt pass among identical requests).
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": f"{QUESTIONS[i % len(QUESTIONS)]} (#{i})"}],
                                      tokenize=False, add_generation_prompt=True)
        for i in range(batch)
    ]
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    torch.manual_seed(0)
    started = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new, do_sample=True, temperature=0.7, top_p=0.9,
                             eos_token_id=end, pad_token_id=end)
    seconds = time.perf_counter() - started
    new = out[:, enc["input_ids"].shape[1]:]
    # Tokens generated until (and including) each sequence's end-of-turn.
    generated = 0
    for row in new.tolist():
        generated += row.index(end) + 1 if end in row else len(row)
    print(json.dumps({
        "impl": "pytorch+transformers", "batch": batch, "max_new_tokens": max_new,
        "prompt_tokens": int(enc["attention_mask"].sum()), "generated_tokens": generated,
        "seconds": round(seconds, 2), "generated_per_s": round(generated / seconds, 1), "threads": threads,
        "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
