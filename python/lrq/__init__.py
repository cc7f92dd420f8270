"""lrq — layer-replication quantization of LLMs on llama.cpp."""

__version__ = "0.1.0"
