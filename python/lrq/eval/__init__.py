"""Evaluation of GGUF files (LRQ or stock) against the F32 reference through llama.cpp.

    from lrq.eval import reference_f32, make_stock, make_imatrix, base_logits, evaluate_model
    ref = reference_f32(assets.path("smollm2-135m"))
    base = base_logits(ref, "sotu-eval", ctx=512, chunks=40, threads=2)
    row = evaluate_model(make_stock(ref, "Q4_0"), base)       # row.ppl, row.kld, row.top1, row.bpw
"""

from .bpw import FileBpw, file_bpw
from .pareto import pareto_front
from .parse import BaseResult, KLDResult, ParseError, parse_base, parse_kld
from .report import mark_pareto, plot, table, write_csv
from .run import (Base, EvalError, Row, base_logits, evaluate_model, ref_type_label, reference_row,
                  text_file)
from .stock import (IMATRIX_REQUIRED, REF_TYPES, STOCK_DEFAULT, StockError, make_imatrix, make_stock,
                    reference_f32, reference_model, work_dir)

__all__ = ["FileBpw", "file_bpw", "pareto_front", "BaseResult", "KLDResult", "ParseError",
           "parse_base", "parse_kld", "mark_pareto", "plot", "table", "write_csv", "Base",
           "EvalError", "Row", "base_logits", "evaluate_model", "ref_type_label", "reference_row",
           "text_file", "IMATRIX_REQUIRED", "REF_TYPES", "STOCK_DEFAULT", "StockError", "make_imatrix",
           "make_stock", "reference_f32", "reference_model", "work_dir"]
