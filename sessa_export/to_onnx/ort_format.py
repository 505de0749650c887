"""ORT format for ONNX Runtime Mobile and minimal builds: `export --ort-format`.

Beside model.onnx, an export gets `model.ort` (the same step graph after ONNX Runtime's full graph
optimizations, its functions inlined, as a FlatBuffer that ORT Mobile and minimal builds load) and
`model.required_operators.config` (the operators and opsets it needs: the input of ORT's reduced-size
build, `build.sh --minimal_build --include_ops_by_config FILE`). Both come from onnxruntime's own
converter (`python -m onnxruntime.tools.convert_onnx_models_to_ort`, optimization style Fixed), called
as a library. The manifest names them (`ort_model_file`, `ort_operators_config`); `model_file` stays
model.onnx, which every other reader uses.
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from typing import Callable

from ..errors import SessaExportError

ORT_MODEL_NAME = "model.ort"
OPERATORS_CONFIG_NAME = "model.required_operators.config"


def write_ort_format(directory: Path, model_file: str, progress: Callable[[str], None] = lambda _: None) -> dict:
    """Convert `directory`/`model_file` to ORT format beside it; return the manifest keys naming the files."""
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    progress("converting to ORT format (model.ort, required operators)")
    logging.getLogger("ort_format_model.utils").setLevel(logging.WARNING)  # its "Created config" line
    chatter = io.StringIO()  # the converter prints its progress to stdout
    try:
        with contextlib.redirect_stdout(chatter):
            convert_onnx_models_to_ort(directory / model_file, output_dir=directory,
                                       optimization_styles=[OptimizationStyle.Fixed])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise SessaExportError(f"{model_file}: ONNX Runtime cannot convert it to ORT format "
                               f"({str(exc).strip().splitlines()[0]}); export without --ort-format") from None
    ort_model, config = directory / ORT_MODEL_NAME, directory / OPERATORS_CONFIG_NAME
    if not ort_model.is_file() or not config.is_file():
        raise SessaExportError(f"the ORT format converter wrote no {ORT_MODEL_NAME} / {OPERATORS_CONFIG_NAME} "
                               f"in {directory}: {chatter.getvalue().strip().splitlines()[-1:]}")
    # The converter names the model by its absolute path, here a hidden work directory: name the file.
    config.write_text(config.read_text().replace(str(ort_model.resolve()), ORT_MODEL_NAME))
    return {"ort_model_file": ORT_MODEL_NAME, "ort_operators_config": OPERATORS_CONFIG_NAME}


__all__ = ["ORT_MODEL_NAME", "OPERATORS_CONFIG_NAME", "write_ort_format"]
