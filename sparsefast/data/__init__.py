"""Calibration and evaluation data: Wanda's calibration sampler (C4, WikiText-2, local files) and the perplexity
texts of the "gptq" and "llm-pruner" protocols. Small offline copies (WikiText-2 raw test, a 1000-document C4 sample)
are bundled under `bundled/` (sources and licenses in bundled/SOURCES.md); other files are found through
`--data-dir` / `$SPARSEFAST_DATA` with `find_data_file`."""

from sparsefast.data.calibration import (
    CALIBRATION_SOURCES,
    calibration_documents,
    get_calibration,
    sample_windows,
)
from sparsefast.data.evaluation import (
    EVAL_DATASETS,
    PROTOCOLS,
    check_eval_request,
    eval_data_files,
    get_eval_text,
    get_eval_tokens,
)
from sparsefast.data.files import (
    BUNDLED_DIR,
    DATA_ENV,
    check_data_dir,
    data_search_dirs,
    find_data_file,
    read_documents,
    tokenize,
)

__all__ = [
    "BUNDLED_DIR",
    "CALIBRATION_SOURCES",
    "DATA_ENV",
    "EVAL_DATASETS",
    "PROTOCOLS",
    "calibration_documents",
    "check_data_dir",
    "check_eval_request",
    "data_search_dirs",
    "eval_data_files",
    "find_data_file",
    "get_calibration",
    "get_eval_text",
    "get_eval_tokens",
    "read_documents",
    "sample_windows",
    "tokenize",
]
