#!/usr/bin/env python3
"""Compare our emitted programs with what coremltools itself emits for the same functions.

For each package (written by `write_mlpackage`; `cargo xtask test --only coreml-equivalence` writes
them), the program's description is read back from its `ggml-coreml.program` metadata key
(`i8i8-m64-k256-n96`, `w8f16-g32o-m64-k256-n96`, `i8i8o-c32-m64-k256-n96`, `f16-…`). The same
function is then built with coremltools' MIL builder from the listings in docs/programs.md (not from
our Rust code) and converted with `ct.convert(prog, convert_to="mlprogram",
minimum_deployment_target=<our spec version>)`, coremltools' default pass pipeline included (no model
load, no prediction). Both `Model` protos are then compared:

- model: specification version, `isUpdatable`, description inputs/outputs (name, type, order),
  metadata and the program's attributes;
- functions: names, inputs (name, type, order), opset, block specializations, block outputs;
- operations (in program order, `const` ops folded into the arguments that use them): op type,
  argument names, each binding (a function input by position, another op's output by position, or
  a const by dtype, shape, encoding and value: const names may differ), output types, attributes
  (the `name` attribute's value is a variable name and is not compared), nested blocks; and the
  number of `const` ops, and unused ones.

Every difference has a stable id (`category:subject`). A difference fails unless its id is a row
of the "Known differences from coremltools" table in docs/programs.md with a justification; a row
that no program shows fails too, so the table and the programs cannot drift apart.

Output: one line per program (`OK` or `FAIL`, with its failing differences below it), one line per
allowed difference id, the self-test's lines (i8i8, and i8i8o when present; see `self_test`), then

    summary: <P> programs (<v> variant configurations, <s> shapes), <O> ops compared (<n> ops,
    <c> consts), differences: <A> allowed (<ids> kinds), <F> failing

Exits 0 when nothing fails, 1 on a failing difference, 2 on a usage or environment error.

Usage: coreml_equivalence.py --doc docs/programs.md <pkg.mlpackage>...
"""

import hashlib
import os
import re
import sys
import time
import warnings

DOC_HEADING = "Known differences from coremltools"


class EnvError(Exception):
    """The environment (venv, doc) is not usable; exit 2 with this message."""


# --- the allowlist, read from docs/programs.md ---------------------------------------------------


def read_allowed(doc_path):
    """{id: justification} from the table under the DOC_HEADING heading."""
    try:
        with open(doc_path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise EnvError(f"cannot read {doc_path}: {e}")
    start = None
    for i, line in enumerate(lines):
        if line.startswith("#") and DOC_HEADING in line:
            start = i + 1
            break
    if start is None:
        raise EnvError(f"{doc_path} has no heading containing '{DOC_HEADING}'")
    allowed = {}
    in_table = False
    for line in lines[start:]:
        s = line.strip()
        if s.startswith("#"):
            break
        if not s.startswith("|"):
            if in_table:
                break
            continue
        in_table = True
        cells = [c.strip() for c in s.strip("|").split("|")]
        if not cells or set(cells[0]) <= set("-: ") or cells[0].lower() == "id":
            continue
        m = re.fullmatch(r"`([^`]+)`", cells[0])
        if not m:
            raise EnvError(f"{doc_path}: a known-differences row's id is not `code`: {s}")
        why = cells[-1] if len(cells) >= 3 else ""
        if not why:
            raise EnvError(f"{doc_path}: known difference {m.group(1)} has no justification")
        allowed[m.group(1)] = why
    if not in_table:
        raise EnvError(f"{doc_path}: no table under '{DOC_HEADING}'")
    return allowed


# --- program descriptions ------------------------------------------------------------------------

KEY_RE = re.compile(r"(i8i8|f16|w8f16-g(\d+)(o?)|i8i8o-c(\d+))-m(\d+)-k(\d+)-n(\d+)")


def parse_key(key):
    """A program key as a description; `group` is w8f16's block length or i8i8o's outlier count c."""
    m = KEY_RE.fullmatch(key)
    if not m:
        raise ValueError(f"unknown program key {key!r}")
    variant = m.group(1).split("-")[0]
    return {
        "variant": variant,
        "group": int(m.group(2) or m.group(4) or 0),
        "offsets": m.group(3) == "o",
        "m": int(m.group(5)),
        "k": int(m.group(6)),
        "n": int(m.group(7)),
    }


# --- the reference programs, built with coremltools' MIL builder -------------------------------


def reference_program(d, target):
    """The function docs/programs.md lists for description `d`, built with the MIL builder."""
    import numpy as np
    from coremltools.converters.mil.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    n, k, m = d["n"], d["k"], d["m"]

    def spec(dtype, rows, cols):
        return mb.TensorSpec(shape=(1, 1, rows, cols), dtype=dtype)

    def matmul(w, x):
        return mb.matmul(x=w, y=x, transpose_x=False, transpose_y=False, name="y")

    if d["variant"] == "i8i8":

        @mb.program(input_specs=[spec(types.int8, n, k), spec(types.int8, k, m)], opset_version=target)
        def prog(w, x):
            # fp16(1/sqrt(K)), one const shared by both dequantizes (docs/programs.md's listing).
            scale = mb.const(val=np.float16(1.0 / np.sqrt(np.float64(k))), name="scale")
            wh = mb.dequantize(input=w, scale=scale, name="wh")
            xh = mb.dequantize(input=x, scale=scale, name="xh")
            return matmul(wh, xh)

        return prog, ["w", "x"]

    if d["variant"] == "i8i8o":
        c = d["group"]
        specs = [
            spec(types.int8, n, k),
            spec(types.int8, k, m),
            spec(types.int8, n, c),
            spec(types.fp16, c, m),
            spec(types.fp16, 1, m),
        ]

        @mb.program(input_specs=specs, opset_version=target)
        def prog(w, x, wo, xo, t):
            # docs/programs.md's listing: one fp16(1/sqrt(K)) const for the three dequantizes, and
            # one pair of transpose flags for both matmuls.
            scale = mb.const(val=np.float16(1.0 / np.sqrt(np.float64(k))), name="scale")
            wh = mb.dequantize(input=w, scale=scale, name="wh")
            xh = mb.dequantize(input=x, scale=scale, name="xh")
            tx = mb.const(val=False, name="transpose_x")
            ty = mb.const(val=False, name="transpose_y")
            p = mb.matmul(x=wh, y=xh, transpose_x=tx, transpose_y=ty, name="p")
            pt = mb.mul(x=p, y=t, name="pt")
            woh = mb.dequantize(input=wo, scale=scale, name="woh")
            o = mb.matmul(x=woh, y=xo, transpose_x=tx, transpose_y=ty, name="o")
            return mb.add(x=pt, y=o, name="y")

        return prog, ["w", "x", "wo", "xo", "t"]

    if d["variant"] == "f16":

        @mb.program(input_specs=[spec(types.fp16, n, k), spec(types.fp16, k, m)], opset_version=target)
        def prog(w, x):
            return matmul(w, x)

        return prog, ["w", "x"]

    g = d["group"]
    blocks = k // g
    specs = [spec(types.int8, n, k), spec(types.fp16, n, blocks)]
    if d["offsets"]:
        specs.append(spec(types.fp16, n, blocks))
    specs.append(spec(types.fp16, k, m))

    def body(w, scales, offsets, x):
        one = mb.const(val=np.float16(1.0), name="one")
        wq = mb.dequantize(input=w, scale=one, name="wq")
        wg = mb.reshape(x=wq, shape=[1, n, blocks, g], name="wg")
        sg_shape = mb.const(val=np.array([1, n, blocks, 1], dtype=np.int32), name="sg_shape")
        sg = mb.reshape(x=scales, shape=sg_shape, name="sg")
        ws = mb.mul(x=wg, y=sg, name="ws")
        if offsets is not None:
            og = mb.reshape(x=offsets, shape=sg_shape, name="og")
            ws = mb.add(x=ws, y=og, name="wo")
        wh = mb.reshape(x=ws, shape=[1, 1, n, k], name="wh")
        return matmul(wh, x)

    if d["offsets"]:

        @mb.program(input_specs=specs, opset_version=target)
        def prog(w, scales, offsets, x):
            return body(w, scales, offsets, x)

        return prog, ["w", "scales", "offsets", "x"]

    @mb.program(input_specs=specs, opset_version=target)
    def prog(w, scales, x):
        return body(w, scales, None, x)

    return prog, ["w", "scales", "x"]


def check_inputs(prog, names):
    """The builder names inputs after the Python parameters; check that they are the interface's."""
    got = list(prog.functions["main"].inputs.keys())
    if got != names:
        raise RuntimeError(f"reference inputs {got} are not {names}")


# --- canonical forms -----------------------------------------------------------------------------


def ser(msg):
    return msg.SerializeToString(deterministic=True)


def value_type_text(vt):
    """Short text of a MIL ValueType, for messages."""
    which = vt.WhichOneof("type")
    if which != "tensorType":
        return which or "none"
    t = vt.tensorType
    from coremltools.proto import MIL_pb2

    dims = [str(x.constant.size) if x.WhichOneof("dimension") == "constant" else "?" for x in t.dimensions]
    return f"{MIL_pb2.DataType.Name(t.dataType)}[{','.join(dims)}]"


class Side:
    """One program (ours or coremltools'), indexed for comparison."""

    def __init__(self, spec, weights_dir):
        self.spec = spec
        self.weights_dir = weights_dir
        self._blob_reader = None
        prog = spec.mlProgram
        self.fn_names = sorted(prog.functions.keys())
        self.fn = prog.functions["main"] if "main" in prog.functions else None
        self.block = None
        self.consts = {}  # output name -> (canon, op)
        self.ops = []  # non-const ops, program order
        self.where = {}  # output name -> ("op", index, output index)
        self.inputs = {}
        if self.fn is None:
            return
        self.inputs = {x.name: i for i, x in enumerate(self.fn.inputs)}
        if self.fn.opset in self.fn.block_specializations:
            self.block = self.fn.block_specializations[self.fn.opset]
        if self.block is None:
            return
        for op in self.block.operations:
            if op.type == "const":
                for o in op.outputs:
                    self.consts[o.name] = (self.const_canon(op), op)
            else:
                for j, o in enumerate(op.outputs):
                    self.where[o.name] = ("op", len(self.ops), j)
                self.ops.append(op)

    def const_canon(self, op):
        """(attribute keys, output type, dtype/shape, encoding, values) of a const op."""
        import numpy as np
        from coremltools.proto import MIL_pb2

        keys = tuple(sorted(op.attributes.keys()))
        out_t = tuple(value_type_text(o.type) for o in op.outputs)
        val = op.attributes["val"] if "val" in op.attributes else None
        if val is None:
            return (keys, out_t, None, None, None)
        vtype = value_type_text(val.type)
        which = val.WhichOneof("value")
        if which == "immediateValue":
            t = val.immediateValue.tensor if val.immediateValue.WhichOneof("value") == "tensor" else None
            if t is None:
                enc = "immediate:" + str(val.immediateValue.WhichOneof("value"))
                return (keys, out_t, vtype, enc, ser(val.immediateValue))
            enc = t.WhichOneof("value")
            if enc == "bytes":
                dt = val.type.tensorType.dataType
                raw = t.bytes.values
                if dt == MIL_pb2.DataType.FLOAT16:
                    # Bit patterns: exact, and NaN-safe.
                    vals = tuple(int(x) for x in np.frombuffer(raw, dtype=np.uint16))
                else:
                    vals = tuple(raw)
            else:
                vals = tuple(getattr(t, enc).values)
            return (keys, out_t, vtype, "immediate:" + str(enc), vals)
        if which == "blobFileValue":
            fv = val.blobFileValue
            try:
                data = self.blob_data(fv, val.type.tensorType.dataType)
            except Exception as e:  # pragma: no cover - reported as a difference
                data = f"unreadable: {e}".encode()
            return (keys, out_t, vtype, "blob", hashlib.sha256(data).hexdigest())
        return (keys, out_t, vtype, str(which), None)

    def blob_data(self, fv, dtype):
        """The bytes of a blob-stored const (its offset differs between writers; its data must not)."""
        from coremltools.libmilstoragepython import _BlobStorageReader as BlobReader
        from coremltools.proto import MIL_pb2

        if self._blob_reader is None:
            path = fv.fileName.replace("@model_path/weights", self.weights_dir or "")
            self._blob_reader = BlobReader(path)
        name = {
            MIL_pb2.DataType.FLOAT16: "read_fp16_data",
            MIL_pb2.DataType.FLOAT32: "read_float_data",
            MIL_pb2.DataType.INT8: "read_int8_data",
            MIL_pb2.DataType.UINT8: "read_uint8_data",
            MIL_pb2.DataType.INT16: "read_int16_data",
            MIL_pb2.DataType.UINT16: "read_uint16_data",
            MIL_pb2.DataType.INT32: "read_int32_data",
            MIL_pb2.DataType.UINT32: "read_uint32_data",
        }[dtype]
        return getattr(self._blob_reader, name)(int(fv.offset)).tobytes()

    def binding(self, b):
        """A binding by what it is, not by its variable name."""
        if b.WhichOneof("binding") == "value":
            return ("value", ser(b.value))
        return self.ref(b.name)

    def ref(self, name):
        """What variable `name` is: a function input or an op output by position, or a const's value."""
        if name in self.inputs:
            return ("input", self.inputs[name])
        if name in self.where:
            return self.where[name]
        if name in self.consts:
            return ("const",) + self.consts[name][0]
        return ("undefined", name)

    def used_names(self):
        used = set()
        if self.block is None:
            return used
        for op in self.block.operations:
            for arg in op.inputs.values():
                for b in arg.arguments:
                    if b.WhichOneof("binding") == "name":
                        used.add(b.name)
        used.update(self.block.outputs)
        return used


def binding_text(b):
    kind = b[0]
    if kind == "input":
        return f"input #{b[1]}"
    if kind == "op":
        return f"op #{b[1]} output {b[2]}"
    if kind == "const":
        _, keys, out_t, vtype, enc, vals = b
        shown = vals
        if isinstance(vals, tuple) and len(vals) > 6:
            shown = f"{len(vals)} values"
        return f"const {vtype} {enc} {shown}"
    return repr(b)


# --- comparison ----------------------------------------------------------------------------------


def vs(x, y):
    """Ours against coremltools', for messages."""
    return f"ours {x}, coremltools {y}"


def differs(a, b, key):
    """Whether map `a` and map `b` of protobuf values disagree at `key` (one lacking it included)."""
    return key not in a or key not in b or ser(a[key]) != ser(b[key])


def compare(ours, theirs):
    """List of (id, detail): every way `ours` differs from `theirs` (coremltools)."""
    diffs = []

    def diff(id_, detail):
        diffs.append((id_, detail))

    a, b = ours.spec, theirs.spec
    if a.specificationVersion != b.specificationVersion:
        diff("spec-version", vs(a.specificationVersion, b.specificationVersion))
    if a.isUpdatable != b.isUpdatable:
        diff("is-updatable", vs(a.isUpdatable, b.isUpdatable))
    if a.WhichOneof("Type") != b.WhichOneof("Type"):
        diff("model-type", vs(a.WhichOneof("Type"), b.WhichOneof("Type")))
        return diffs

    # Model description: the interface CoreML binds by name.
    for what in ("input", "output"):
        fa, fb = getattr(a.description, what), getattr(b.description, what)
        if [f.name for f in fa] != [f.name for f in fb]:
            diff(f"description-{what}-names", vs([f.name for f in fa], [f.name for f in fb]))
        for x, y in zip(fa, fb):
            if ser(x.type) != ser(y.type):
                diff(f"description-{what}-type", f"{x.name}: " + vs(x.type, y.type).replace("\n", " "))
            if x.shortDescription != y.shortDescription:
                diff(f"description-{what}-doc", f"{x.name}")
    md_a, md_b = a.description.metadata, b.description.metadata
    ud_a, ud_b = dict(md_a.userDefined), dict(md_b.userDefined)
    for key in sorted(set(ud_a) | set(ud_b)):
        if key not in ud_b:
            diff(f"metadata-ours:{key}", f"only in ours ({ud_a[key]!r})")
        elif key not in ud_a:
            diff(f"metadata-coremltools:{key}", "only in coremltools' model")
        elif ud_a[key] != ud_b[key]:
            diff(f"metadata-value:{key}", vs(repr(ud_a[key]), repr(ud_b[key])))
    for field in ("shortDescription", "versionString", "author", "license"):
        if getattr(md_a, field) != getattr(md_b, field):
            diff(f"metadata-field:{field}", vs(repr(getattr(md_a, field)), repr(getattr(md_b, field))))
    rest_a, rest_b = type(a.description)(), type(b.description)()
    rest_a.CopyFrom(a.description)
    rest_b.CopyFrom(b.description)
    for r in (rest_a, rest_b):
        r.ClearField("input")
        r.ClearField("output")
        r.ClearField("metadata")
    if ser(rest_a) != ser(rest_b):
        diff("description-other", f"ours {rest_a}, coremltools {rest_b}".replace("\n", " "))

    # The program.
    pa, pb = a.mlProgram, b.mlProgram
    if pa.version != pb.version:
        diff("program-version", vs(pa.version, pb.version))
    if pa.docString != pb.docString:
        diff("program-doc", "docString differs")
    for key in sorted(set(pa.attributes) | set(pb.attributes)):
        if key not in pb.attributes:
            diff(f"program-attribute-ours:{key}", "only in ours")
        elif key not in pa.attributes:
            diff(f"program-attribute-coremltools:{key}", "only in coremltools' program")
        elif ser(pa.attributes[key]) != ser(pb.attributes[key]):
            diff(f"program-attribute-value:{key}", "values differ")
    if ours.fn_names != theirs.fn_names:
        diff("functions", vs(ours.fn_names, theirs.fn_names))
    if ours.fn is None or theirs.fn is None:
        diff("functions", "no main function")
        return diffs
    fa, fb = ours.fn, theirs.fn
    ia = [(x.name, ser(x.type)) for x in fa.inputs]
    ib = [(x.name, ser(x.type)) for x in fb.inputs]
    if [x[0] for x in ia] != [x[0] for x in ib]:
        diff("function-input-names", vs([x[0] for x in ia], [x[0] for x in ib]))
    for x, y, xa in zip(ia, ib, fa.inputs):
        if x[1] != y[1]:
            diff("function-input-type", f"{xa.name}: types differ")
    if fa.opset != fb.opset:
        diff("function-opset", vs(fa.opset, fb.opset))
    if sorted(fa.block_specializations) != sorted(fb.block_specializations):
        diff("block-specializations", vs(sorted(fa.block_specializations), sorted(fb.block_specializations)))
    for key in sorted(set(fa.attributes) | set(fb.attributes)):
        if differs(fa.attributes, fb.attributes, key):
            diff(f"function-attribute:{key}", "differs")
    if ours.block is None or theirs.block is None:
        diff("block-specializations", "no block for the function's opset")
        return diffs
    ba, bb = ours.block, theirs.block
    if len(ba.inputs) or len(bb.inputs):
        if [ser(x) for x in ba.inputs] != [ser(x) for x in bb.inputs]:
            diff("block-inputs", "differ")
    for key in sorted(set(ba.attributes) | set(bb.attributes)):
        if differs(ba.attributes, bb.attributes, key):
            diff(f"block-attribute:{key}", "differs")
    if list(ba.outputs) != list(bb.outputs):
        diff("block-output-names", vs(list(ba.outputs), list(bb.outputs)))
    ra = [ours.ref(x) for x in ba.outputs]
    rb = [theirs.ref(x) for x in bb.outputs]
    if ra != rb:
        diff("block-output-bindings", vs(ra, rb))

    # Operations, const ops folded into their uses.
    if len(ours.ops) != len(theirs.ops):
        diff("op-count", vs([o.type for o in ours.ops], [o.type for o in theirs.ops]))
    for i, (x, y) in enumerate(zip(ours.ops, theirs.ops)):
        at = f"op #{i} {x.type}"
        if x.type != y.type:
            diff(f"op-type:{x.type}", f"{at}: coremltools has {y.type}")
            continue
        if sorted(x.inputs) != sorted(y.inputs):
            diff(f"op-arguments:{x.type}", f"{at}: " + vs(sorted(x.inputs), sorted(y.inputs)))
        for arg in sorted(set(x.inputs) & set(y.inputs)):
            bx = [ours.binding(v) for v in x.inputs[arg].arguments]
            by = [theirs.binding(v) for v in y.inputs[arg].arguments]
            if bx != by:
                diff(
                    f"op-binding:{x.type}.{arg}",
                    f"{at} {arg}: " + vs([binding_text(v) for v in bx], [binding_text(v) for v in by]),
                )
        tx = [ser(o.type) for o in x.outputs]
        ty = [ser(o.type) for o in y.outputs]
        if tx != ty:
            diff(
                f"op-output-type:{x.type}",
                f"{at}: " + vs(*([value_type_text(o.type) for o in z.outputs] for z in (x, y))),
            )
        if sorted(x.attributes) != sorted(y.attributes):
            diff(f"op-attribute-keys:{x.type}", f"{at}: " + vs(sorted(x.attributes), sorted(y.attributes)))
        for key in sorted(set(x.attributes) & set(y.attributes) - {"name"}):
            if ser(x.attributes[key]) != ser(y.attributes[key]):
                diff(f"op-attribute-value:{x.type}.{key}", at)
        if len(x.blocks) or len(y.blocks):
            diff(f"op-blocks:{x.type}", f"{at}: nested blocks ({len(x.blocks)} vs {len(y.blocks)})")

    # Const ops: how many, and none unused.
    if len(ours.consts) != len(theirs.consts):
        diff("const-count", vs(len(ours.consts), len(theirs.consts)))
    for side, label in ((ours, "ours"), (theirs, "coremltools")):
        unused = sorted(set(side.consts) - side.used_names())
        if unused:
            diff(f"const-unused-{label}", f"{unused}")
    return diffs


# --- self-test: the comparison sees what matters and ignores names -----------------------------


def self_test(spec, weights_dir, variant="i8i8"):
    """Mutations of an i8i8 program (or, with `variant="i8i8o"`, of an i8i8o program): each must
    show its difference ids; renaming must show none.

    Returns (number of cases, list of failure messages: empty when the comparison behaves)."""
    from coremltools.proto import MIL_pb2

    def block_of(s):
        fn = s.mlProgram.functions["main"]
        return fn.block_specializations[fn.opset]

    def op_of(s, type_, nth=0):
        return [o for o in block_of(s).operations if o.type == type_][nth]

    def const_of(s, dtype):
        consts = [o for o in block_of(s).operations if o.type == "const"]
        return next(o for o in consts if o.attributes["val"].type.tensorType.dataType == dtype)

    def flip_scale(s):
        v = const_of(s, MIL_pb2.DataType.FLOAT16).attributes["val"].immediateValue.tensor.bytes
        v.values = bytes([v.values[0] ^ 1]) + v.values[1:]

    def swap_operands(s):
        mm = op_of(s, "matmul")
        x, y = mm.inputs["x"].arguments[0].name, mm.inputs["y"].arguments[0].name
        mm.inputs["x"].arguments[0].name, mm.inputs["y"].arguments[0].name = y, x

    def transpose_flag(s):
        const_of(s, MIL_pb2.DataType.BOOL).attributes["val"].immediateValue.tensor.bools.values[0] = True

    def output_shape(s):
        op_of(s, "matmul").outputs[0].type.tensorType.dimensions[3].constant.size += 64

    def input_dtype(s):
        fp16 = s.description.output[0].type.multiArrayType.dataType
        s.description.input[1].type.multiArrayType.dataType = fp16

    def op_type(s):
        op_of(s, "dequantize", 1).type = "cast"

    def unshare(s, type_, nth, arg):
        # Op `type_` #nth gets its own copy of the const it shares at argument `arg`, placed before it.
        ops = block_of(s).operations
        user = op_of(s, type_, nth)
        shared = user.inputs[arg].arguments[0].name
        orig = next(o for o in ops if o.type == "const" and o.outputs[0].name == shared)
        dup = MIL_pb2.Operation()
        dup.CopyFrom(orig)
        dup.outputs[0].name = orig.outputs[0].name + "_copy"
        dup.attributes["name"].immediateValue.tensor.strings.values[0] = dup.outputs[0].name
        user.inputs[arg].arguments[0].name = dup.outputs[0].name
        rebuilt = []
        for o in ops:
            if o.type == type_ and o.inputs[arg].arguments[0].name == dup.outputs[0].name:
                rebuilt.append(dup)
            c = MIL_pb2.Operation()
            c.CopyFrom(o)
            rebuilt.append(c)
        del ops[:]
        ops.extend(rebuilt)

    def own_scale(s):
        # The second dequantize gets its own copy of the shared scale const.
        unshare(s, "dequantize", 1, "scale")

    def rebind(type_, nth, arg, to):
        # Op `type_` #nth's argument `arg` reads variable `to(s)` instead.
        def mutate(s):
            op_of(s, type_, nth).inputs[arg].arguments[0].name = to(s)

        return mutate

    def input_name(i):
        return lambda s: s.mlProgram.functions["main"].inputs[i].name

    def output_of(type_, nth=0):
        return lambda s: op_of(s, type_, nth).outputs[0].name

    def rename_all(s):
        # Every variable that is not part of the interface gets another name.
        block = block_of(s)
        keep = set(block.outputs) | {x.name for x in s.mlProgram.functions["main"].inputs}
        new = {}
        for o in block.operations:
            for out in o.outputs:
                if out.name not in keep:
                    new[out.name] = "renamed_" + out.name
                    out.name = new[out.name]
            if "name" in o.attributes:
                strings = o.attributes["name"].immediateValue.tensor.strings.values
                strings[0] = new.get(strings[0], strings[0])
            for arg in o.inputs.values():
                for b in arg.arguments:
                    b.name = new.get(b.name, b.name)

    outlier_cases = [
        # The outliers' weight columns dequantized with their own copy of the scale.
        ("outlier scale not shared", lambda s: unshare(s, "dequantize", 2, "scale"), {"const-count"}),
        # The outlier matmul with its own transpose flags.
        (
            "transpose flags not shared",
            lambda s: unshare(s, "matmul", 1, "transpose_x"),
            {"const-count"},
        ),
        # The per-token factor t read from xo (input #3) instead of t (input #4).
        ("token factor input", rebind("mul", 0, "y", input_name(3)), {"op-binding:mul.y"}),
        # The sum reads the int8 product p before its per-token factor.
        ("sum skips the token factor", rebind("add", 0, "x", output_of("matmul")), {"op-binding:add.x"}),
        # The outlier product reads the int8 activations' dequantize instead of xo.
        (
            "outlier activations",
            rebind("matmul", 1, "y", output_of("dequantize", 1)),
            {"op-binding:matmul.y"},
        ),
    ]
    cases = [
        ("scale value", flip_scale, {"op-binding:dequantize.scale"}),
        ("matmul operands swapped", swap_operands, {"op-binding:matmul.x", "op-binding:matmul.y"}),
        ("transpose flag", transpose_flag, {"op-binding:matmul.transpose_x"}),
        ("op output shape", output_shape, {"op-output-type:matmul"}),
        ("model input dtype", input_dtype, {"description-input-type"}),
        ("op type", op_type, {"op-type:dequantize"}),
        ("const not shared", own_scale, {"const-count"}),
        ("every variable renamed", rename_all, set()),
    ]
    if variant == "i8i8o":
        cases = cases[:1] + outlier_cases + cases[-1:]
    failures = []
    base = Side(spec, weights_dir)
    for label, mutate, want in cases:
        other = type(spec)()
        other.CopyFrom(spec)
        mutate(other)
        got = {x[0] for x in compare(base, Side(other, weights_dir))}
        if (want and not want <= got) or (not want and got):
            failures.append(
                f"{label}: expected {sorted(want) or 'no difference'}, got {sorted(got) or 'none'}"
            )
    return len(cases), failures


# --- main ----------------------------------------------------------------------------------------


def main(argv):
    doc = None
    paths = []
    it = iter(argv)
    for a in it:
        if a == "--doc":
            doc = next(it, None)
        elif a in ("-h", "--help"):
            print(__doc__.strip())
            return 0
        else:
            paths.append(a.rstrip("/"))
    if doc is None or not paths:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    t0 = time.time()
    try:
        allowed = read_allowed(doc)
        warnings.filterwarnings("ignore")
        import logging

        logging.disable(logging.WARNING)
        # coremltools prints its proxy-loading noise through stderr on Linux; keep it out of our output.
        devnull = os.open(os.devnull, os.O_WRONLY)
        saved = os.dup(2)
        os.dup2(devnull, 2)
        try:
            import coremltools as ct  # noqa: F401
            from coremltools.converters.mil.mil import Builder  # noqa: F401
        except ImportError as e:
            raise EnvError(
                f"coremltools is not importable from {sys.executable}: {e} (run `cargo xtask venv`)"
            )
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            os.close(devnull)
    except EnvError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import tempfile

    import coremltools as ct

    seen = {}  # allowed id -> programs showing it
    failing = 0
    allowed_count = 0
    n_ops = n_consts = 0
    variants = set()
    shapes = set()
    self_specs = {}  # variant -> (spec, weights dir, key) of its first program, for the self-test
    with tempfile.TemporaryDirectory(prefix="coreml-equivalence-") as tmp:
        for path in paths:
            try:
                mine = ct.models.MLModel(path, skip_model_load=True)
                spec = mine.get_spec()
                key = dict(spec.description.metadata.userDefined).get("ggml-coreml.program")
                if key is None:
                    raise ValueError("no ggml-coreml.program metadata")
                d = parse_key(key)
                variants.add(key.split("-m")[0])
                shapes.add((d["m"], d["k"], d["n"]))
                try:
                    target = ct.target(spec.specificationVersion)
                except ValueError:
                    v = spec.specificationVersion
                    raise ValueError(f"coremltools {ct.__version__} has no target for spec {v}")
                prog, names = reference_program(d, target)
                check_inputs(prog, names)
                pkg = os.path.join(tmp, key + ".mlpackage")
                ref = ct.convert(
                    prog,
                    convert_to="mlprogram",
                    minimum_deployment_target=target,
                    skip_model_load=True,
                    package_dir=pkg,
                )
                ours = Side(spec, mine.weights_dir)
                theirs = Side(ref.get_spec(), ref.weights_dir)
                diffs = compare(ours, theirs)
            except Exception as e:  # one line per program, whatever went wrong
                failing += 1
                msg = str(e).replace("\n", " ")
                print(f"FAIL {os.path.basename(path)} {type(e).__name__}: {msg}", flush=True)
                continue
            if d["variant"] in ("i8i8", "i8i8o") and d["variant"] not in self_specs:
                self_specs[d["variant"]] = (spec, mine.weights_dir, key)
            n_ops += len(ours.ops)
            n_consts += len(ours.consts)
            ok = [x for x in diffs if x[0] in allowed]
            bad = [x for x in diffs if x[0] not in allowed]
            allowed_count += len(ok)
            failing += len(bad)
            for id_, _ in ok:
                seen[id_] = seen.get(id_, 0) + 1
            head = "FAIL" if bad else "OK  "
            counts = f"{len(ours.ops)} ops, {len(ours.consts)} consts, {len(ok)} allowed differences"
            print(f"{head} {key}: {counts}", flush=True)
            for id_, detail in bad:
                print(f"     {id_}: {detail}", flush=True)
    if "i8i8" not in self_specs:
        failing += 1
        print("FAIL self-test: no i8i8 program among the packages", flush=True)
    for variant in ("i8i8", "i8i8o"):
        if variant not in self_specs:
            continue
        spec, weights_dir, key = self_specs[variant]
        cases, failures = self_test(spec, weights_dir, variant)
        failing += len(failures)
        for f in failures:
            print(f"FAIL self-test: {f}", flush=True)
        seen_ok = cases - len(failures)
        print(f"self-test: {seen_ok}/{cases} mutations of {key} seen as expected", flush=True)
    for id_ in sorted(seen):
        print(f"allowed: {id_} ({seen[id_]} programs)", flush=True)
    stale = sorted(set(allowed) - set(seen))
    for id_ in stale:
        failing += 1
        print(f"FAIL stale known difference `{id_}`: listed in {doc} but no program shows it", flush=True)
    print(
        f"summary: {len(paths)} programs ({len(variants)} variant configurations, {len(shapes)} shapes), "
        f"{n_ops + n_consts} ops compared ({n_ops} ops, {n_consts} consts), "
        f"differences: {allowed_count} allowed ({len(seen)} kinds), {failing} failing "
        f"[coremltools {ct.__version__}, {time.time() - t0:.1f} s]",
        flush=True,
    )
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
