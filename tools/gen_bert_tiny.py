#!/usr/bin/env python3
"""Write a tiny random BERT embedding GGUF (arch `bert`, mean pooling) for ggml-coreml's QVAC tests.

The weights are seeded noise, so the embeddings mean nothing, but every shape is a real BERT's:
separate Q/K/V with biases, post-attention and post-FFN layer norms, learned position and token-type
embeddings. Matrices are written as Q8_0 (hidden and feed-forward sizes are multiples of 32), so
the embed addon's matmuls are ones ggml-coreml takes. The WordPiece tokenizer is copied verbatim
from llama.cpp's `models/ggml-vocab-bert-bge.gguf`, so real text tokenises as it would for bge.

Usage: gen_bert_tiny.py --vocab <llama.cpp>/models/ggml-vocab-bert-bge.gguf --out bert-tiny-Q8_0.gguf
Needs the PyPI packages `gguf` and `numpy` (`cargo xtask venv`).
"""

import argparse
import sys

import numpy as np
import gguf


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", required=True, help="a vocab-only GGUF (ggml-vocab-bert-bge.gguf)")
    p.add_argument("--out", required=True, help="output GGUF path")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ff", type=int, default=1024)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ctx", type=int, default=512, help="trained context (position embeddings)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.hidden % a.heads != 0:
        p.error("--hidden must be a multiple of --heads")
    if a.hidden % 32 != 0 or a.ff % 32 != 0:
        p.error("--hidden and --ff must be multiples of 32 (Q8_0 blocks)")
    return a


def copy_tokenizer(writer, vocab_path):
    """Copies every tokenizer.* key of the vocab GGUF except the token-type count; returns the vocabulary size."""
    reader = gguf.GGUFReader(vocab_path)
    n_vocab = None
    for field in reader.fields.values():
        # Written below: BERT needs two token types (the vocab file says 1).
        if not field.name.startswith("tokenizer.") or field.name == gguf.Keys.Tokenizer.TOKEN_TYPE_COUNT:
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
    rng = np.random.default_rng(a.seed)
    q8 = gguf.GGMLQuantizationType.Q8_0

    def noise(*shape, scale=0.02):
        return (rng.standard_normal(shape, dtype=np.float32) * scale).astype(np.float32)

    def norm(n):
        return (1.0 + 0.1 * rng.standard_normal(n, dtype=np.float32)).astype(np.float32)

    def name(tensor, suffix, layer=None):
        base = gguf.TENSOR_NAMES[tensor]
        return (base.format(bid=layer) if layer is not None else base) + "." + suffix

    def add_q8(tname, rows, cols):
        # numpy shape (rows, cols) is ggml ne [cols, rows]; the quantised bytes keep the logical shape.
        w.add_tensor(tname, gguf.quants.quantize(noise(rows, cols), q8), raw_dtype=q8)

    T = gguf.MODEL_TENSOR
    w = gguf.GGUFWriter(a.out, "bert")
    w.add_name("bert-tiny")
    w.add_context_length(a.ctx)
    w.add_embedding_length(a.hidden)
    w.add_feed_forward_length(a.ff)
    w.add_block_count(a.layers)
    w.add_head_count(a.heads)
    w.add_layer_norm_eps(1e-12)
    w.add_causal_attention(False)
    w.add_pooling_type(gguf.PoolingType.MEAN)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    n_vocab = copy_tokenizer(w, a.vocab)
    w.add_token_type_count(2)

    add_q8(name(T.TOKEN_EMBD, "weight"), n_vocab, a.hidden)
    w.add_tensor(name(T.TOKEN_TYPES, "weight"), noise(2, a.hidden))
    w.add_tensor(name(T.POS_EMBD, "weight"), noise(a.ctx, a.hidden))
    w.add_tensor(name(T.TOKEN_EMBD_NORM, "weight"), norm(a.hidden))
    w.add_tensor(name(T.TOKEN_EMBD_NORM, "bias"), noise(a.hidden))
    for i in range(a.layers):
        for t in (T.ATTN_Q, T.ATTN_K, T.ATTN_V, T.ATTN_OUT):
            add_q8(name(t, "weight", i), a.hidden, a.hidden)
            w.add_tensor(name(t, "bias", i), noise(a.hidden))
        w.add_tensor(name(T.ATTN_OUT_NORM, "weight", i), norm(a.hidden))
        w.add_tensor(name(T.ATTN_OUT_NORM, "bias", i), noise(a.hidden))
        add_q8(name(T.FFN_UP, "weight", i), a.ff, a.hidden)
        w.add_tensor(name(T.FFN_UP, "bias", i), noise(a.ff))
        add_q8(name(T.FFN_DOWN, "weight", i), a.hidden, a.ff)
        w.add_tensor(name(T.FFN_DOWN, "bias", i), noise(a.hidden))
        w.add_tensor(name(T.LAYER_OUT_NORM, "weight", i), norm(a.hidden))
        w.add_tensor(name(T.LAYER_OUT_NORM, "bias", i), noise(a.hidden))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    main(sys.argv[1:])
