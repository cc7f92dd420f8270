// lrq._native: pybind11 glue.  Validates arguments and casts between numpy and C++; all work
// happens in model.cpp (and, for kernels, in native/).
//
// Threads: the GIL is released around every call that does llama.cpp work, and always *before*
// Model::eval/perplexity take the Model's mutex: a thread waiting for that mutex with the GIL
// held would block the thread inside the Model from ever reacquiring the GIL to return.
#include "model.h"

#include "llama.h"

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdio>
#include <memory>

namespace py = pybind11;

void lrq_register_kernels(py::module_ & m);  // kernels.cpp

namespace {

using TokenArray = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;

// Refuse paths llama.cpp would only fail on later (and with a less clear message).
void check_readable(const std::string & path) {
    std::FILE * f = std::fopen(path.c_str(), "rb");
    if (!f) {
        PyErr_SetFromErrnoWithFilename(PyExc_OSError, path.c_str());
        throw py::error_already_set();
    }
    std::fclose(f);
}

const int32_t * token_ptr(const TokenArray & tokens, int n_vocab, py::ssize_t & n) {
    if (tokens.ndim() != 1) {
        throw py::value_error("tokens must be a 1-D array of token ids");
    }
    n = tokens.shape(0);
    const int32_t * p = tokens.data();
    for (py::ssize_t i = 0; i < n; ++i) {
        if (p[i] < 0 || p[i] >= n_vocab) {
            throw py::value_error("token id " + std::to_string(p[i]) + " at index " + std::to_string(i) +
                                  " is outside the vocabulary [0, " + std::to_string(n_vocab) + ")");
        }
    }
    return p;
}

}  // namespace

PYBIND11_MODULE(_native, m) {
    m.doc() = "lrq native binding over the patched llama.cpp";

    // The CPU backends are modules (libggml-cpu-<variant>.so, the best one for this CPU) and so is
    // RPC: load them from the build's bin directory, with the log already captured (not on stderr).
    lrq::install_log_capture();
    ggml_backend_load_all_from_path(LRQ_BIN_DIR);
    if (!ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU)) {
        throw py::import_error("lrq._native: no ggml CPU backend (libggml-cpu-*.so) loads from " LRQ_BIN_DIR
                               ": rebuild with `make build`");
    }
    llama_backend_init();

    static py::exception<lrq::LoadError> load_error(m, "LoadError", PyExc_RuntimeError);
    py::register_exception_translator([](std::exception_ptr p) {
        try {
            if (p) {
                std::rethrow_exception(p);
            }
        } catch (const lrq::LoadError & e) {
            py::set_error(load_error, e.what());
        }
    });

    lrq_register_kernels(m);  // _native.kernels (kernels.cpp)

    m.def("version_info", []() {
        py::dict d;
        d["lrq_version"] = LRQ_VERSION;
        d["llama_commit"] = LRQ_LLAMA_COMMIT;
        d["bin_dir"] = LRQ_BIN_DIR;
        d["backends"] = lrq::backend_names();
        d["system_info"] = lrq::system_info();
        return d;
    }, "Versions, compiled backends and the directory of the patched llama.cpp binaries.");

    py::class_<lrq::PerplexityResult>(m, "PerplexityResult")
        .def_readonly("ppl", &lrq::PerplexityResult::ppl)
        .def_readonly("nll", &lrq::PerplexityResult::nll)
        .def_readonly("nll_std", &lrq::PerplexityResult::nll_std)
        .def_readonly("count", &lrq::PerplexityResult::count)
        .def_readonly("n_chunks", &lrq::PerplexityResult::n_chunks)
        .def_readonly("n_ctx", &lrq::PerplexityResult::n_ctx)
        .def("__repr__", [](const lrq::PerplexityResult & r) {
            return "PerplexityResult(ppl=" + std::to_string(r.ppl) + ", count=" + std::to_string(r.count) +
                   ", n_chunks=" + std::to_string(r.n_chunks) + ", n_ctx=" + std::to_string(r.n_ctx) + ")";
        });

    py::class_<lrq::Model>(m, "Model")
        .def(py::init([](const std::string & path, int n_ctx, int n_threads, int n_batch, bool kv_f32,
                         int flash_attn, const std::string & layers, const std::string & adapter, bool vocab_only) {
                 if (n_ctx < 4) {
                     throw py::value_error("n_ctx must be >= 4, got " + std::to_string(n_ctx));
                 }
                 if (flash_attn < -1 || flash_attn > 1) {
                     throw py::value_error("flash_attn must be -1 (auto), 0 (off) or 1 (on)");
                 }
                 check_readable(path);
                 if (!adapter.empty()) {
                     check_readable(adapter);
                 }
                 py::gil_scoped_release nogil;
                 return std::make_unique<lrq::Model>(path, n_ctx, n_threads, n_batch, kv_f32, flash_attn, layers,
                                                     adapter, vocab_only);
             }),
             py::arg("path"), py::arg("n_ctx") = 512, py::arg("n_threads") = 0, py::arg("n_batch") = 0,
             py::arg("kv_f32") = false, py::arg("flash_attn") = -1, py::arg("layers") = "", py::arg("adapter") = "",
             py::arg("vocab_only") = false,
             "Load a GGUF (plain or LRQ) on the CPU. n_threads <= 0: llama.cpp's default.\n"
             "vocab_only: the vocabulary alone, to tokenize (no weights, no context; eval raises).\n"
             "kv_f32: F32 KV cache (default F16, as llama.cpp); flash_attn: -1 auto, 0 off, 1 on.\n"
             "layers: a layer map ('0..15,11..31', '27x2'), adapter: an lrq adapter GGUF (docs/FORMAT.md 7.1, 11).")
        .def_property_readonly("path", &lrq::Model::path)
        .def_property_readonly("n_vocab", &lrq::Model::n_vocab)
        .def_property_readonly("n_ctx", &lrq::Model::n_ctx)
        .def_property_readonly("n_layer", &lrq::Model::n_layer)
        .def_property_readonly("n_params", &lrq::Model::n_params)
        .def_property_readonly("size_bytes", &lrq::Model::size_bytes)
        .def_property_readonly("desc", &lrq::Model::desc)
        .def("meta", [](const lrq::Model & self, const std::string & key) -> py::object {
                 std::string v = self.meta(key);
                 if (v.empty()) {
                     return py::none();
                 }
                 return py::str(v);
             }, py::arg("key"), "A GGUF metadata value as a string, or None.")
        .def("tokenize", [](const lrq::Model & self, const std::string & text, bool add_special, bool parse_special) {
                 std::vector<int32_t> t;
                 {
                     py::gil_scoped_release nogil;
                     t = self.tokenize(text, add_special, parse_special);
                 }
                 py::array_t<int32_t> out((py::ssize_t) t.size());
                 std::copy(t.begin(), t.end(), out.mutable_data());
                 return out;
             }, py::arg("text"), py::arg("add_special") = true, py::arg("parse_special") = false)
        .def("detokenize", [](const lrq::Model & self, const TokenArray & tokens) {
                 py::ssize_t n;
                 const int32_t * p = token_ptr(tokens, self.n_vocab(), n);
                 return self.detokenize(p, (int) n);
             }, py::arg("tokens"))
        .def("eval", [](lrq::Model & self, const TokenArray & tokens) {
                 py::ssize_t n;
                 const int32_t * p = token_ptr(tokens, self.n_vocab(), n);
                 if (n < 1 || n > self.n_ctx()) {
                     throw py::value_error("eval takes 1.." + std::to_string(self.n_ctx()) + " tokens, got " +
                                           std::to_string(n));
                 }
                 py::array_t<float> logits({n, (py::ssize_t) self.n_vocab()});
                 float * out = logits.mutable_data();
                 {
                     py::gil_scoped_release nogil;
                     self.eval(p, (int) n, out);
                 }
                 return logits;
             }, py::arg("tokens"),
             "float32 logits [n_tokens, n_vocab] of tokens at positions 0..n-1 of an empty cache.")
        .def("perplexity", [](lrq::Model & self, const TokenArray & tokens, int n_ctx, int n_chunks) {
                 py::ssize_t n;
                 const int32_t * p = token_ptr(tokens, self.n_vocab(), n);
                 std::vector<int32_t> t(p, p + n);
                 py::gil_scoped_release nogil;
                 return self.perplexity(std::move(t), n_ctx, n_chunks);
             }, py::arg("tokens"), py::arg("n_ctx") = 512, py::arg("n_chunks") = -1,
             "llama-perplexity's method over tokens (tokenize the text with add_special=True).");
}
