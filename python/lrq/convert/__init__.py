"""lrq.convert: GGUF / Hugging Face model -> LRQ GGUF (docs/FORMAT.md)."""

from .arch import ArchConverter, ConvertError, converter_for, register, supported
from .hf import convert_hf_script, llama_cpp_dir
from .pipeline import ConvertOptions, ConvertSummary, convert

__all__ = ["ArchConverter", "ConvertError", "ConvertOptions", "ConvertSummary", "convert",
           "converter_for", "register", "supported", "convert_hf_script", "llama_cpp_dir"]
