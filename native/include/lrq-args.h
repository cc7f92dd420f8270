// lrq: the load options --lrq-layers MAP and --lrq-adapter FILE of the patched tools.
//
// They reach libllama as string kv-overrides under keys that no file has (LRQ_OPT_LAYERS,
// LRQ_OPT_ADAPTER in lrq-keys.h): llama_model_params already carries overrides from every tool
// (common's --override-kv, the server, llama-bench, the binding) to the loader, so no public
// struct of llama.cpp changes.  native/lrq/lrq-llama.cpp reads them (docs/FORMAT.md 7.1, 11).
// Header-only: common/arg.cpp and tools/llama-bench include it; the patches only call it.
#pragma once

#include "llama.h"
#include "lrq-keys.h"

#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#define LRQ_ARGS_LAYERS_HELP                                                                       \
    "lrq: run the model's layers in this order (virtual layers aliasing the weights, each with "   \
    "its own KV cache), e.g. '0..15,11..31' (a full list) or '27x2' (layer 27 twice, every other " \
    "layer once); docs/FORMAT.md section 7.1"
#define LRQ_ARGS_ADAPTER_HELP                                                                      \
    "lrq: apply an lrq adapter (a schedule and per-replica parameters fitted for this base model " \
    "by lrq-calibrate --adapter); docs/FORMAT.md section 11"

// Appends one string override (before common's terminating empty entry is added).  Throws
// std::invalid_argument naming the flag when the value does not fit llama.cpp's override
// (127 bytes) or when the option is given twice.
inline void lrq_push_load_option(std::vector<llama_model_kv_override> & overrides, const char * key,
                                 const std::string & value, const char * flag) {
    llama_model_kv_override ov{};
    if (value.empty()) {
        throw std::invalid_argument(std::string(flag) + ": an empty value");
    }
    if (value.size() >= sizeof(ov.val_str)) {
        throw std::invalid_argument(std::string(flag) + " '" + value + "': longer than " +
                                    std::to_string(sizeof(ov.val_str) - 1) +
                                    " bytes (llama.cpp's metadata-override limit); use a shorter path or map");
    }
    for (const auto & o : overrides) {
        if (std::strcmp(o.key, key) == 0) {
            throw std::invalid_argument(std::string(flag) + " given twice");
        }
    }
    std::snprintf(ov.key, sizeof(ov.key), "%s", key);
    ov.tag = LLAMA_KV_OVERRIDE_TYPE_STR;
    std::snprintf(ov.val_str, sizeof(ov.val_str), "%s", value.c_str());
    overrides.push_back(ov);
}
