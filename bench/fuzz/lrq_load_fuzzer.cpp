// libFuzzer harness: the patched llama.cpp model loader (and its LRQ checks, native/lrq/lrq-llama.cpp:
// lrq_check_format, lrq_load_hparams, lrq_load_tensors) on arbitrary bytes, through the public C API.
//
// Built by bench/fuzz/run.py against an ASan + UBSan + coverage build of libllama (build/fuzz).
// Each input is written to a tmpfs file and loaded with llama_model_load_from_file, CPU only; the
// load must return a model or NULL (a load error), never crash, abort (GGML_ASSERT) or make a
// sanitizer report.  An odd-sized input is loaded with mmap, an even-sized one without (read into
// buffers): both data paths, and a crash input reproduces with the same choice.
// (llama_model_load_from_file_ptr exists but skips the LRQ checks that re-read tensor data from
// the file, rule T5 and the act / clip bounds, so the path API is the one that covers them.)
//
// Environment: LRQ_FUZZ_LOG=1 lets llama.cpp's log through (to reproduce one input).

#include "ggml-backend.h"
#include "llama.h"

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

#include <unistd.h>

static std::string g_path;

static void quiet_log(ggml_log_level, const char *, void *) {}

extern "C" int LLVMFuzzerInitialize(int *, char ***) {
    const char * verbose = std::getenv("LRQ_FUZZ_LOG");
    if (!verbose || std::string(verbose) != "1") {
        llama_log_set(quiet_log, nullptr);   // logging would dominate the time of a failed load
    }
    // the CPU backend is a module (GGML_BACKEND_DL) in the directory of this binary (build/fuzz/bin)
    char exe[4096];
    const ssize_t n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
    if (n > 0) {
        exe[n] = 0;
        std::string bin_dir(exe);
        bin_dir.resize(bin_dir.rfind('/'));
        ggml_backend_load_all_from_path(bin_dir.c_str());
    }
    llama_backend_init();
    if (ggml_backend_reg_count() == 0) {
        std::fprintf(stderr, "lrq_load_fuzzer: no ggml backend loaded (libggml-cpu*.so beside the binary?)\n");
        std::abort();   // every load would fail for that reason alone: nothing would be fuzzed
    }
    const char * dir = access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp";
    g_path = std::string(dir) + "/lrq-load-fuzz-" + std::to_string(getpid()) + ".gguf";
    return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t * data, size_t size) {
    // a new inode for every input: no mapping of an earlier input can alias this one
    unlink(g_path.c_str());
    FILE * f = std::fopen(g_path.c_str(), "wb");
    if (!f) {
        std::perror(g_path.c_str());
        std::abort();   // the harness itself is broken: stop rather than fuzz nothing
    }
    if (size && std::fwrite(data, 1, size, f) != size) {
        std::perror(g_path.c_str());
        std::abort();
    }
    std::fclose(f);

    llama_model_params params = llama_model_default_params();
    params.n_gpu_layers = 0;
    params.load_mode    = (size & 1) ? LLAMA_LOAD_MODE_MMAP : LLAMA_LOAD_MODE_NONE;
    llama_model * model = llama_model_load_from_file(g_path.c_str(), params);
    if (model) {
        llama_model_free(model);
    }
    return 0;
}
