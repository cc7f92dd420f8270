// Opens a GGUF with ggml's GGUF parser, exactly as llama.cpp's model loader does first
// (gguf_init_from_file, no allocation). Built against an UNPATCHED ggml by tests/test_stock_refusal.py
// to show how a stock llama.cpp refuses an LRQ file. Exit 0: parsed; 1: refused.
#include "gguf.h"

#include <stdio.h>

int main(int argc, char ** argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s FILE.gguf\n", argv[0]);
        return 2;
    }
    struct gguf_init_params params = { /*no_alloc =*/ true, /*ctx =*/ NULL };
    struct gguf_context * ctx = gguf_init_from_file(argv[1], params);
    if (!ctx) {
        fprintf(stderr, "refused: %s\n", argv[1]);
        return 1;
    }
    printf("parsed: %lld tensors\n", (long long) gguf_get_n_tensors(ctx));
    gguf_free(ctx);
    return 0;
}
