// Loads several models one after the other in one process, as a server swapping models does, and
// prints, per model, the greedy continuation of a fixed prompt and the prompt's last logits.
// Used by `cargo xtask test` (stage two-models) to show that nothing prepared for one model's weights
// is ever served for the next model's (buffers freed and reallocated, often at the same address).
//
// usage: two_models DEVICE|- N_GPU_LAYERS OUT_PREFIX model.gguf [model.gguf ...]
//   DEVICE: a device name for llama_model_params.devices (e.g. CoreML-CPU), or - for llama.cpp's choice
//   writes OUT_PREFIX.<i>.logits (raw f32) and prints "model <i>: <token ids>" on stdout
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ggml-backend.h"
#include "llama.h"

static const char *PROMPT = "The quick brown fox jumps over the lazy dog because";

static int run_one(int idx, const char *path, ggml_backend_dev_t dev, int ngl, const char *prefix) {
    struct llama_model_params mp = llama_model_default_params();
    ggml_backend_dev_t devs[2] = {dev, NULL};
    if (dev) mp.devices = devs;
    mp.n_gpu_layers = ngl;
    struct llama_model *model = llama_model_load_from_file(path, mp);
    if (!model) {
        fprintf(stderr, "cannot load %s\n", path);
        return 1;
    }
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = 256;
    cp.n_batch = 64;
    cp.n_ubatch = 64;
    cp.n_threads = 2;
    cp.n_threads_batch = 2;
    struct llama_context *ctx = llama_init_from_model(model, cp);
    if (!ctx) {
        fprintf(stderr, "cannot create a context for %s\n", path);
        llama_model_free(model);
        return 1;
    }
    const struct llama_vocab *vocab = llama_model_get_vocab(model);
    llama_token toks[128];
    int n = llama_tokenize(vocab, PROMPT, (int)strlen(PROMPT), toks, 128, 1, 0);
    if (n <= 0 || llama_decode(ctx, llama_batch_get_one(toks, n)) != 0) {
        fprintf(stderr, "prompt decode failed for %s\n", path);
        return 1;
    }
    int nv = llama_vocab_n_tokens(vocab);
    const float *logits = llama_get_logits_ith(ctx, -1);
    char name[4096];
    snprintf(name, sizeof name, "%s.%d.logits", prefix, idx);
    FILE *f = fopen(name, "wb");
    if (!f || fwrite(logits, sizeof(float), (size_t)nv, f) != (size_t)nv) {
        fprintf(stderr, "cannot write %s\n", name);
        return 1;
    }
    fclose(f);
    printf("model %d:", idx);
    for (int i = 0; i < 8; i++) {
        const float *l = llama_get_logits_ith(ctx, -1);
        llama_token best = 0;
        for (int t = 1; t < nv; t++)
            if (l[t] > l[best]) best = t;
        printf(" %d", best);
        if (llama_decode(ctx, llama_batch_get_one(&best, 1)) != 0) {
            fprintf(stderr, "decode failed for %s\n", path);
            return 1;
        }
    }
    printf("\n");
    fflush(stdout);
    llama_free(ctx);
    llama_model_free(model);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 5) {
        fprintf(stderr, "usage: %s DEVICE|- N_GPU_LAYERS OUT_PREFIX model.gguf [model.gguf ...]\n", argv[0]);
        return 2;
    }
    ggml_backend_load_all();
    llama_backend_init();
    ggml_backend_dev_t dev = NULL;
    if (strcmp(argv[1], "-") != 0) {
        dev = ggml_backend_dev_by_name(argv[1]);
        if (!dev) {
            fprintf(stderr, "no device %s\n", argv[1]);
            return 1;
        }
    }
    int ngl = atoi(argv[2]);
    for (int i = 4; i < argc; i++)
        if (run_one(i - 4, argv[i], dev, ngl, argv[3]) != 0) return 1;
    llama_backend_free();
    return 0;
}
