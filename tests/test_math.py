"""The per-element math is written once (kernels/adamw_math.cuh); every copy is held to it.

- the CUDA kernel and the CPU loop include the header itself; tests/test_ext.py holds the CPU
  loop to a float32 evaluation of the header (<= 1 ulp) and tests/test_cuda_kernel.py the
  CUDA kernel to the CPU loop;
- tests/test_triton.py holds the Triton helpers to the header's text and to a float64
  evaluation of its formulas;
- this file holds reference.py (the torch backend) to the header's text; its numbers are held
  to the CPU loop by tests/test_ext.py and to torch.optim.AdamW by tests/test_optimizer.py.
"""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

from fused_adamw import reference

HEADER = Path(__file__).resolve().parents[1] / "kernels" / "adamw_math.cuh"


def header_writes() -> list[str]:
    """The locals and outputs adamw_update writes, in order, from the header's text."""
    text = HEADER.read_text()
    body = text[text.index("void adamw_update("):]
    body = body[body.index("{") + 1: body.index("\n}\n")]
    return re.findall(r"(?:\bconst\s+)?(?:\bfloat\s+)?\b(\w+)\s*=(?!=)", body)


def reference_writes() -> list[str]:
    """The same from reference.adamw_update_: assignments, in-place method chains (x.op_()),
    in-place foreach calls (torch._foreach_op_(x, ...) writes x) and out= arguments, in
    statement order."""
    tree = ast.parse(inspect.getsource(reference.adamw_update_))
    writes = []

    def visit(node):
        if isinstance(node, ast.Assign):
            writes.extend(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
            call = node.value
            out = [k.value.id for k in call.keywords if k.arg == "out"]
            if out:
                writes.extend(out)
            else:  # x.mul_(...).add_(...): the innermost receiver is written
                f = call.func
                while isinstance(f, ast.Attribute) and isinstance(f.value, ast.Call):
                    f = f.value.func
                if (isinstance(f, ast.Attribute) and f.attr.startswith("_foreach_")
                        and f.attr.endswith("_")):
                    writes.append(call.args[0].id)
                elif isinstance(f, ast.Attribute) and f.attr.endswith("_"):
                    writes.append(f.value.id)
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.stmt,)):
                visit(child)

    visit(tree.body[0])
    return writes


def collapse(writes: list[str]) -> list[str]:
    """Consecutive repeats collapsed: x, x, y -> x, y."""
    return [w for i, w in enumerate(writes) if i == 0 or w != writes[i - 1]]


def test_reference_mirrors_header_order():
    # maximize (grad), then Adam's L2 (grad) or the decoupled decay (param), then the moments.
    expected = ["grad", "grad", "param", "exp_avg", "grad_sq", "exp_avg_sq", "second_moment",
                "max_exp_avg_sq", "second_moment", "denom", "param"]
    assert header_writes() == expected  # the parser reads the header as intended
    # A foreach line writes one of the header's values in several in-place calls, and the
    # torch code has temporaries the header does not name: compare the header's names in
    # order, consecutive repeats collapsed on both sides.
    ours = [w for w in reference_writes() if w in set(expected)]
    assert collapse(ours) == collapse(expected)
    # The collapse merges the two writes of grad (maximize, then L2): count them apart. No
    # line of the reference writes grad in several calls (grad is the caller's: never in place).
    assert ours.count("grad") == expected.count("grad")
