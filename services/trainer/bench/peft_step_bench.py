"""PyTorch + PEFT side of the whole-training-step benchmark (issue 9): random-
weight Llama shapes in bf16 with SDPA attention, LoRA r=16 on q,k,v,o,gate,up,
down, one optimiser step per iteration on a causal-LM loss. Reports step time,
tokens/s, peak memory and MFU, with PEFT defaults (fp32 adapters) and with
bf16 adapters, measured in the same run. CUDA events, medians after warm-up.

MFU counts the work a LoRA step must do on a frozen base, per token:
4·N (forward 2·N, backward dX 2·N; no weight gradients for the base) over the
non-embedding parameters N, plus 4·d·V for the LM head (forward and dX), plus
6·s·d per layer for causal attention (scores and values, forward and
backward), over the H100 SXM dense bf16 peak of 989 TFLOP/s.

Usage: python3 peft_step_bench.py [1b|8b|all] [iterations]"""

import statistics
import sys

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

PEAK_FLOPS = 989e12
SHAPES = {
    # name: (config, batch, sequence)
    "1b": (dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True), 8, 1024),
    "8b": (dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False), 4, 1024),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def model_flops_per_token(cfg, seq):
    d, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    kv = d * cfg["num_key_value_heads"] // cfg["num_attention_heads"]
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * cfg["intermediate_size"]
    return 4 * layers * per_layer + 4 * d * cfg["vocab_size"] + 6 * layers * seq * d


def run(name, iterations, autocast_adapter_dtype):
    cfg, batch, seq = SHAPES[name]
    config = LlamaConfig(**cfg, max_position_embeddings=seq)
    config._attn_implementation = "sdpa"  # the default in recent transformers; stated, not assumed
    torch.manual_seed(8)
    with torch.device("cuda"):
        base = LlamaForCausalLM(config).to(torch.bfloat16)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    model = get_peft_model(base, lora, autocast_adapter_dtype=autocast_adapter_dtype)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, cfg["vocab_size"], (batch, seq), device="cuda")
    torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(iterations + 3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        end.record()
        end.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end) / 1000)
    step = statistics.median(times)
    tokens = batch * seq
    mfu = model_flops_per_token(cfg, seq) * tokens / step / PEAK_FLOPS
    peak = torch.cuda.max_memory_allocated() / 2**30
    del model, base, optimizer
    torch.cuda.empty_cache()
    return step, tokens / step, peak, mfu


def main():
    which = sys.argv[1] if len(sys.argv) > 1 else "all"
    iterations = int(sys.argv[2]) if len(sys.argv) > 2 else 10
    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    print("| shape | batch | adapters | step s | tokens/s | peak GiB | MFU |")
    print("|---|---|---|---|---|---|---|")
    for name in (["1b", "8b"] if which == "all" else [which]):
        for label, autocast in (("PEFT defaults (fp32)", True), ("bf16", False)):
            step, tps, peak, mfu = run(name, iterations, autocast)
            _, batch, seq = SHAPES[name]
            print(f"| {name} | {batch}×{seq} | {label} | {step:.3f} | {tps:,.0f} | {peak:.1f} | {mfu:.1%} |")
    print(f"\n{iterations} timed steps after 3 warm-up, medians; CUDA events.")


if __name__ == "__main__":
    main()
