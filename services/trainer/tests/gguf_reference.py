"""Independent reference for the GGUF importer (services/trainer/src/gguf.rs,
import.rs). Uses the PyPI `gguf` package (llama.cpp's own Python reader and
dequantisers), numpy and the `tokenizers` package; the llama tensor-name map,
the q/k un-permutation and the byte-level BPE below are written here
independently of the Rust code.

Usage:
  gguf_reference.py dequant FILE.gguf
      Every tensor of FILE dequantised by `gguf.quants.dequantize`. Writes to
      stdout one JSON line [[name, type, count], ...] and then the tensors'
      values as raw little-endian f32, in that order.
  gguf_reference.py synth OUT.gguf
      Writes OUT.gguf with gguf.GGUFWriter: random blocks of every type the
      importer supports (valid finite f16 scales, every finite f16 bit
      pattern) and metadata of every value type. Writes to stdout one JSON
      line {"metadata": {...}, "tensors": [[name, type, count], ...]} and
      then the tensors dequantised from the in-memory blocks, as above.
  gguf_reference.py mapped FILE.gguf MODEL_DIR
      Converts FILE independently (dequantise, rename, un-permute q/k,
      round to the safetensors dtype) and compares every tensor of
      MODEL_DIR/model.safetensors with it. Prints JSON with the largest
      difference and the names of tensors that differ.
  gguf_reference.py tokenize FILE.gguf MODEL_DIR < strings.json
      Token ids of each string by `tokenizers` loading MODEL_DIR's
      tokenizer.json, and by a byte-level BPE written here over FILE's
      vocabulary and merges with the `smollm` pre-tokenizer. Prints JSON.
"""
import json
import struct
import sys
import unicodedata

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import dequantize, quantize


def emit(header, arrays):
    out = sys.stdout.buffer
    out.write((json.dumps(header) + "\n").encode())
    for a in arrays:
        out.write(np.ascontiguousarray(a, dtype="<f4").tobytes())
    out.flush()


def dequant(path):
    reader = GGUFReader(path)
    header, arrays = [], []
    for t in reader.tensors:
        values = dequantize(t.data, t.tensor_type).reshape(-1)
        header.append([t.name, t.tensor_type.name, int(values.size)])
        arrays.append(values)
    emit(header, arrays)


def random_blocks(rng, qtype, n_blocks):
    """Random block bytes for `qtype` with its f16 scale fields set to finite
    values (random bytes elsewhere are all valid codes)."""
    sizes = {Q.Q8_0: 34, Q.Q4_0: 18, Q.Q4_1: 20, Q.Q4_K: 144, Q.Q5_K: 176, Q.Q6_K: 210}
    # Where each block keeps its f16 scales (and minima).
    scales = {Q.Q8_0: [0], Q.Q4_0: [0], Q.Q4_1: [0, 2], Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [208]}
    blocks = rng.integers(0, 256, size=(n_blocks, sizes[qtype]), dtype=np.uint8)
    for at in scales[qtype]:
        d = (rng.standard_normal(n_blocks) * 0.05).astype(np.float16)
        blocks[:, at : at + 2] = d.view(np.uint8).reshape(n_blocks, 2)
    return blocks


def synth(path):
    rng = np.random.default_rng(20261130)
    writer = GGUFWriter(path, "llama")
    writer.add_custom_alignment(64)
    metadata = {
        "test.u8": ("uint8", 200),
        "test.i8": ("int8", -100),
        "test.u16": ("uint16", 60000),
        "test.i16": ("int16", -30000),
        "test.u32": ("uint32", 4000000000),
        "test.i32": ("int32", -2000000000),
        "test.f32": ("float32", 0.1),
        "test.u64": ("uint64", 2**63 + 5),
        "test.i64": ("int64", -(2**62)),
        "test.f64": ("float64", 1e-300),
        "test.bool": ("bool", True),
        "test.string": ("string", "naïve ☃ \"quoted\"\n"),
        "test.strings": ("array", ["a", "", "ü b"]),
        "test.ints": ("array", [1, -2, 3]),
        "test.floats": ("array", [0.5, -1.25]),
        "test.nested": ("array", [[1, 2], [3]]),
    }
    adders = {
        "uint8": writer.add_uint8, "int8": writer.add_int8, "uint16": writer.add_uint16,
        "int16": writer.add_int16, "uint32": writer.add_uint32, "int32": writer.add_int32,
        "float32": writer.add_float32, "uint64": writer.add_uint64, "int64": writer.add_int64,
        "float64": writer.add_float64, "bool": writer.add_bool, "string": writer.add_string,
        "array": writer.add_array,
    }
    for key, (kind, value) in metadata.items():
        adders[kind](key, value)

    header, arrays = [], []

    def add(name, qtype, raw, values):
        writer.add_tensor(name, raw, raw_dtype=qtype)
        header.append([name, qtype.name, int(values.size)])
        arrays.append(values.reshape(-1))

    rows = 3
    for qtype, block in [(Q.Q8_0, 32), (Q.Q4_0, 32), (Q.Q4_1, 32), (Q.Q4_K, 256), (Q.Q5_K, 256), (Q.Q6_K, 256)]:
        per_row = 2 if block == 256 else 16
        blocks = random_blocks(rng, qtype, rows * per_row)
        raw = blocks.reshape(rows, -1)
        add(f"q.{qtype.name.lower()}", qtype, raw, dequantize(raw, qtype))
    # Every finite f16 bit pattern (normals, subnormals, both zeros).
    bits = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    finite = bits[(bits & 0x7C00) != 0x7C00].reshape(62, 1024)
    raw = finite.view(np.uint8).reshape(62, 2048)
    add("f.f16", Q.F16, raw, dequantize(raw, Q.F16))
    f32 = (rng.standard_normal((4, 96)) * 3).astype(np.float32)
    bf16 = quantize(f32, Q.BF16)
    add("f.bf16", Q.BF16, bf16, dequantize(bf16, Q.BF16))
    add("f.f32", Q.F32, f32.view(np.uint8), dequantize(f32.view(np.uint8), Q.F32))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    expected = {k: v for k, (_, v) in metadata.items()}
    expected["test.u64"] = str(expected["test.u64"])  # beyond JSON's safe integers
    expected["test.f32"] = float(np.float32(0.1))
    emit({"metadata": expected, "tensors": header}, arrays)


# --- independent conversion -------------------------------------------------

LAYER_PARTS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def hf_name(name):
    top = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
    if name in top:
        return top[name]
    _, layer, part, kind = name.split(".")
    return f"model.layers.{layer}.{LAYER_PARTS[part]}.{kind}"


def read_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    body = memoryview(data)[8 + n :]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        raw = np.frombuffer(body[start:end], dtype=np.uint8)
        if info["dtype"] == "BF16":
            values = (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            assert info["dtype"] == "F32", (name, info["dtype"])
            values = raw.view("<f4")
        out[name] = (info["dtype"], values.reshape(info["shape"]))
    return out, header.get("__metadata__")


def mapped(path, model_dir):
    reader = GGUFReader(path)
    field = lambda k: reader.fields[k].contents()
    heads = field("llama.attention.head_count")
    kv_heads = field("llama.attention.head_count_kv")
    ours, meta = read_safetensors(f"{model_dir}/model.safetensors")
    differing, worst, seen = [], 0.0, set()
    for t in reader.tensors:
        w = dequantize(t.data, t.tensor_type).astype(np.float32)
        w = w.reshape([int(d) for d in reversed(t.shape)])
        n_head = {"attn_q": heads, "attn_k": kv_heads}.get(t.name.split(".")[2] if t.name.startswith("blk.") else "")
        if n_head:
            out_dim, in_dim = w.shape
            w = w.reshape(n_head, out_dim // n_head // 2, 2, in_dim).swapaxes(1, 2).reshape(out_dim, in_dim)
        name = hf_name(t.name)
        seen.add(name)
        dtype, got = ours[name]
        if dtype == "BF16":
            w = (quantize(w, Q.BF16).view("<u2").astype(np.uint32) << 16).view(np.float32).reshape(w.shape)
        if got.shape != w.shape:
            differing.append(f"{name}: shape {list(got.shape)} vs {list(w.shape)}")
            continue
        diff = float(np.max(np.abs(got - w)))
        worst = max(worst, diff)
        if diff != 0.0:
            differing.append(f"{name}: {diff}")
    extra = sorted(set(ours) - seen)
    print(json.dumps({"tensors": len(seen), "max_diff": worst, "differing": differing, "extra": extra,
                      "metadata": meta}))


# --- independent byte-level BPE ----------------------------------------------


def byte_alphabet():
    """GPT-2's printable stand-in for each byte."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def kind(ch):
    cat = unicodedata.category(ch)
    if cat.startswith("L"):
        return "L"
    if cat.startswith("N"):
        return "N"
    if ch.isspace():
        return "S"
    return "O"


def gpt2_pieces(text):
    """GPT-2's pre-tokenizer regex, by hand:
    's|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+"""
    pieces, i, n = [], 0, len(text)
    while i < n:
        if text[i] == "'":
            c = next((c for c in ("s", "t", "re", "ve", "m", "ll", "d") if text.startswith(c, i + 1)), None)
            if c:
                pieces.append(text[i : i + 1 + len(c)])
                i += 1 + len(c)
                continue
        # One optional space, then a run of letters, of numbers or of others.
        start = i + 1 if text[i] == " " and i + 1 < n else i
        k = kind(text[start])
        if k != "S":
            j = start
            while j < n and kind(text[j]) == k:
                j += 1
            pieces.append(text[i:j])
            i = j
            continue
        # Whitespace: a run, leaving its last character to prefix what follows.
        j = i
        while j < n and kind(text[j]) == "S":
            j += 1
        if j < n and j - 1 > i:
            j -= 1
        pieces.append(text[i:j])
        i = j
    return pieces


def smollm_pieces(text):
    """Each numeric character alone, then GPT-2's split of the rest."""
    out, run = [], ""
    for ch in text:
        if unicodedata.category(ch).startswith("N"):
            if run:
                out.extend(gpt2_pieces(run))
                run = ""
            out.append(ch)
        else:
            run += ch
    if run:
        out.extend(gpt2_pieces(run))
    return out


def bpe(word, ranks):
    symbols = list(word)
    while len(symbols) > 1:
        best = min(range(len(symbols) - 1), key=lambda k: ranks.get((symbols[k], symbols[k + 1]), 1 << 30))
        if (symbols[best], symbols[best + 1]) not in ranks:
            break
        pair = (symbols[best], symbols[best + 1])
        merged, k = [], 0
        while k < len(symbols):
            if k < len(symbols) - 1 and (symbols[k], symbols[k + 1]) == pair:
                merged.append(symbols[k] + symbols[k + 1])
                k += 2
            else:
                merged.append(symbols[k])
                k += 1
        symbols = merged
    return symbols


def independent_encode(text, vocab, ranks, specials, alphabet):
    ids, i = [], 0
    while i < len(text):
        hit = next((s for s in specials if text.startswith(s, i)), None)
        if hit:
            ids.append(vocab[hit])
            i += len(hit)
            continue
        j = i
        while j < len(text) and not any(text.startswith(s, j) for s in specials):
            j += 1
        for piece in smollm_pieces(text[i:j]):
            mapped_piece = "".join(alphabet[b] for b in piece.encode("utf-8"))
            ids.extend(vocab[s] for s in bpe(mapped_piece, ranks))
        i = j
    return ids


def tokenize(path, model_dir):
    from tokenizers import Tokenizer

    strings = json.load(sys.stdin)
    reader = GGUFReader(path)
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    merges = reader.fields["tokenizer.ggml.merges"].contents()
    assert reader.fields["tokenizer.ggml.pre"].contents() == "smollm"
    vocab = {t: i for i, t in enumerate(tokens)}
    ranks = {tuple(m.split(" ")): r for r, m in enumerate(merges)}
    specials = sorted((t for t, ty in zip(tokens, types) if ty == 3), key=len, reverse=True)
    alphabet = byte_alphabet()
    hf = Tokenizer.from_file(f"{model_dir}/tokenizer.json")
    result = {
        "tokenizers": [hf.encode(s, add_special_tokens=False).ids for s in strings],
        "tokenizers_decoded": [hf.decode(hf.encode(s, add_special_tokens=False).ids, skip_special_tokens=False)
                               for s in strings],
        "independent": [independent_encode(s, vocab, ranks, specials, alphabet) for s in strings],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    mode, args = sys.argv[1], sys.argv[2:]
    {"dequant": dequant, "synth": synth, "mapped": mapped, "tokenize": tokenize}[mode](*args)
