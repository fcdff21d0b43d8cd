#!/usr/bin/env python3
"""Validate .mlpackage directories with coremltools (Linux is fine: no compile, no predict).

For each package: load the spec, run coremltools' MIL loader on it (re-runs type inference and
reads every weight blob with its sentinel and dtype checks), reject any fp32 value (the ANE
takes none), and print one line:

    OK   <pkg> spec=<version> ops=<op histogram> [blobs=<n> verified]
    FAIL <pkg> <error>

When `<pkg>.blobs.json` sits next to a package (written by the Rust tests: a list of
{"offset", "dtype", "sha256"}), every blob is read back with coremltools' blob reader and its
bytes must hash to what the Rust writer wrote. Exits 1 if any package fails.

Usage: validate_mlpackage.py <pkg.mlpackage>...
"""

import collections
import hashlib
import json
import os
import sys
import warnings


def main(paths):
    if not paths:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    # coremltools prints proxy-loading noise on Linux; keep our output to one line per package.
    warnings.filterwarnings("ignore")
    import logging

    logging.disable(logging.WARNING)
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto import load as milproto_load
    from coremltools.converters.mil.mil import types

    try:
        from coremltools.libmilstoragepython import _BlobStorageReader as BlobReader
    except ImportError:  # pragma: no cover - the manylinux wheel has it
        BlobReader = None

    readers = {
        "fp16": "read_fp16_data",
        "fp32": "read_float_data",
        "uint8": "read_uint8_data",
        "int8": "read_int8_data",
        "int16": "read_int16_data",
        "uint16": "read_uint16_data",
        "int32": "read_int32_data",
        "uint32": "read_uint32_data",
    }

    failures = 0
    for path in paths:
        path = path.rstrip("/")
        try:
            m = ct.models.MLModel(path, skip_model_load=True)
            spec = m.get_spec()
            if spec.WhichOneof("Type") != "mlProgram":
                raise ValueError("not an ML Program")
            prog = milproto_load.load(
                spec,
                specification_version=spec.specificationVersion,
                file_weights_dir=m.weights_dir,
            )
            ops = collections.Counter()
            for fn in prog.functions.values():
                for var in fn.inputs.values():
                    if var.dtype == types.fp32:
                        raise ValueError(f"input {var.name} is fp32 (the ANE takes no fp32)")
                for op in fn.operations:
                    ops[op.op_type] += 1
                    for var in op.outputs:
                        if var.dtype == types.fp32:
                            raise ValueError(f"{op.op_type} {var.name} is fp32 (the ANE takes no fp32)")
            hist = ",".join(f"{k}:{v}" for k, v in sorted(ops.items()))
            extra = ""
            weight_bin = os.path.join(m.weights_dir, "weight.bin")
            sidecar = path + ".blobs.json"
            if os.path.exists(weight_bin):
                if os.path.exists(sidecar):
                    if BlobReader is None:
                        raise RuntimeError("coremltools has no blob reader")
                    reader = BlobReader(weight_bin)
                    with open(sidecar) as f:
                        blobs = json.load(f)
                    for b in blobs:
                        data = getattr(reader, readers[b["dtype"]])(int(b["offset"]))
                        digest = hashlib.sha256(data.tobytes()).hexdigest()
                        if digest != b["sha256"]:
                            raise ValueError(
                                f"blob at {b['offset']} ({b['dtype']}) reads back differently"
                            )
                    extra = f" blobs={len(blobs)} verified"
                else:
                    extra = " blobs=unverified (no sidecar)"
            print(f"OK   {path} spec={spec.specificationVersion} ops={hist}{extra}", flush=True)
        except Exception as e:  # one line per package, whatever went wrong
            failures += 1
            msg = str(e).replace("\n", " ")
            print(f"FAIL {path} {type(e).__name__}: {msg}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
