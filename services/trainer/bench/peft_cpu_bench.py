"""PyTorch + PEFT on the CPU: the baseline `train_bench` is compared with.

Same shapes, batch, loss and optimiser as `train_bench` (services/trainer/
examples/train_bench.rs): random-weight Llama-family models, LoRA r=16 alpha=32
on q,k,v,o,gate,up,down, a REINFORCE loss over the completion half of each
sequence (-(r - mean r) * log p(completion | prompt)), AdamW (lr 1e-4, no
weight decay), gradient clipping at 1.0. Tokens/s counts every token of the
batch; the first step warms up and is not counted; medians.

Variants: `fp32` (PEFT defaults, fp32 weights) and `bf16` (base weights in
bf16, activations in bf16, adapters in fp32 as PEFT's autocast keeps them).

The LM head runs on the completion positions only (`logits_to_keep`, as
TRL's trainers call it), as ours does; HEAD=all computes every position's
logits and slices them afterwards, the way results before 2026-12-02 were
measured.
Peak memory is the process's maximum resident set (ru_maxrss), so run one
variant per process (`run_cpu_bench.sh` does).

Usage: python3 peft_cpu_bench.py SHAPE VARIANT STEPS
  SHAPE: tiny | medium (~110M Llama, 12 x 768) | smollm2 (SmolLM2-135M shape)
  Prints one JSON line.
"""

import json
import os
import resource
import statistics
import sys
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

SHAPES = {
    # name: (config, batch, sequence)
    "tiny": (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256, tie_word_embeddings=False), 16, 64),
    "medium": (dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                    num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False), 2, 128),
    "smollm2": (dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                     num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
                     rope_theta=100000.0, rms_norm_eps=1e-5), 4, 128),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def matmul_flops_per_token(cfg, completion_share):
    """The useful work of a LoRA step on a frozen base, per token: forward and
    input-gradient products of every projection (4 x parameters), the LM head
    forward and input gradient on the completion positions, which carry the
    loss. Attention and LoRA's own products are left out (a few per cent)."""
    d, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    head_dim = d // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * head_dim, cfg["num_key_value_heads"] * head_dim
    per_layer = d * q * 2 + d * kv * 2 + 3 * d * cfg["intermediate_size"]
    return 4 * layers * per_layer + 4 * d * cfg["vocab_size"] * completion_share


def main():
    shape, variant, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    threads = int(os.environ.get("OMP_NUM_THREADS", os.cpu_count()))
    torch.set_num_threads(threads)
    cfg, batch, seq = SHAPES[shape]
    config = LlamaConfig(**cfg, max_position_embeddings=max(seq, 2048))
    config._attn_implementation = "sdpa"
    torch.manual_seed(1)
    base = LlamaForCausalLM(config)
    if variant == "bf16":
        base = base.to(torch.bfloat16)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    model = get_peft_model(base, lora)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    vocab = cfg["vocab_size"]
    # The token pattern of train_bench's batch.
    tokens = torch.tensor([[(i * 131 + t * 17) % vocab for t in range(seq)] for i in range(batch)])
    rewards = torch.tensor([0.75 if i % 2 == 0 else -0.25 for i in range(batch)])
    advantage = rewards - rewards.mean()
    prompt = seq // 2
    all_logits = os.environ.get("HEAD", "completion") == "all"
    rates = []
    for step in range(steps + 1):
        started = time.perf_counter()
        if all_logits:
            logits = model(input_ids=tokens).logits[:, prompt - 1:-1].float()
        else:
            logits = model(input_ids=tokens, logits_to_keep=seq - prompt + 1).logits[:, :-1].float()
        logp = torch.log_softmax(logits, dim=-1).gather(-1, tokens[:, prompt:].unsqueeze(-1)).squeeze(-1).sum(-1)
        loss = -(advantage * logp).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if step > 0:
            rates.append(batch * seq / (time.perf_counter() - started))
    median = statistics.median(rates)
    flops = matmul_flops_per_token(cfg, (seq - prompt) / seq) * median
    print(json.dumps({
        "impl": "pytorch+peft", "variant": variant, "shape": shape, "batch": batch, "seq": seq,
        "threads": threads, "tokens_per_s": round(median, 1), "gflops": round(flops / 1e9, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "torch": torch.__version__, "steps": steps, "head": "all" if all_logits else "completion",
    }))


if __name__ == "__main__":
    main()
