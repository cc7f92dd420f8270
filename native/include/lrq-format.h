// lrq: the one format version shared by the C++ side (the patched llama.cpp, the binding) and
// Python (lrq.constants.FORMAT_VERSION; a test checks that the two agree).
// A GGUF written by lrq stores it under the key "lrq.format_version"; readers refuse any other.
#pragma once

#define LRQ_FORMAT_VERSION 1

#define LRQ_STR_(x) #x
#define LRQ_STR(x) LRQ_STR_(x)
#define LRQ_FORMAT_VERSION_STR LRQ_STR(LRQ_FORMAT_VERSION)
