#!/usr/bin/env python3
"""Write a tiny random Qwen3 GGUF (dense `qwen3` or MoE `qwen3moe`) for ggml-coreml tests.

The weights are seeded noise, so text is gibberish, but every shape is real: hidden and
feed-forward sizes are multiples of 256 so every matrix takes K-quants. The tokenizer is
copied verbatim from llama.cpp's `models/ggml-vocab-qwen2.gguf`, so tokenisation, chat
templates, llama-simple and llama-perplexity work.

Usage: gen_qwen3_tiny.py --vocab <llama.cpp>/models/ggml-vocab-qwen2.gguf --out qwen3-tiny-F16.gguf [--moe]
Needs the PyPI packages `gguf` and `numpy` (`cargo xtask venv`).
"""

import argparse
import sys

import numpy as np
import gguf


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", required=True, help="a vocab-only GGUF (ggml-vocab-qwen2.gguf)")
    p.add_argument("--out", required=True, help="output GGUF path")
    p.add_argument("--moe", action="store_true", help="write arch qwen3moe with routed experts")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ff", type=int, default=768, help="dense feed-forward size")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--experts-used", type=int, default=2)
    p.add_argument("--expert-ff", type=int, default=256, help="per-expert feed-forward size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["f16", "f32"], default="f16", help="matrix storage type")
    a = p.parse_args(argv)
    if a.heads % a.kv_heads != 0:
        p.error("--heads must be a multiple of --kv-heads")
    if a.moe and not 0 < a.experts_used <= a.experts:
        p.error("need 0 < --experts-used <= --experts")
    return a


def copy_tokenizer(writer, vocab_path):
    """Copies every tokenizer.* key of the vocab GGUF; returns the vocabulary size."""
    reader = gguf.GGUFReader(vocab_path)
    n_vocab = None
    for field in reader.fields.values():
        if not field.name.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub_type)
        if field.name == "tokenizer.ggml.tokens":
            n_vocab = len(field.data)
    if not n_vocab:
        sys.exit(f"{vocab_path}: no tokenizer.ggml.tokens")
    return n_vocab


def main(argv):
    a = parse_args(argv)
    arch = "qwen3moe" if a.moe else "qwen3"
    rng = np.random.default_rng(a.seed)
    mat_type = np.float16 if a.dtype == "f16" else np.float32

    def matrix(*shape):
        # numpy shape (rows, cols) is ggml ne [cols, rows]
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(mat_type)

    def norm(n):
        return (1.0 + 0.1 * rng.standard_normal(n, dtype=np.float32)).astype(np.float32)

    def name(tensor, layer=None):
        base = gguf.TENSOR_NAMES[tensor]
        return (base.format(bid=layer) if layer is not None else base) + ".weight"

    T = gguf.MODEL_TENSOR
    w = gguf.GGUFWriter(a.out, arch)
    w.add_name("qwen3-tiny-moe" if a.moe else "qwen3-tiny")
    w.add_block_count(a.layers)
    w.add_context_length(4096)
    w.add_embedding_length(a.hidden)
    w.add_feed_forward_length(a.ff)
    w.add_head_count(a.heads)
    w.add_head_count_kv(a.kv_heads)
    w.add_key_length(a.head_dim)
    w.add_value_length(a.head_dim)
    w.add_rope_freq_base(1e6)
    w.add_layer_norm_rms_eps(1e-6)
    if a.moe:
        w.add_expert_count(a.experts)
        w.add_expert_used_count(a.experts_used)
        w.add_expert_feed_forward_length(a.expert_ff)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if a.dtype == "f16" else gguf.LlamaFileType.ALL_F32)
    n_vocab = copy_tokenizer(w, a.vocab)

    q_dim, kv_dim = a.heads * a.head_dim, a.kv_heads * a.head_dim
    w.add_tensor(name(T.TOKEN_EMBD), matrix(n_vocab, a.hidden))
    w.add_tensor(name(T.OUTPUT_NORM), norm(a.hidden))
    w.add_tensor(name(T.OUTPUT), matrix(n_vocab, a.hidden))  # untied, unlike Qwen3-0.6B
    for i in range(a.layers):
        w.add_tensor(name(T.ATTN_NORM, i), norm(a.hidden))
        w.add_tensor(name(T.ATTN_Q, i), matrix(q_dim, a.hidden))
        w.add_tensor(name(T.ATTN_K, i), matrix(kv_dim, a.hidden))
        w.add_tensor(name(T.ATTN_V, i), matrix(kv_dim, a.hidden))
        w.add_tensor(name(T.ATTN_Q_NORM, i), norm(a.head_dim))
        w.add_tensor(name(T.ATTN_K_NORM, i), norm(a.head_dim))
        w.add_tensor(name(T.ATTN_OUT, i), matrix(a.hidden, q_dim))
        w.add_tensor(name(T.FFN_NORM, i), norm(a.hidden))
        if a.moe:
            # router stays F32 (llama-quantize never quantises ffn_gate_inp)
            router = (rng.standard_normal((a.experts, a.hidden), dtype=np.float32) * 0.02).astype(np.float32)
            w.add_tensor(name(T.FFN_GATE_INP, i), router)
            # 3-D expert stacks: numpy (experts, rows, cols) = ggml ne [cols, rows, experts]
            w.add_tensor(name(T.FFN_GATE_EXP, i), matrix(a.experts, a.expert_ff, a.hidden))
            w.add_tensor(name(T.FFN_UP_EXP, i), matrix(a.experts, a.expert_ff, a.hidden))
            w.add_tensor(name(T.FFN_DOWN_EXP, i), matrix(a.experts, a.hidden, a.expert_ff))
        else:
            w.add_tensor(name(T.FFN_GATE, i), matrix(a.ff, a.hidden))
            w.add_tensor(name(T.FFN_UP, i), matrix(a.ff, a.hidden))
            w.add_tensor(name(T.FFN_DOWN, i), matrix(a.hidden, a.ff))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"wrote {a.out}: arch {arch}, {a.layers} layers, hidden {a.hidden}, vocab {n_vocab}", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1:])
