"""Log-probabilities of completions under a model directory and, optionally,
a PEFT adapter, computed by Hugging Face transformers + PEFT: the independent
side of `hf_parity` (our forward against theirs on the same files).

Usage: python3 hf_logprob_check.py MODEL_DIR ADAPTER_DIR|- SEQUENCES_JSON
SEQUENCES_JSON: [{"tokens": [...], "prompt_len": n}, ...]. Prints a JSON list
of log p(tokens[prompt_len:] | tokens[:prompt_len]), one per sequence.
"""

import json
import sys

import torch
from transformers import AutoModelForCausalLM


def main():
    model_dir, adapter, path = sys.argv[1], sys.argv[2], sys.argv[3]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter != "-":
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    out = []
    with torch.no_grad():
        for seq in json.load(open(path)):
            ids = torch.tensor([seq["tokens"]])
            logits = model(input_ids=ids).logits[0].double()
            logp = torch.log_softmax(logits, dim=-1)
            p = seq["prompt_len"]
            targets = ids[0, p:]
            out.append(float(logp[p - 1:-1].gather(1, targets.unsqueeze(1)).sum()))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
