"""`nn-numba export`: a checkpoint as an ONNX graph or a NumPy .npz, to run the network elsewhere.

Both formats name the tensors after a torch.nn.Sequential of Linear and ReLU modules, so that PyTorch's
`load_state_dict` takes them as they are: the l-th Linear layer (from 0) is module 2l, its weight
(out, in) is "{2l}.weight" and its bias "{2l}.bias"; the ReLUs are modules 1, 3, ... and hold nothing.
For 784-250-250-10: 0.weight (250, 784), 0.bias, 2.weight (250, 250), 2.bias, 4.weight (10, 250), 4.bias.

.onnx  input "input" float32 [N, 784] (pixels in [0, 1], N free), one Gemm (x Wᵀ + b) per layer with a
       Relu between them, outputs "logits" [N, 10] and "probabilities" (their softmax). Built with the
       `onnx` package (the optional extra nn-numba[export]) and checked with onnx.checker.
.npz   the weights and biases under the names above, "sizes" (int64, n0 .. nL) and "meta" (the
       checkpoint's META section as a JSON string); NumPy alone reads it, with allow_pickle=False.

Files are written atomically: an existing file is replaced whole or not at all.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np

from .checkpoint import Checkpoint, arch
from .errors import NNError

FORMATS = (".onnx", ".npz")
OPSET = 17  # ONNX operator set: Gemm, Relu and Softmax(axis=-1) as onnxruntime 1.16+ runs them
IR_VERSION = 8  # the file format version that goes with opset 17, so older runtimes read it too


def layer_names(n_layers: int) -> list[tuple[str, str]]:
    """(weight, bias) names of each Linear layer in a torch.nn.Sequential(Linear, ReLU, Linear, ...)."""
    return [(f"{2 * l}.weight", f"{2 * l}.bias") for l in range(n_layers)]


def npz_bytes(ck: Checkpoint) -> bytes:
    """The .npz file: weights and biases by layer_names, "sizes" and "meta"."""
    arrays: dict[str, np.ndarray] = {"sizes": np.array(ck.sizes, np.int64),
                                     "meta": np.array(json.dumps(ck.meta, sort_keys=True))}
    for (w, b), W, B in zip(layer_names(len(ck.weights)), ck.weights, ck.biases):
        arrays[w], arrays[b] = np.asarray(W, np.float32), np.asarray(B, np.float32)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _onnx():
    try:
        import onnx
    except ImportError:
        raise NNError("exporting to .onnx needs the onnx package: pip install 'nn-numba[export]' "
                      "(or export to .npz, which needs only NumPy)") from None
    return onnx


def onnx_bytes(ck: Checkpoint) -> bytes:
    """The .onnx file: Gemm (+ Relu) per layer, outputs "logits" and "probabilities"; checked by onnx.checker."""
    from . import __version__

    onnx = _onnx()
    from onnx import TensorProto, helper, numpy_helper

    names = layer_names(len(ck.weights))
    nodes, inits, h = [], [], "input"
    for l, ((w, b), W, B) in enumerate(zip(names, ck.weights, ck.biases)):
        inits += [numpy_helper.from_array(np.asarray(W, np.float32), w),
                  numpy_helper.from_array(np.asarray(B, np.float32), b)]
        out = "logits" if l == len(names) - 1 else f"{2 * l}.out"
        nodes.append(helper.make_node("Gemm", [h, w, b], [out], name=str(2 * l), transB=1))
        if out != "logits":
            h = f"{2 * l + 1}.out"
            nodes.append(helper.make_node("Relu", [out], [h], name=str(2 * l + 1)))
    nodes.append(helper.make_node("Softmax", ["logits"], ["probabilities"], name="softmax", axis=-1))
    n_in, n_out = ck.sizes[0], ck.sizes[-1]
    graph = helper.make_graph(
        nodes, f"nn-numba {arch(ck.sizes)}",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", n_in])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", n_out]),
         helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", n_out])],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="nn-numba",
                              producer_version=__version__,
                              doc_string=f"MNIST MLP {arch(ck.sizes)}: input pixels in [0, 1], row-major 28x28")
    model.ir_version = IR_VERSION
    helper.set_model_props(model, {"sizes": json.dumps(ck.sizes), "meta": json.dumps(ck.meta, sort_keys=True)})
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise NNError(f"the ONNX graph fails onnx.checker ({first}); please report this") from None
    return model.SerializeToString()


def check_format(to: str | os.PathLike) -> str:
    """The format of an output file by its extension: ".onnx" or ".npz"."""
    ext = Path(to).suffix.lower()
    if ext not in FORMATS:
        said = f"extension '{ext}'" if ext else "no extension"
        raise NNError(f"cannot export to {to}: {said}; name the file .onnx (ONNX) or .npz (NumPy)")
    return ext


def write(ck: Checkpoint, to: str | os.PathLike) -> Path:
    """Export `ck` to `to` in the format its extension names; the file is replaced atomically."""
    from .files import write_atomic

    to = Path(to)
    data = onnx_bytes(ck) if check_format(to) == ".onnx" else npz_bytes(ck)
    if to.is_dir():
        raise NNError(f"cannot export to {to}: is a folder; give a file name ending in .onnx or .npz")
    write_atomic(to, [data], what="export")
    return to


def export(source: str | os.PathLike, to: str | os.PathLike) -> Path:
    """`nn-numba export`: the checkpoint `source` (a run folder: its best.ck) into `to`."""
    from .checkpoint import load
    from .runs import checkpoint_path

    ext = check_format(to)  # before any reading: a wrong name fails at once
    if ext == ".onnx":
        _onnx()
    return write(load(checkpoint_path(source)), to)
