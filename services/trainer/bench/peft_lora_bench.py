"""PyTorch + PEFT side of the fused LoRA benchmark (issue 8), on the shapes of
examples/lora_bench.rs: forward + backward of frozen bf16 linears alone, then
with PEFT LoRA on every one of them (PEFT defaults, which keep the adapter in
fp32, and with bf16 adapters). dX is computed as inside a layer stack; LoRA
A and B get gradients. CUDA events, interleaved, medians after warm-up.

Usage: python3 peft_lora_bench.py [iterations]"""

import copy
import statistics
import sys

import torch
from peft import LoraConfig, get_peft_model

ITERATIONS = int(sys.argv[1]) if len(sys.argv) > 1 else 50
CASES = [
    (8192, 4096, [4096], 16),
    (8192, 4096, [4096], 64),
    (8192, 4096, [4096, 1024, 1024], 16),  # Llama-3.1-8B q/k/v
    (8192, 4096, [14336, 14336], 16),  # Llama-3.1-8B gate/up
    (8192, 14336, [4096], 16),  # Llama-3.1-8B down
]


class Group(torch.nn.Module):
    """Projections of one input, like q/k/v or gate/up."""

    def __init__(self, k, outs):
        super().__init__()
        self.projections = torch.nn.ModuleList(torch.nn.Linear(k, n, bias=False) for n in outs)

    def forward(self, x):
        return [p(x) for p in self.projections]


def step(model, x, grads):
    outputs = model(x)
    torch.autograd.backward(outputs, grads)
    x.grad = None
    for p in model.parameters():
        p.grad = None


def main():
    torch.manual_seed(8)
    device = torch.device("cuda")
    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    print("| shape (M, K, outs) | r | base fwd+bwd ms | PEFT default ms | PEFT bf16 adapters ms | default overhead | bf16 overhead |")
    print("|---|---|---|---|---|---|---|")
    for m, k, outs, r in CASES:
        base = Group(k, outs).to(device, torch.bfloat16).requires_grad_(False)
        config = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=["0", "1", "2"][: len(outs)])
        default = get_peft_model(copy.deepcopy(base), config)
        bf16 = get_peft_model(copy.deepcopy(base), config, autocast_adapter_dtype=False)
        for model in (default, bf16):
            for name, p in model.named_parameters():
                if "lora_B" in name:  # PEFT starts B at zero; time a trained adapter
                    torch.nn.init.normal_(p, std=0.02)
        x = torch.randn(m, k, device=device, dtype=torch.bfloat16, requires_grad=True)
        grads = [torch.randn(m, n, device=device, dtype=torch.bfloat16) for n in outs]
        models = {"base": base, "default": default, "bf16": bf16}
        times = {name: [] for name in models}
        for i in range(ITERATIONS + 10):
            for name, model in models.items():
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                step(model, x, grads)
                end.record()
                end.synchronize()
                if i >= 10:
                    times[name].append(start.elapsed_time(end))
        med = {name: statistics.median(t) for name, t in times.items()}
        over = lambda name: (med[name] / med["base"] - 1) * 100
        print(
            f"| {m}, {k}, {outs} | {r} | {med['base']:.3f} | {med['default']:.3f} | {med['bf16']:.3f} "
            f"| {over('default'):+.1f} % | {over('bf16'):+.1f} % |"
        )
        del base, default, bf16, models, x, grads
        torch.cuda.empty_cache()
    print(f"\n{ITERATIONS} timed iterations after 10 warm-up, medians; CUDA events.")


if __name__ == "__main__":
    main()
