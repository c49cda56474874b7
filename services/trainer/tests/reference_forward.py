"""Independent reference for the trainer's forward pass: reads a Hugging Face
Llama/Qwen2 checkpoint (config.json + model.safetensors) and optionally a PEFT
LoRA adapter with nothing but numpy (the safetensors layout is parsed here,
not by a library), computes the logits of a token sequence in float64, and
prints them as JSON.

Usage: python reference_forward.py MODEL_DIR ADAPTER_DIR|- TOKEN,TOKEN,...
"""
import json
import struct
import sys

import numpy as np


def read_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    body = data[8 + n :]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        assert info["dtype"] == "F32", (name, info["dtype"])
        start, end = info["data_offsets"]
        out[name] = np.frombuffer(body[start:end], dtype="<f4").astype(np.float64).reshape(info["shape"])
    return out


def main():
    model_dir, adapter_dir, tokens = sys.argv[1], sys.argv[2], [int(t) for t in sys.argv[3].split(",")]
    cfg = json.load(open(f"{model_dir}/config.json"))
    w = read_safetensors(f"{model_dir}/model.safetensors")
    lora, scale = {}, 0.0
    if adapter_dir != "-":
        acfg = json.load(open(f"{adapter_dir}/adapter_config.json"))
        lora = read_safetensors(f"{adapter_dir}/adapter_model.safetensors")
        scale = acfg["lora_alpha"] / acfg["r"]

    h = cfg["hidden_size"]
    nh = cfg["num_attention_heads"]
    nkv = cfg.get("num_key_value_heads") or nh
    hd = cfg.get("head_dim") or h // nh
    eps = cfg.get("rms_norm_eps", 1e-6)
    theta = cfg.get("rope_theta", 10000.0)
    T = len(tokens)

    def rms(x, weight):
        return weight * (x / np.sqrt((x * x).mean(-1, keepdims=True) + eps))

    def proj(x, layer, block, module):
        name = f"model.layers.{layer}.{block}.{module}"
        y = x @ w[f"{name}.weight"].T
        if f"{name}.bias" in w:
            y = y + w[f"{name}.bias"]
        a = lora.get(f"base_model.model.{name}.lora_A.weight")
        if a is not None:
            b = lora[f"base_model.model.{name}.lora_B.weight"]
            y = y + scale * (x @ a.T) @ b.T
        return y

    inv_freq = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
    angles = np.outer(np.arange(T), inv_freq)
    emb = np.concatenate([angles, angles], axis=-1)
    cos, sin = np.cos(emb), np.sin(emb)

    def rope(x, heads):
        x = x.reshape(T, heads, hd)
        half = hd // 2
        rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
        return (x * cos[:, None, :] + rotated * sin[:, None, :]).reshape(T, heads * hd)

    x = w["model.embed_tokens.weight"][tokens]
    mask = np.triu(np.full((T, T), -np.inf), k=1)
    for layer in range(cfg["num_hidden_layers"]):
        n = rms(x, w[f"model.layers.{layer}.input_layernorm.weight"])
        q = rope(proj(n, layer, "self_attn", "q_proj"), nh).reshape(T, nh, hd)
        k = rope(proj(n, layer, "self_attn", "k_proj"), nkv).reshape(T, nkv, hd)
        v = proj(n, layer, "self_attn", "v_proj").reshape(T, nkv, hd)
        group = nh // nkv
        out = np.zeros((T, nh, hd))
        for head in range(nh):
            kv = head // group
            s = q[:, head, :] @ k[:, kv, :].T / np.sqrt(hd) + mask
            p = np.exp(s - s.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            out[:, head, :] = p @ v[:, kv, :]
        x = x + proj(out.reshape(T, nh * hd), layer, "self_attn", "o_proj")
        n = rms(x, w[f"model.layers.{layer}.post_attention_layernorm.weight"])
        g = proj(n, layer, "mlp", "gate_proj")
        u = proj(n, layer, "mlp", "up_proj")
        x = x + proj(g / (1 + np.exp(-g)) * u, layer, "mlp", "down_proj")
    x = rms(x, w["model.norm.weight"])
    head = w["model.embed_tokens.weight"] if cfg.get("tie_word_embeddings") else w["lm_head.weight"]
    print(json.dumps((x @ head.T).ravel().tolist()))


main()
